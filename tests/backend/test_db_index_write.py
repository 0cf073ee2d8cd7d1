"""write_run on both backends: the rows equal the index result, and no failure at any point is ever visible.

The index result itself is checked against a brute-force oracle in tests/trainer/test_index_accumulate.py;
here the database must hold exactly that result, and runs must appear and be replaced all at once.
"""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from backend.db.models import Context, Example, Feature, FeatureEdge, Run, visible_runs
from backend.db.session import SchemaVersionError, make_engine
from backend.index import writer as writer_module
from backend.index.writer import RunExistsError, delete_run, write_run
from trainer.index import (
    ContextRecord,
    IndexAccumulator,
    IndexConfig,
    RunInfo,
    decoder_cosines,
    top_output_tokens,
)

WIDTHS = (4, 12)
LENGTH = 6
CFG = IndexConfig(top_k=3, quantile_buckets=2, quantile_examples=2, hist_bins=20, hist_min=1e-2, hist_max=1e3,
                  sample_bin_width=2)


class Contexts:
    def get_contexts(self, context_ids):
        return [
            ContextRecord([_token(c * LENGTH + p) for p in range(LENGTH)], f"doc{c // 4}", (c % 4) * LENGTH)
            for c in context_ids
        ]


def _token(i: int) -> str:
    """Display strings as tokenizers give them, including characters that need escaping on the way in."""
    return f"Tok{i}" if i % 3 else f" \t\\'\"é\n\x00{i}"


def _index(seed: int = 0, n_contexts: int = 30):
    rng = np.random.default_rng(seed)
    edges = [((0, c % WIDTHS[0]), (1, c)) for c in range(WIDTHS[1] - 2)]
    acc = IndexAccumulator(WIDTHS, edges, CFG)
    n = n_contexts * LENGTH
    codes = []
    for width, k in zip(WIDTHS, (2, 3), strict=True):
        indices = np.stack([rng.permutation(width)[:k] for _ in range(n)])
        indices[rng.random((n, k)) < 0.3] = -1
        codes.append((indices, rng.exponential(1.0, (n, k)).astype(np.float32)))
    acc.add(codes, np.repeat(np.arange(n_contexts), LENGTH), np.tile(np.arange(LENGTH), n_contexts))
    result = acc.result()
    decoders = [rng.normal(size=(w, 8)).astype(np.float32) for w in WIDTHS]
    unembed = rng.normal(size=(40, 8)).astype(np.float32)
    tokens = [top_output_tokens(d, unembed, decode=_token, k=3) for d in decoders]
    e = result.edges()
    cosines = decoder_cosines(decoders, e.parent_level, e.parent_idx, e.child_level, e.child_idx)
    return result, tokens, cosines


RESULT, TOKENS, COSINES = _index()


def _info(name: str, digest: str = "a" * 64) -> RunInfo:
    return RunInfo(name=name, model_name="tiny-lm", layer=3, hook="resid_post", arch="tree",
                   checkpoint_digest=digest, config={"arch": "tree"}, corpus={"spec": "synthetic"},
                   metrics={"explained_variance": 0.9}, checkpoint_path="/runs/tiny")


def _write(url, name, digest="a" * 64, **kwargs):
    kwargs.setdefault("batch_rows", 7)  # many batches: interruptions can land between any two
    return write_run(url, RESULT, _info(name, digest), Contexts(), output_tokens=TOKENS, edge_cosines=COSINES,
                     **kwargs)


def _unique_name(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def engine(db_url):
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def _counts(engine, run_id: int) -> dict[str, int]:
    with engine.connect() as conn:
        return {m.__tablename__: conn.scalar(select(func.count()).select_from(m).where(m.run_id == run_id))
                for m in (Feature, FeatureEdge, Context, Example)}


def _runs_named(engine, name: str) -> list[tuple[int, bool]]:
    query = select(Run.id, Run.complete).where(Run.name == name).order_by(Run.id)
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query)]


def _check_features(session, run_id, lv) -> None:
    rows = session.scalars(select(Feature).where(Feature.run_id == run_id, Feature.level == lv.level)
                           .order_by(Feature.idx)).all()
    assert [r.idx for r in rows] == list(range(lv.width))
    child_count, mean_act, tokens = RESULT.child_count(lv.level), lv.mean_act(), TOKENS[lv.level]
    for i, r in enumerate(rows):
        assert r.fire_count == lv.fire_count[i]
        assert r.density == pytest.approx(lv.fire_count[i] / RESULT.n_tokens)
        assert r.max_act == float(lv.act_max[i])
        assert r.mean_act == pytest.approx(mean_act[i])
        parent = (None, None) if lv.parent[i] < 0 else (lv.level - 1, lv.parent[i])
        assert (r.parent_level, r.parent_idx) == parent
        assert r.child_count == child_count[i]
        nonzero = np.flatnonzero(lv.hist[i])
        counts = lv.hist[i][nonzero[0] : nonzero[-1] + 1].tolist() if nonzero.size else []
        assert r.histogram["counts"] == counts
        assert len(r.histogram["edges"]) == len(counts) + (1 if counts else 0)
        assert [t for t, _ in r.top_positive] == [t for t, _ in tokens.positive(i)]
        assert r.top_tokens_text == "\n".join(t for t, _ in tokens.positive(i)).replace("\x00", "")
        assert [v for _, v in r.top_negative] == pytest.approx([v for _, v in tokens.negative(i)], rel=1e-4)
        assert (r.label, r.note, r.tags, r.annotated_at) == (None, None, [], None)


def _check_examples(session, run_id, lv) -> None:
    rows = session.scalars(
        select(Example).where(Example.run_id == run_id, Example.level == lv.level)
        .order_by(Example.idx, Example.kind.desc(), Example.bucket, Example.rank)  # 'top' before 'quantile'
    ).all()
    ex = lv.examples
    expected = [
        (int(ex.feature[j]), ["top", "quantile"][ex.kind[j]], int(ex.bucket[j]), int(ex.rank[j]),
         int(ex.context[j]), float(ex.max_value[j]), int(ex.max_position[j]))
        for j in range(len(ex))
    ]
    got = [(r.idx, r.kind, r.bucket, r.rank, r.context_id, r.max_value, r.max_position) for r in rows]
    assert got == expected
    values = np.array([r.token_values for r in rows])
    np.testing.assert_allclose(values, lv.token_values(slice(None), LENGTH), rtol=1e-4)


def _check_edges(session, run_id) -> None:
    rows = session.scalars(select(FeatureEdge).where(FeatureEdge.run_id == run_id)
                           .order_by(FeatureEdge.child_level, FeatureEdge.child_idx)).all()
    e = RESULT.edges()
    assert [(r.parent_level, r.parent_idx, r.child_level, r.child_idx, r.coactive_count) for r in rows] == [
        tuple(int(x) for x in row)
        for row in zip(e.parent_level, e.parent_idx, e.child_level, e.child_idx, e.coactive, strict=True)
    ]
    for j, r in enumerate(rows):
        for got, want in ((r.p_parent_given_child, e.p_parent_given_child[j]),
                          (r.p_child_given_parent, e.p_child_given_parent[j])):
            assert got == (None if np.isnan(want) else pytest.approx(want))
        assert r.decoder_cosine == pytest.approx(float(COSINES[j]))


def test_database_holds_exactly_the_result(db_url, engine):
    name = _unique_name("exact")
    run_id = _write(db_url, name)
    with Session(engine) as session:
        run = session.scalars(visible_runs().where(Run.name == name)).one()
        assert (run.id, run.n_tokens, run.level_widths) == (run_id, RESULT.n_tokens, list(WIDTHS))
        assert run.index_settings == CFG.to_dict()
        assert (run.metrics, run.checkpoint_path) == ({"explained_variance": 0.9}, "/runs/tiny")
        for lv in RESULT.levels:
            _check_features(session, run_id, lv)
            _check_examples(session, run_id, lv)
        _check_edges(session, run_id)
        contexts = session.scalars(select(Context).where(Context.run_id == run_id)
                                   .order_by(Context.context_id)).all()
        assert [c.context_id for c in contexts] == RESULT.context_ids().tolist()
        for c in contexts:
            (want,) = Contexts().get_contexts([c.context_id])
            assert (c.tokens, c.doc_id, c.start) == (want.tokens, want.doc_id, want.start)


def test_existing_name_is_refused_and_nothing_changes(db_url, engine):
    name = _unique_name("taken")
    run_id = _write(db_url, name)
    before = _counts(engine, run_id)
    with pytest.raises(RunExistsError, match=rf"run '{name}' already exists .*--replace"):
        _write(db_url, name)
    assert _runs_named(engine, name) == [(run_id, True)]
    assert _counts(engine, run_id) == before


def _annotate(engine, run_id: int, idx: int, label: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(Feature).where(Feature.run_id == run_id, Feature.level == 1, Feature.idx == idx)
                     .values(label=label, note="n", tags=["t"], annotated_at=func.now()))


def test_replace_swaps_and_keeps_annotations_of_the_same_checkpoint(db_url, engine):
    name = _unique_name("swap")
    old_id = _write(db_url, name)
    _annotate(engine, old_id, idx=5, label="kept")
    new_id = _write(db_url, name, replace=True)
    assert new_id != old_id
    assert _runs_named(engine, name) == [(new_id, True)]
    assert _counts(engine, old_id) == dict.fromkeys(_counts(engine, old_id), 0)
    with engine.connect() as conn:
        annotated = conn.execute(select(Feature.idx, Feature.label, Feature.note, Feature.tags).where(
            Feature.run_id == new_id, Feature.label.is_not(None))).all()
    assert [tuple(a) for a in annotated] == [(5, "kept", "n", ["t"])]

    # Another checkpoint: the same indices mean other features, so labels stay behind (in the history).
    other_id = _write(db_url, name, replace=True, digest="b" * 64)
    labelled = select(func.count()).where(Feature.run_id == other_id, Feature.label.is_not(None))
    with engine.connect() as conn:
        assert conn.scalar(labelled) == 0


class Interrupt(KeyboardInterrupt):
    pass


def _interrupt_at(stage: str, after_rows: int = 1):
    def progress(current: str, done: int, total: int) -> None:
        if current == stage and done >= after_rows:
            raise Interrupt

    return progress


@pytest.mark.parametrize("stage", ["features", "edges", "contexts", "examples"])
def test_interrupted_new_run_leaves_nothing(db_url, engine, stage):
    name = _unique_name(f"cut-{stage}")
    with pytest.raises(Interrupt):
        _write(db_url, name, progress=_interrupt_at(stage))
    assert _runs_named(engine, name) == []


def test_interrupted_replace_keeps_the_old_run_intact(db_url, engine):
    name = _unique_name("keep")
    old_id = _write(db_url, name)
    _annotate(engine, old_id, idx=2, label="precious")
    before = _counts(engine, old_id)
    with pytest.raises(Interrupt):
        _write(db_url, name, replace=True, progress=_interrupt_at("examples", after_rows=10))
    assert _runs_named(engine, name) == [(old_id, True)]
    assert _counts(engine, old_id) == before
    with engine.connect() as conn:
        assert conn.scalar(select(Feature.label).where(Feature.run_id == old_id, Feature.idx == 2,
                                                        Feature.level == 1)) == "precious"


def test_failure_inside_the_swap_transaction_rolls_back(db_url, engine, monkeypatch):
    name = _unique_name("swapfail")
    old_id = _write(db_url, name)
    _annotate(engine, old_id, idx=1, label="x")

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer_module, "_carry_annotations", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        _write(db_url, name, replace=True)
    assert _runs_named(engine, name) == [(old_id, True)]


def test_crash_orphan_is_invisible_and_cleaned_by_the_next_index(db_url, engine, monkeypatch):
    name = _unique_name("orphan")
    monkeypatch.setattr(writer_module, "_discard", lambda engine, run_id: None)  # the process "died"
    with pytest.raises(Interrupt):
        _write(db_url, name, progress=_interrupt_at("examples"))
    monkeypatch.undo()
    ((orphan_id, complete),) = _runs_named(engine, name)
    assert not complete
    assert _counts(engine, orphan_id)["features"] == sum(WIDTHS)
    with engine.connect() as conn:
        assert conn.execute(visible_runs().where(Run.name == name)).first() is None

    run_id = _write(db_url, name)
    assert run_id != orphan_id  # ids are never reused
    assert _runs_named(engine, name) == [(run_id, True)]
    assert _counts(engine, orphan_id) == dict.fromkeys(_counts(engine, orphan_id), 0)


def test_database_behind_head_is_refused(empty_db_url):
    with pytest.raises(SchemaVersionError, match="hsae db upgrade"):
        _write(empty_db_url, "never")


def test_delete_run_works_in_batches_and_spares_visible_runs(db_url, engine):
    run_id = _write(db_url, _unique_name("delete"))
    with pytest.raises(ValueError, match="visible"):
        delete_run(engine, run_id)
    with engine.begin() as conn:
        conn.execute(update(Run).where(Run.id == run_id).values(complete=False))
    delete_run(engine, run_id, features_per_batch=3)
    assert _counts(engine, run_id) == dict.fromkeys(_counts(engine, run_id), 0)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(Run.id == run_id)) == 0


def test_example_values_are_written_as_compact_json_writes_them():
    """The writer's own serializer of token values (zeros unformatted) gives compact_json's exact text, for
    sparse and dense rows, rows shorter than the widest, and values of every magnitude."""
    from backend.db.session import compact_json
    from backend.index.writer import json_float_rows, round_significant

    rng = np.random.default_rng(0)
    values = rng.gamma(0.5, 3.0, (40, 16)) * 10.0 ** rng.integers(-6, 6, (40, 16))
    values[rng.random((40, 16)) < 0.8] = 0.0
    values[3] = rng.random(16) + 0.5  # dense
    values[4] = 0.0
    values = round_significant(values, 5)
    lengths = rng.integers(0, 17, 40).tolist()
    lengths[3] = 16
    assert json_float_rows(values, lengths) == [compact_json(values[j, :n].tolist())
                                               for j, n in enumerate(lengths)]
    assert json_float_rows(np.zeros((0, 4)), []) == []

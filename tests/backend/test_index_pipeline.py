"""`hsae index` end to end on the real SmolLM2: what lands in the database equals a brute-force computation
over the same activations, an interruption leaves nothing visible, and --replace swaps cleanly."""

import json
import shutil
import uuid

import numpy as np
import pytest
import torch
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from backend.db.models import Example, Feature, FeatureEdge, FeatureRelative, Run, visible_runs
from backend.db.session import make_engine
from backend.index.pipeline import index_checkpoint
from backend.index.writer import RunExistsError
from trainer import checkpoint
from trainer.activations import ActivationCache
from trainer.config import ArchConfig, RunConfig, TrainConfig
from trainer.index import pipeline
from trainer.index.accumulate import IndexConfig
from trainer.lm import load_language_model
from trainer.sources import DataSpec
from trainer.workflows import run_training

TOP_K = 4


@pytest.fixture(scope="module")
def trained_run(corpus, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "moe-small"
    cfg = RunConfig(
        ArchConfig(arch="moe", width=16, k=4, children=4, subspace=4),
        TrainConfig(batch_size=64, steps=30, seed=0, device="cpu", progress=False, checkpoint_every=0),
    )
    run_training(DataSpec(layer=6, corpus=corpus, tokens=100_000, context_len=32, device="cpu"), cfg, run_dir)
    return run_dir


def _index(run_dir, db_url, corpus, name, **kw):
    return index_checkpoint(run_dir, db_url=db_url, default_db_url="sqlite:///unused.db", corpus=corpus,
                            tokens=100_000, name=name, device="cpu", config=IndexConfig(top_k=TOP_K), **kw)


def _brute_force(run_dir, corpus):
    ckpt = checkpoint.open(run_dir)
    model = ckpt.model
    lm = load_language_model(layer=6, device="cpu")
    source = ActivationCache(lm, corpus, 32).ensure(None)
    acts, meta = source.read(0, source.num_rows), source.read_meta(0, source.num_rows)
    x = torch.from_numpy(acts)
    with torch.no_grad():
        codes = model.encode(x)
    for code in codes:  # massive activations (norm above the training threshold) get no features
        code.indices[x.norm(dim=-1) > ckpt.max_norm] = -1
    dense = []
    for level, width in enumerate(model.level_widths):
        d = np.zeros((len(acts), width), np.float32)
        idx, val = codes[level].indices.numpy(), codes[level].values.numpy()
        rows, slots = np.nonzero((idx >= 0) & (val > 0))
        d[rows, idx[rows, slots]] = val[rows, slots]
        dense.append(d)
    return model, dense, meta


def test_index_gives_massive_activations_no_features(db_url, trained_run, corpus, tmp_path):
    """With the threshold forced down to the median norm, half the tokens count as massive activations: they
    stay in the contexts but no feature fires on them, and the run says how many there were."""
    run_dir = tmp_path / "low-threshold"
    shutil.copytree(trained_run, run_dir)
    lm = load_language_model(layer=6, device="cpu")
    source = ActivationCache(lm, corpus, 32).ensure(None)
    norms = np.linalg.norm(source.read(0, source.num_rows), axis=1)
    cfg = json.loads((run_dir / "cfg.json").read_text())
    # halfway between the two middle norms: a threshold equal to one row's norm would make that row's verdict
    # depend on the last bit of how each side computes its norm
    middle = np.sort(norms.astype(np.float64))[len(norms) // 2 - 1 : len(norms) // 2 + 1]
    cfg["training"]["max_norm"] = float(middle.mean())
    (run_dir / "cfg.json").write_text(json.dumps(cfg))
    name = f"pipe-{uuid.uuid4().hex[:8]}"
    summary = _index(run_dir, db_url, corpus, name)
    model, dense, _ = _brute_force(run_dir, corpus)
    massive = norms > cfg["training"]["max_norm"]
    assert 0 < massive.sum() < len(norms) and summary.tokens == len(norms)
    assert not (dense[0][massive] > 0).any()
    with Session(make_engine(db_url)) as conn:
        run = conn.execute(visible_runs().where(Run.name == name)).scalar_one()
        assert run.corpus["outlier_tokens"] == int(massive.sum())
        rows = conn.execute(select(Feature).where(Feature.run_id == run.id)).scalars()
        fire = {(f.level, f.idx): f.fire_count for f in rows}
    for level, d in enumerate(dense):
        assert [fire[(level, i)] for i in range(d.shape[1])] == (d > 0).sum(0).tolist()


def test_index_matches_brute_force(db_url, trained_run, corpus):
    name = f"pipe-{uuid.uuid4().hex[:8]}"
    summary = _index(trained_run, db_url, corpus, name)
    model, dense, meta = _brute_force(trained_run, corpus)
    assert summary.tokens == len(meta)
    engine = make_engine(db_url)
    with Session(engine) as conn:
        run = conn.execute(visible_runs().where(Run.name == name)).scalar_one()
        assert run.checkpoint_path == str(trained_run.resolve()) and run.n_tokens == len(meta)
        rows = conn.execute(select(Feature).where(Feature.run_id == run.id)).scalars()
        features = {(f.level, f.idx): f for f in rows}
        assert len(features) == sum(model.level_widths)
        for level, d in enumerate(dense):
            active = d > 0
            for i in range(d.shape[1]):
                f = features[(level, i)]
                assert f.fire_count == int(active[:, i].sum())
                assert f.density == pytest.approx(active[:, i].mean())
                assert f.max_act == pytest.approx(float(d[:, i].max()), rel=1e-5)
                if f.fire_count:
                    assert f.mean_act == pytest.approx(float(d[active[:, i], i].mean()), rel=1e-4)
                assert len(f.top_positive) == 10 and len(f.top_negative) == 10
            # Top contexts: per context, the feature's max; the k best, strongest first.
            for i in range(d.shape[1]):
                per_ctx: dict[int, float] = {}
                for row in np.flatnonzero(active[:, i]):
                    c = int(meta[row, 0])
                    per_ctx[c] = max(per_ctx.get(c, 0.0), float(d[row, i]))
                expected = sorted(per_ctx.values(), reverse=True)[:TOP_K]
                got = conn.execute(
                    select(Example.max_value, Example.context_id, Example.max_position, Example.token_values)
                    .where(Example.run_id == run.id, Example.level == level, Example.idx == i,
                           Example.kind == "top")
                    .order_by(Example.rank)).all()
                assert [g.max_value for g in got] == pytest.approx(expected, rel=1e-4)
                for g in got:
                    assert g.max_value == pytest.approx(per_ctx[g.context_id], rel=1e-4)
                    assert max(g.token_values) == pytest.approx(g.max_value, rel=1e-4)
        # Edges: every parent -> child of the model, with co-firing probabilities from the brute force.
        edges = conn.execute(select(FeatureEdge).where(FeatureEdge.run_id == run.id)).scalars().all()
        assert len(edges) == len(model.edges())
        parent_active, child_active = dense[0] > 0, dense[1] > 0
        for e in edges:
            both = int((parent_active[:, e.parent_idx] & child_active[:, e.child_idx]).sum())
            assert e.coactive_count == both
            n_child = int(child_active[:, e.child_idx].sum())
            if n_child:
                assert e.p_parent_given_child == pytest.approx(both / n_child)
            assert e.parent_idx == e.child_idx // 4  # moe: child index = parent * children + slot
            assert -1.0 <= e.decoder_cosine <= 1.0
        # Cross-width relatives: each child's first relative is the root it co-fires with most, and the
        # decoder cosine of a relative that is the child's own parent is the edge's.
        both_PC = parent_active.T.astype(np.int64) @ child_active.astype(np.int64)
        relatives = conn.execute(select(FeatureRelative).where(
            FeatureRelative.run_id == run.id, FeatureRelative.level == 1, FeatureRelative.rank == 0
        )).scalars()
        cosine = {(e.parent_idx, e.child_idx): e.decoder_cosine for e in edges}
        seen = 0
        for r in relatives:
            assert r.rel_level == 0 and r.coactive_count == both_PC[:, r.idx].max()
            assert r.rel_idx == int(both_PC[:, r.idx].argmax())
            if (r.rel_idx, r.idx) in cosine:
                assert r.decoder_cosine == pytest.approx(cosine[(r.rel_idx, r.idx)], abs=1e-6)
            seen += 1
        assert seen == int((both_PC.max(0) > 0).sum())
    engine.dispose()


def test_interrupted_index_leaves_previous_run_and_replace_swaps(db_url, trained_run, corpus, monkeypatch):
    name = f"swap-{uuid.uuid4().hex[:8]}"
    first = _index(trained_run, db_url, corpus, name)
    engine = make_engine(db_url)

    def count():
        query = select(func.count()).select_from(Run).where(Run.name == name)
        return engine.connect().execute(query).scalar()

    with pytest.raises(RunExistsError, match="--replace"):
        _index(trained_run, db_url, corpus, name)

    real_encode = pipeline._encode

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _index(trained_run, db_url, corpus, name, replace=True)
    monkeypatch.setattr(pipeline, "_encode", real_encode)
    with Session(engine) as conn:
        visible = conn.execute(visible_runs().where(Run.name == name)).scalars().all()
    assert [r.id for r in visible] == [first.run_id] and count() == 1

    second = _index(trained_run, db_url, corpus, name, replace=True)
    assert second.run_id != first.run_id
    with Session(engine) as conn:
        visible = conn.execute(visible_runs().where(Run.name == name)).scalars().all()
        assert [r.id for r in visible] == [second.run_id]
        left = select(func.count()).select_from(Feature).where(Feature.run_id == first.run_id)
        assert conn.execute(left).scalar() == 0
    engine.dispose()

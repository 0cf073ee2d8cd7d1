"""`hsae index-sae` on SAEs built and saved with sae-lens's own classes, on the real SmolLM2: two widths give
a 2-level forest whose inferred parents and edge statistics equal a brute-force co-firing count; a Matryoshka
SAE gives its groups as levels; one plain SAE a flat forest; and every bad input one line, exit 2, nothing
written."""

from __future__ import annotations

import sys
import uuid

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from backend import cli
from backend.db.models import Feature, FeatureEdge, FeatureRelative, Run, visible_runs
from backend.db.session import make_engine
from backend.index.pipeline import index_sae_folders
from trainer.activations import DEFAULT_CONTEXT_LEN, ActivationCache
from trainer.cli import run as run_cli
from trainer.index.accumulate import IndexConfig
from trainer.lm import DEFAULT_MODEL

sae_lens = pytest.importorskip("sae_lens")  # slow to import: once for the module
HOOK = "blocks.6.hook_resid_post"
UNASSIGNED = 0.25


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sae-corpus")
    (folder / "a.txt").write_text("The cat chased the mouse. The dog barked at the cat. Birds sing. " * 4)
    (folder / "b.txt").write_text("Paris, London and Berlin are capitals. One, two, three, four, five. " * 4)
    return str(folder)


@pytest.fixture(scope="module")
def acts(lm, corpus) -> torch.Tensor:
    source = ActivationCache(lm, corpus, DEFAULT_CONTEXT_LEN).ensure(None)
    return torch.from_numpy(source.read(0, source.num_rows))


def _metadata(hook: str = HOOK):
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(model_name=DEFAULT_MODEL, hook_name=hook)


def _topk(folder, d_sae: int, k: int, seed: int, d_in: int = 576, hook: str = HOOK):
    torch.manual_seed(seed)
    sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=_metadata(hook)))
    sae.save_model(folder)
    return folder


@pytest.fixture(scope="module")
def two_widths(tmp_path_factory):
    root = tmp_path_factory.mktemp("saes")
    return _topk(root / "sae-16", 16, 3, seed=0), _topk(root / "sae-40", 40, 4, seed=1)


def _dense(folder, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sae_lens.SAE.load_from_disk(folder).encode(x)


def _brute_parents(upper: torch.Tensor, lower: torch.Tensor):
    """Per lower feature: the upper feature it co-fires with most (ties: lowest), P(parent | child), and -1
    for the UNASSIGNED fraction of lowest P (never co-firing first; ties: lower index first)."""
    a, b = (upper > 0).double(), (lower > 0).double()
    both = (a.T @ b).long()  # [U, L]
    fired = b.sum(0).long()
    best_count, best = both.max(0)  # torch.max returns the first maximum: the lowest index
    score = torch.where(best_count > 0, best_count / fired.clamp(min=1), -1.0)
    parent = torch.where(best_count > 0, best, -1)
    leave = sorted(range(len(score)), key=lambda c: (float(score[c]), c))[: int(UNASSIGNED * len(score))]
    parent[leave] = -1
    return parent, both, fired, (a.sum(0)).long()


def _run_rows(db_url: str, name: str):
    with Session(make_engine(db_url)) as s:
        run = s.execute(visible_runs().where(Run.name == name)).scalar_one()
        features = s.execute(select(Feature).where(Feature.run_id == run.id)).scalars().all()
        edges = s.execute(select(FeatureEdge).where(FeatureEdge.run_id == run.id)).scalars().all()
        relatives = s.execute(select(FeatureRelative).where(FeatureRelative.run_id == run.id)).scalars().all()
        s.expunge_all()
    return run, features, edges, relatives


def _index(folders, db_url, corpus, name, **kw):
    return index_sae_folders(list(folders), db_url=db_url, default_db_url="sqlite:///unused.db", name=name,
                             corpus=corpus, tokens=100_000, unassigned_fraction=UNASSIGNED, device="cpu",
                             config=IndexConfig(top_k=4), **kw)


def test_two_widths_give_a_forest_of_brute_force_co_firing(db_url, two_widths, corpus, acts):
    name = f"sae-{uuid.uuid4().hex[:8]}"
    summary = _index(reversed(two_widths), db_url, corpus, name)  # any order: narrowest on top
    assert summary.tokens == len(acts)
    run, features, edges, relatives = _run_rows(db_url, name)
    assert run.arch == "sae-lens" and run.level_widths == [16, 40] and run.hook == HOOK and run.layer == 6
    assert [lv["path"] for lv in run.config["levels"]] == [str(f.resolve()) for f in two_widths]
    assert [lv["architecture"] for lv in run.config["levels"]] == ["topk", "topk"]

    upper, lower = _dense(two_widths[0], acts), _dense(two_widths[1], acts)
    parent, both, fired, fired_upper = _brute_parents(upper, lower)
    got = {f.idx: -1 if f.parent_idx is None else f.parent_idx for f in features if f.level == 1}
    assert [got[c] for c in range(40)] == parent.tolist()
    assert 0 < (parent >= 0).sum() <= 40 - int(UNASSIGNED * 40)
    want_fires = {(0, i): int(n) for i, n in enumerate(fired_upper)}
    want_fires.update({(1, i): int(n) for i, n in enumerate(fired)})
    assert {(f.level, f.idx): f.fire_count for f in features} == want_fires
    assert len(edges) == int((parent >= 0).sum())
    w_dec = [sae_lens.SAE.load_from_disk(f).W_dec.detach() for f in two_widths]
    for e in edges:
        assert e.parent_idx == parent[e.child_idx]
        assert e.coactive_count == both[e.parent_idx, e.child_idx]
        p = float(both[e.parent_idx, e.child_idx] / fired[e.child_idx])
        assert e.p_parent_given_child == pytest.approx(p)
        cos = torch.nn.functional.cosine_similarity(w_dec[0][e.parent_idx], w_dec[1][e.child_idx], dim=0)
        assert e.decoder_cosine == pytest.approx(float(cos), abs=1e-5)
    # cross-width relatives: each wide feature's first relative is its best upper feature, in both directions
    first = {(r.level, r.idx): r for r in relatives if r.rank == 0}
    for c in range(40):
        if both[:, c].max() > 0:
            r = first[(1, c)]
            assert (r.rel_level, r.rel_idx) == (0, int(both[:, c].argmax()))
            assert r.coactive_count == both[:, c].max()
            assert r.p_relative_given_feature == pytest.approx(float(both[:, c].max() / fired[c]), rel=1e-5)
    for p in range(16):
        if both[p].max() > 0:
            assert first[(0, p)].rel_idx == int(both[p].argmax())


def test_matryoshka_groups_become_levels(corpus, acts, tmp_path):
    torch.manual_seed(2)
    cfg = sae_lens.MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=576, d_sae=32, k=4, matryoshka_widths=[6, 14, 32], metadata=_metadata())
    sae = sae_lens.MatryoshkaBatchTopKTrainingSAE(cfg)
    with torch.no_grad():  # a threshold that lets about 4 of 32 features fire per token, as training would
        pre = sae.encode_with_hidden_pre(acts)[1]
        sae.topk_threshold.fill_(float(pre.flatten().quantile(1 - 4 / 32)))
    sae.save_inference_model(tmp_path / "matryoshka")  # sae-lens saves it as a JumpReLU SAE
    db_url = f"sqlite:///{tmp_path / 'm.db'}"
    from backend.db.session import db_upgrade

    db_upgrade(db_url)
    _index([tmp_path / "matryoshka"], db_url, corpus, "matryoshka")
    run, features, edges, _ = _run_rows(db_url, "matryoshka")
    assert run.level_widths == [6, 8, 18]
    assert [(lv["features"], lv["matryoshka_group"]) for lv in run.config["levels"]] == [
        ([0, 6], 0), ([6, 14], 1), ([14, 32], 2)]
    dense = _dense(tmp_path / "matryoshka", acts)
    for level, (lo, mid, hi) in ((1, (0, 6, 14)), (2, (6, 14, 32))):
        parent, *_ = _brute_parents(dense[:, lo:mid], dense[:, mid:hi])
        got = {f.idx: -1 if f.parent_idx is None else f.parent_idx for f in features if f.level == level}
        assert [got[c] for c in range(hi - mid)] == parent.tolist()
    assert {(e.parent_level, e.child_level) for e in edges} == {(0, 1), (1, 2)}

    # one plain SAE, of another architecture sae-lens loads: a flat forest
    sae_lens.GatedSAE(sae_lens.GatedSAEConfig(d_in=576, d_sae=16, metadata=_metadata())).save_model(
        tmp_path / "gated")
    _index([tmp_path / "gated"], db_url, corpus, "flat")
    run, features, edges, relatives = _run_rows(db_url, "flat")
    assert run.level_widths == [16] and len(features) == 16 and not edges and not relatives
    assert run.config["levels"][0]["architecture"] == "gated"
    fired = (_dense(tmp_path / "gated", acts) > 0).sum(0)
    assert [f.fire_count for f in sorted(features, key=lambda f: f.idx)] == fired.tolist()


def _cli(args, capsys):
    argv = sys.argv
    sys.argv = ["hsae", "index-sae", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(cli.app)
    finally:
        sys.argv = argv
    return exit_info.value.code, capsys.readouterr().err


def test_bad_input_is_one_line_and_writes_nothing(two_widths, tmp_path, capsys):
    root = tmp_path / "bad"
    foreign = root / "foreign"
    foreign.mkdir(parents=True)
    (foreign / "weights.safetensors").write_bytes(b"")
    other_hook = _topk(root / "other-hook", 24, 3, seed=3, hook="blocks.7.hook_resid_post")
    narrow = _topk(root / "narrow", 24, 3, seed=4, d_in=100)
    not_resid = _topk(root / "attn", 24, 3, seed=5, hook="blocks.6.attn.hook_z")
    db_file = tmp_path / "never.db"
    cases = [
        ([root / "missing"], "no such folder"),
        ([foreign], "is not a sae-lens SAE folder"),
        ([two_widths[0], other_hook], "different hooks"),
        ([narrow], "the SAEs expect d_in 100"),
        ([not_resid], "is not a residual-stream output"),
        ([two_widths[0], "--layer", 99], "layer 99 is out of range"),
        ([two_widths[0], two_widths[0]], "given twice"),
    ]
    for folders, message in cases:
        args = [*folders, "--name", "bad", "--db", f"sqlite:///{db_file}", "--device", "cpu"]
        code, err = _cli(args, capsys)
        assert code == 2, err
        assert len(err.strip().splitlines()) == 1 and message in err, err
        assert err.startswith("error: ")
        assert not db_file.exists()

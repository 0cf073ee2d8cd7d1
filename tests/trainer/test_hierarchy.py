"""Hierarchy metrics on hand-made codes with known answers, streaming, and the post-hoc baseline tree."""

from __future__ import annotations

import pytest
import torch

from tests.trainer.helpers import D_IN, tiny_arch_config
from trainer.evaluate import ce_loss_recovered, evaluate, format_metrics, sae_replacement
from trainer.hierarchy import CoactivationCounts, HierarchyStats, posthoc_tree
from trainer.models import LevelCode, build_model
from trainer.outliers import encode_inliers


def code(rows: list[list[int]]) -> LevelCode:
    indices = torch.tensor(rows)
    return LevelCode(indices, (indices >= 0).float())


# 6 tokens; parents 0, 1 (width 3); children 0, 1 → parent 0, child 2 → parent 1, child 3 unassigned
PARENTS = code([[0, -1], [0, 1], [0, -1], [1, -1], [-1, -1], [2, -1]])
CHILDREN = code([[0, -1], [1, 2], [-1, -1], [-1, -1], [2, 3], [0, -1]])
PARENT_OF = torch.tensor([0, 0, 1, -1])


def test_counts_on_a_hand_made_example():
    stats = HierarchyStats([3, 4], {1: PARENT_OF})
    stats.update([PARENTS, CHILDREN])
    edges = dict(zip(stats.edges(), stats.edge_stats()))
    # child 0 fires on tokens 0 and 5; its parent 0 on tokens 0, 1, 2
    assert edges[((0, 0), (1, 0))] == dict(coactive=1, p_parent_given_child=0.5, p_child_given_parent=1 / 3)
    assert edges[((0, 0), (1, 1))] == dict(coactive=1, p_parent_given_child=1.0, p_child_given_parent=1 / 3)
    # child 2 fires on tokens 1 and 4; parent 1 on tokens 1 and 3
    assert edges[((0, 1), (1, 2))] == dict(coactive=1, p_parent_given_child=0.5, p_child_given_parent=0.5)
    parents = stats.parent_stats()
    # parent 0 active {0,1,2}; some child of 0 active {0,1,5}: they differ on tokens 2 and 5
    assert parents[(0, 0)]["hamming"] == 2 and parents[(0, 0)]["hamming_jaccard"] == pytest.approx(2 / 4)
    assert parents[(0, 0)]["p_any_child_given_parent"] == pytest.approx(2 / 3)
    # parent 1 active {1,3}; child 2 active {1,4}
    assert parents[(0, 1)]["hamming"] == 2
    assert parents[(0, 1)]["hamming_per_1k"] == pytest.approx(1000 * 2 / 6)
    summary = stats.summary()
    assert summary["edges"] == 3 and summary["parents_with_children"] == 2
    assert summary["p_parent_given_child"] == pytest.approx((0.5 + 1 + 0.5) / 3)
    assert summary["hamming_jaccard"] == pytest.approx((0.5 + 2 / 3) / 2)


def test_streamed_chunks_merge_to_the_whole():
    whole = HierarchyStats([3, 4], {1: PARENT_OF})
    whole.update([PARENTS, CHILDREN])
    first, second = HierarchyStats([3, 4], {1: PARENT_OF}), HierarchyStats([3, 4], {1: PARENT_OF})
    first.update([code(PARENTS.indices[:2].tolist()), code(CHILDREN.indices[:2].tolist())])
    second.update([code(PARENTS.indices[2:].tolist()), code(CHILDREN.indices[2:].tolist())])
    assert first.merge(second).summary() == whole.summary()
    assert first.edge_stats() == whole.edge_stats()
    with pytest.raises(ValueError, match="different trees"):
        first.merge(HierarchyStats([3, 4], {1: torch.tensor([1, 0, 1, -1])}))


def test_posthoc_tree_picks_the_most_coactive_parent():
    parents = code([[0, 1], [0, -1], [1, -1], [1, -1], [2, -1]])
    children = code([[0, -1], [0, 1], [1, -1], [1, -1], [-1, -1]])
    # child 0 co-fires with parent 0 twice and parent 1 once; child 1 with parent 1 twice, parent 0 once;
    # children 2, 3 never fire
    assert posthoc_tree(parents, children, 3, 4).tolist() == [0, 1, -1, -1]
    halves = CoactivationCounts(3, 4)
    halves.update(code(parents.indices[:2].tolist()), code(children.indices[:2].tolist()))
    halves.merge(_counts(code(parents.indices[2:].tolist()), code(children.indices[2:].tolist())))
    assert halves.best_parents().tolist() == [0, 1, -1, -1]


def _counts(parents, children):
    counts = CoactivationCounts(3, 4)
    counts.update(parents, children)
    return counts


def test_evaluate_reports_per_level_quality(arch, rows):
    model = build_model(tiny_arch_config(arch), D_IN, seed=0)
    x = torch.from_numpy(rows)
    model.prepare(x[:512])
    metrics = evaluate(model, x.split(300), max_tokens=1000)
    assert metrics["tokens"] == 1000 and len(metrics["levels"]) == len(model.level_widths)
    chunk = x[:1000]
    x_hat = model.reconstruct(chunk)
    expected = 1 - (chunk - x_hat).pow(2).sum() / (chunk - chunk.mean(0)).pow(2).sum()
    assert metrics["explained_variance"] == pytest.approx(expected.item(), abs=1e-4)
    codes = model.encode(chunk)
    for level, entry in enumerate(metrics["levels"]):
        assert entry["l0"] == pytest.approx((codes[level].indices >= 0).sum(-1).float().mean().item())
        assert 0 <= entry["dead_fraction"] <= 1
    assert len(metrics["edge_stats"]) == len(model.edges())
    table = format_metrics(metrics, baseline=metrics)
    assert "L0 explained variance" in table and len(table.splitlines()) > 5


def test_ce_loss_recovered_hook():
    model = build_model(tiny_arch_config("topk"), D_IN, seed=0)
    seen = []

    def ce_loss(replace):
        if replace is None:
            return 2.0
        h = torch.ones(2, 3, D_IN)
        out = replace(h)
        assert out.shape == h.shape
        seen.append(out)
        return 10.0 if bool((out == 0).all()) else 4.0

    result = ce_loss_recovered(ce_loss, model)
    assert result["ce_clean"] == 2.0 and result["ce_zero"] == 10.0
    assert result["ce_loss_score"] == pytest.approx((10 - 4) / (10 - 2))


def test_evaluate_leaves_massive_activations_out(rows):
    model = build_model(tiny_arch_config("moe"), D_IN, seed=0)
    x = torch.from_numpy(rows[:900])
    model.prepare(x[:512])
    massive = torch.arange(900) % 10 == 3
    blown = torch.where(massive.unsqueeze(-1), x * 300, x)
    threshold = 10 * float(blown.norm(dim=-1).median())
    with_them = evaluate(model, blown.split(256), max_norm=threshold)
    without = evaluate(model, x[~massive].split(256))
    assert with_them["outlier_rows"] == 90 and with_them["tokens"] == 810 and without["outlier_rows"] == 0
    for a, b in zip(with_them["levels"], without["levels"]):
        assert a["explained_variance"] == pytest.approx(b["explained_variance"], abs=1e-6)
        assert a["l0"] == pytest.approx(b["l0"])
    assert with_them["hierarchy"] == without["hierarchy"]
    kept_in = evaluate(model, blown.split(256))  # the default keeps every row: the massive ones dominate
    assert kept_in["tokens"] == 900 and kept_in["explained_variance"] != pytest.approx(
        without["explained_variance"], abs=1e-3
    )


def test_replacement_and_zero_ablation_pass_massive_activations_through():
    model = build_model(tiny_arch_config("topk"), D_IN, seed=0)
    hidden = torch.randn(2, 5, D_IN)
    hidden[0, 2] *= 1000
    threshold = 10 * float(hidden.norm(dim=-1).median())
    replaced = sae_replacement(model, max_norm=threshold)(hidden)
    assert torch.equal(replaced[0, 2], hidden[0, 2])
    others = torch.ones(2, 5, dtype=torch.bool)
    others[0, 2] = False
    torch.testing.assert_close(replaced[others], model.reconstruct(hidden[others]))
    seen = {}

    def ce_loss(replace):
        if replace is not None:
            seen[len(seen)] = replace(hidden)
        return 3.0 - len(seen) * 0.1

    ce_loss_recovered(ce_loss, model, max_norm=threshold)
    zero = seen[0]
    assert torch.equal(zero[0, 2], hidden[0, 2]) and bool((zero[others] == 0).all())


def test_encode_inliers_leaves_massive_activations_without_features(rows):
    model = build_model(tiny_arch_config("tree", assign_by="encoder"), D_IN, seed=0)
    x = torch.from_numpy(rows[:64]).clone()
    x[[3, 40]] *= 500
    threshold = 10 * float(x.norm(dim=-1).median())
    codes, massive = encode_inliers(model, x, threshold)
    assert massive.nonzero().flatten().tolist() == [3, 40]
    for code, plain in zip(codes, model.encode(x)):
        assert (code.indices[massive] == -1).all() and (code.values[massive] == 0).all()
        assert torch.equal(code.indices[~massive], plain.indices[~massive])

"""The methods' quality on a synthetic ground-truth hierarchy (tests/trainer/synthetic.py).

16 true parents × 4 children in d=64, two parent events per token. Every model is 2× over-complete where a
TopK SAE needs it to find all features (at exactly the true width a few latents die or merge): moe 32 parents
× 4 children, tree 32/128, and the baseline: two independently trained TopK SAEs of widths 32 and 128 with
`posthoc_tree` (each child under the parent it co-fires with most). 4,000 steps of 256 tokens each.

Matching: a learned parent is the true parent of highest decoder cosine if that cosine is ≥ 0.8 (true
parents are ≤ 0.45 apart, a true child is 0.86 from its parent); a learned child is the true child of
highest cosine if ≥ 0.9 (siblings are 0.65 apart). A tree/topk child is a whole event (parent part
included), so its decoder direction is compared; a moe child adds only its own part on top of its parent,
so its direction is that of the mean reconstruction it and its parent give while it fires.

Measured (data seed 0, model seed 0; in brackets the range over 4 seed pairs: (0,0), (1,0), (0,1), (2,2)):
  moe    edge precision 0.91, recall 0.97 (project preset: experts initialised from data, whitened
         subspaces without the parent's own direction; 0.83 and 0.92 with it; 0.89 and 0.95 with plain
         principal directions, which real activations did not survive;
         with the paper's
         random init 0.99 [0.96-1.00] and 0.81 [0.77-0.83]); P(parent|child) 1 by design,
         P(any child | parent) 0.997 over parent firings: a kept child whose leaky value is not > 0 is
         not active
  tree   edge precision 0.98 [0.98-1.00], recall 0.86 [0.73-0.92]  (the defaults: co-activation re-assignment)
         own tree:           P(parent|child) 0.975 [0.943-0.989], Hamming (Jaccard) 0.071 [0.030-0.164]
  topk + posthoc (co-activation tree): P(parent|child) 0.956 [0.940-0.981], Hamming 0.109 [0.036-0.170]
The tree's own hierarchy beats the baseline on both in 3 of 4 seed pairs; in (1,0) it loses narrowly
(0.973 vs 0.981, 0.041 vs 0.036). With the paper's encoder-cosine re-assignment it lost in 4 of 4
(P(parent|child) 0.907 [0.871-0.949], Hamming 0.142 [0.062-0.263]), and so did decoder cosine.
"""

from __future__ import annotations

import pytest
import torch

from tests.trainer.synthetic import SyntheticHierarchy, edge_recovery, make_hierarchy, match_features
from trainer.config import ArchConfig, TrainConfig
from trainer.data import TensorSource
from trainer.hierarchy import HierarchyStats, posthoc_tree
from trainer.models import HSAE, LevelCode, build_model
from trainer.train import train

pytestmark = pytest.mark.slow

STEPS = 4000
TRAIN = TrainConfig(batch_size=256, lr=1e-3, steps=STEPS, checkpoint_every=0, log_every=STEPS, progress=False)
PARENT_MATCH, CHILD_MATCH = 0.8, 0.9


@pytest.fixture(scope="module")
def truth() -> SyntheticHierarchy:
    return make_hierarchy(n_tokens=16384, d=64, n_parents=16, children=4, min_active=2, max_active=2, seed=0)


@pytest.fixture(scope="module")
def fit(truth, tmp_path_factory):
    """Trains a model on the synthetic activations with the project's own loop (one thread: the few-ms steps
    of these tiny models only lose from a second thread on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cache: dict[str, HSAE] = {}

    def fit_one(name: str, **arch) -> HSAE:
        if name not in cache:
            model = build_model(ArchConfig(**arch), truth.x_ND.shape[1], seed=0)
            run_dir = tmp_path_factory.mktemp(name)
            train(model, TensorSource(truth.x_ND), TRAIN, run_dir, model_info={"name": "synthetic"})
            cache[name] = model.eval()
        return cache[name]

    yield fit_one
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def moe(fit):
    return fit("moe", arch="moe", width=32, k=2, children=4, subspace=4, coef_warmup_steps=STEPS // 10)


@pytest.fixture(scope="module")
def tree(fit):
    return fit("tree", arch="tree", levels=[32, 128], level_k=[2, 2])


@pytest.fixture(scope="module")
def baseline(fit, truth):
    """(parent SAE, child SAE, the post-hoc tree's stats over the data)."""
    parents = fit("topk32", arch="topk", width=32, k=2)
    children = fit("topk128", arch="topk", width=128, k=2)
    x = torch.from_numpy(truth.x_ND)
    with torch.no_grad():
        codes = [parents.encode(x)[0], children.encode(x)[0]]
    stats = HierarchyStats([32, 128], {1: posthoc_tree(codes[0], codes[1], 32, 128)})
    stats.update(codes)
    return parents, children, stats


def own_stats(model: HSAE, truth: SyntheticHierarchy) -> tuple[HierarchyStats, list[LevelCode]]:
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(truth.x_ND))
    stats = HierarchyStats.for_model(model)
    stats.update(codes)
    return stats, codes


def moe_child_vectors(model: HSAE, codes: list[LevelCode]) -> torch.Tensor:
    """[W_1, D]: summed reconstruction (parent part + own part) over the tokens where each child fires."""
    parents, children = codes
    on = children.indices >= 0
    with torch.no_grad():
        atoms = torch.einsum("fcs,fsd->fcd", model.D_dec_FCS, model.P_up_FSD).reshape(-1, model.d_in)
        parts = model.W_dec_FD[parents.indices[on]] * parents.values[on, None]
        parts += atoms[children.indices[on]] * children.values[on, None]
    return torch.zeros(model.level_widths[1], model.d_in).index_add_(0, children.indices[on], parts)


def test_moe_recovers_the_true_tree(moe, truth):
    _, codes = own_stats(moe, truth)
    parents = match_features(moe.decoder_directions(0), truth.parent_dirs_PD, PARENT_MATCH)
    children = match_features(moe_child_vectors(moe, codes), truth.child_dirs_CD, CHILD_MATCH)
    precision, recall = edge_recovery(moe.edges(), parents, children, truth)
    assert precision >= 0.8 and recall >= 0.9, (precision, recall)


def test_tree_recovers_the_true_tree(tree, truth):
    parents = match_features(tree.decoder_directions(0), truth.parent_dirs_PD, PARENT_MATCH)
    children = match_features(tree.decoder_directions(1), truth.child_dirs_CD, CHILD_MATCH)
    precision, recall = edge_recovery(tree.edges(), parents, children, truth)
    assert precision >= 0.9 and recall >= 0.7, (precision, recall)


def test_baseline_recovers_features_but_not_structure_by_itself(baseline, truth):
    """The oracle's sanity: the independent SAEs do find the true features, so the comparisons below are
    about structure, not about one side failing to learn."""
    parents, children, _ = baseline
    found_parents = match_features(parents.decoder_directions(0), truth.parent_dirs_PD, PARENT_MATCH)
    found_children = match_features(children.decoder_directions(0), truth.child_dirs_CD, CHILD_MATCH)
    assert len(set(found_parents[found_parents >= 0].tolist())) >= 14
    assert len(set(found_children[found_children >= 0].tolist())) >= 40


def test_tree_levels_are_more_hierarchical_than_independent_saes(tree, truth, baseline):
    """What joint training (constraint + perturbation) buys, judged with the same co-activation tree."""
    _, codes = own_stats(tree, truth)
    stats = HierarchyStats(tree.level_widths, {1: posthoc_tree(codes[0], codes[1], *tree.level_widths)})
    stats.update(codes)
    ours, theirs = stats.summary(), baseline[2].summary()
    assert ours["p_parent_given_child"] > theirs["p_parent_given_child"]
    assert ours["hamming_jaccard"] < theirs["hamming_jaccard"]


def test_moe_hierarchy_beats_independent_saes_with_a_posthoc_tree(moe, truth, baseline):
    """P(any child | parent) is asserted over all parent firings: the summary's mean over parents weighs a
    spare latent that fires on 1 of 16,384 tokens as much as a true parent (measured: 0.997 over firings,
    0.953 as the mean over parents, pulled down by spare parents firing on 1-17 tokens)."""
    stats, codes = own_stats(moe, truth)
    ours, theirs = stats.summary(), baseline[2].summary()
    assert ours["p_parent_given_child"] > theirs["p_parent_given_child"] + 0.02
    assert ours["hamming_jaccard"] < theirs["hamming_jaccard"] - 0.02
    fired = codes[0].indices >= 0
    assert float((fired & (codes[1].indices >= 0)).sum() / fired.sum()) >= 0.98


def test_tree_hierarchy_beats_independent_saes_with_a_posthoc_tree(tree, truth, baseline):
    """The tree the model trains with (co-activation re-assignment, constraint, perturbation) against the
    same kind of tree drawn over two independently trained SAEs."""
    ours = own_stats(tree, truth)[0].summary()
    theirs = baseline[2].summary()
    assert ours["p_parent_given_child"] > theirs["p_parent_given_child"]
    assert ours["hamming_jaccard"] < theirs["hamming_jaccard"]

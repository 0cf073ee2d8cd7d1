"""Both hierarchical architectures with the project's defaults, judged on every generator of the synthetic
family, 3 seeds each.

Only the sizes a user would give are set (`HierarchySpec.model_sizes`, FAMILY_STEPS = 1500 steps of 1024);
the rest is the project preset, composed exactly as `hsae train` composes it. A true feature is found when a
learned latent's firing rows have IoU >= 0.5 with it (trainer/synthetic.py). The models train in parallel,
one single-threaded process per core (about 5 minutes on two cores). The floors below sit under the worst
of the 3 seeds measured for each generator (see bench/bench_family.py for the ablation and the paper preset):

  moe          parents          children         edge precision    (seeds 0 / 1 / 2, this 2-core CPU)
  centred      1.00 1.00 1.00   0.98 0.95 0.98   0.98 0.98 0.94
  leaning      1.00 1.00 1.00   1.00 1.00 1.00   1.00 1.00 1.00
  uneven       0.92 0.79 0.83   0.90 0.62 0.74   0.97 0.95 0.95
  raw-scale    1.00 1.00 1.00   0.99 1.00 1.00   1.00 1.00 1.00
  orthogonal   1.00 1.00 1.00   0.93 0.94 0.93   0.96 0.94 0.90
  close        1.00 1.00 1.00   0.74 0.82 0.81   1.00 1.00 1.00
  tree
  centred      1.00 1.00 1.00   1.00 1.00 0.97   0.97 0.97 0.94
  leaning      1.00 1.00 1.00   0.95 1.00 0.96   1.00 0.99 1.00
  uneven       1.00 0.83 0.88   0.95 0.78 0.86   0.98 0.93 0.91
  raw-scale    1.00 1.00 1.00   0.96 0.99 0.98   1.00 1.00 1.00
  orthogonal   0.95 1.00 1.00   1.00 1.00 1.00   0.89 0.89 0.93
  close        1.00 1.00 1.00   0.92 0.96 0.86   1.00 1.00 1.00

The issue's goal (>= 0.9 children, >= 0.95 parents, edge precision >= 0.9 on every generator) is met by the
MoE on `centred`, `leaning`, `raw-scale` and `orthogonal`, and by the tree on `centred`, `leaning` and
`raw-scale`. What is left: the MoE's `uneven` (rare parents share top-level latents while the most frequent
one keeps some of its children beside it at the top level, and up to 8 children share a 4-dimensional expert
subspace) and `close` (an expert with fewer true children than slots splits some of them over two slots);
the options of bench/bench_family.py's "+" rows (a late expert round, blind read-outs, split children
merged, promoted children freed) take the MoE's `close` to 0.92 / 1.00 / 0.88 and `uneven` to 0.94 / 0.75 /
0.83, but cost 0.03 of explained variance on SmolLM2 (0.774 -> 0.742), so they are not defaults. The tree's
`uneven` parents lose to its TopK top level (k = 3 fires 3 latents on rows with 1-3 events) and its
`orthogonal` edges to spare top latents that absorb one child's pattern. The budget is 1500 steps so that CI
stays near 15 minutes.
"""

from __future__ import annotations

import dataclasses

import pytest

from trainer.synthetic import FAMILY, Job, Recovery, judge_in_parallel

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
# (arch, generator) -> (parents, children, edge precision) that every seed must reach
FLOORS = {
    ("moe", "centred"): (0.95, 0.9, 0.9),
    ("moe", "leaning"): (0.95, 0.95, 0.95),
    ("moe", "uneven"): (0.75, 0.6, 0.9),
    ("moe", "raw-scale"): (0.95, 0.95, 0.95),
    ("moe", "orthogonal"): (0.95, 0.9, 0.88),
    ("moe", "close"): (0.95, 0.7, 0.95),
    ("tree", "centred"): (0.95, 0.95, 0.9),
    ("tree", "leaning"): (0.95, 0.9, 0.95),
    ("tree", "uneven"): (0.8, 0.7, 0.85),
    ("tree", "raw-scale"): (0.95, 0.9, 0.95),
    ("tree", "orthogonal"): (0.9, 0.95, 0.85),
    ("tree", "close"): (0.95, 0.8, 0.95),
}
PAPER_VS_PROJECT = "leaning"


@pytest.fixture(scope="module")
def judged() -> dict[tuple[str, str, int, str], Recovery]:
    """Every model this module judges, trained once: (arch, generator, seed, preset) -> recovery."""
    jobs = [Job(spec.name, arch, seed) for arch in ("moe", "tree") for spec in FAMILY for seed in SEEDS]
    jobs += [Job(PAPER_VS_PROJECT, arch, 0, "paper") for arch in ("moe", "tree")]
    results = judge_in_parallel(jobs)
    return {(j.arch, j.generator, j.seed, j.preset): r for j, r in zip(jobs, results)}


@pytest.mark.parametrize("arch", ["moe", "tree"])
@pytest.mark.parametrize("spec", FAMILY, ids=[s.name for s in FAMILY])
def test_defaults_recover_the_tree_of_every_generator(judged, arch, spec):
    results = [judged[arch, spec.name, seed, "project"] for seed in SEEDS]
    print(arch, spec.name, [dataclasses.asdict(r) for r in results])
    parents, children, precision = FLOORS[arch, spec.name]
    for r in results:
        assert r.parents_found >= parents and r.children_found >= children, r
        assert r.edge_precision >= precision, r


@pytest.mark.parametrize("arch", ["moe", "tree"])
def test_project_preset_finds_the_children_the_paper_preset_loses(judged, arch):
    """The independent hierarchy of issue 11 (leaning children with their own magnitudes), seed 0: the
    paper's settings found 0.02 (moe) and 0.01 (tree) of the children, the project's 0.99 and 0.95."""
    ours = judged[arch, PAPER_VS_PROJECT, 0, "project"]
    paper = judged[arch, PAPER_VS_PROJECT, 0, "paper"]
    assert ours.children_found >= paper.children_found + 0.4, (ours, paper)
    assert ours.parents_found >= paper.parents_found - 0.05, (ours, paper)

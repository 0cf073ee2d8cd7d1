"""The MoE H-SAE with the project's defaults, judged on every generator of the synthetic family, 3 seeds each.

Only the sizes a user would give are set (`HierarchySpec.model_sizes`, 3000 steps of 1024); the rest is the
project preset, composed exactly as `hsae train` composes it. A true feature is found when a learned latent's
firing rows have IoU ≥ 0.5 with it (trainer/synthetic.py). The floors below sit under the worst of the 3 seeds
measured for each generator (see bench/bench_family.py for the ablation and the paper preset):

  generator    parents          children         edge precision    (seeds 0 / 1 / 2, this 2-core CPU)
  centred      0.81 1.00 0.88   0.66 0.83 0.78   0.93 0.94 0.84
  leaning      1.00 1.00 1.00   0.98 0.77 0.79   1.00 1.00 1.00
  uneven       0.96 0.79 0.96   0.84 0.67 0.81   0.99 0.95 0.95
  raw-scale    0.97 1.00 1.00   0.96 1.00 1.00   1.00 1.00 1.00
  orthogonal   0.90 0.90 1.00   0.77 0.79 0.80   0.90 0.93 0.95
The issue's goal (≥ 0.9 children, ≥ 0.95 parents on every generator) is not reached yet on `centred` and
`orthogonal`, where spare parents split a true parent between them; those floors say what holds today.
"""

from __future__ import annotations

import dataclasses

import pytest

from trainer.synthetic import FAMILY, Recovery, make, train_and_judge

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
STEPS, BATCH, ROWS = 3000, 1024, 60_000
# generator -> (parents, children, edge precision) that every seed must reach
FLOORS = {
    "centred": (0.75, 0.6, 0.8),
    "leaning": (0.95, 0.7, 0.95),
    "uneven": (0.75, 0.6, 0.9),
    "raw-scale": (0.95, 0.9, 0.95),
    "orthogonal": (0.85, 0.7, 0.85),
}


def fit_and_judge(spec, seed: int, preset: str) -> Recovery:
    return train_and_judge(make(spec, ROWS, seed=seed), "moe", seed, preset=preset, steps=STEPS, batch=BATCH)


@pytest.mark.parametrize("spec", FAMILY, ids=[s.name for s in FAMILY])
def test_moe_defaults_recover_the_tree_of_every_generator(spec):
    results = [fit_and_judge(spec, seed, "project") for seed in SEEDS]
    print(spec.name, [dataclasses.asdict(r) for r in results])
    parents, children, precision = FLOORS[spec.name]
    for r in results:
        assert r.parents_found >= parents and r.children_found >= children, r
        assert r.edge_precision >= precision, r


def test_project_preset_finds_the_children_the_paper_preset_loses():
    """The independent hierarchy of issue 11 (leaning children with their own magnitudes): the paper's
    settings found 0.14 of the children, the project's 0.98 (seed 0)."""
    spec = next(s for s in FAMILY if s.name == "leaning")
    ours = fit_and_judge(spec, 0, "project")
    paper = fit_and_judge(spec, 0, "paper")
    assert ours.children_found >= paper.children_found + 0.4, (ours, paper)
    assert ours.parents_found >= paper.parents_found - 0.05, (ours, paper)

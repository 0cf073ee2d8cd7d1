"""Both hierarchical architectures with the project's defaults, judged on every generator of the synthetic
family, 3 seeds each.

Only the sizes a user would give are set (`HierarchySpec.model_sizes`, FAMILY_STEPS = 1500 steps of 1024);
the rest is the project preset, composed exactly as `hsae train` composes it. A true feature is found when a
learned latent's firing rows have IoU >= 0.5 with it (trainer/synthetic.py). The models train in parallel,
one single-threaded process per core (about 5 minutes on two cores). The floors below sit under the worst
of the 3 seeds measured for each generator (see bench/bench_family.py for the ablation and the paper preset):

  moe          parents          children         edge precision    (seeds 0 / 1 / 2, this 2-core CPU)
  centred      1.00 1.00 1.00   1.00 1.00 1.00   1.00 1.00 1.00
  leaning      0.96 1.00 1.00   0.94 1.00 1.00   0.99 1.00 1.00
  uneven       1.00 1.00 1.00   0.98 1.00 0.96   1.00 1.00 1.00
  raw-scale    1.00 1.00 1.00   1.00 1.00 1.00   1.00 1.00 1.00
  orthogonal   1.00 1.00 1.00   1.00 0.96 0.97   0.99 1.00 1.00
  close        1.00 1.00 1.00   0.98 0.95 0.99   1.00 1.00 1.00
  tree
  centred      1.00 1.00 1.00   0.98 1.00 0.98   0.98 1.00 0.90
  leaning      0.96 1.00 1.00   0.96 1.00 1.00   0.99 0.99 1.00
  uneven       1.00 1.00 1.00   1.00 0.98 0.98   1.00 0.99 1.00
  raw-scale    1.00 1.00 1.00   0.99 0.99 1.00   1.00 1.00 1.00
  orthogonal   1.00 1.00 1.00   1.00 0.99 1.00   0.95 0.97 0.95
  close        1.00 1.00 1.00   0.97 1.00 0.97   1.00 1.00 1.00

The offset subtracted before coding (`center_quantile`: the 5% quantile along the mean's direction instead of
the mean, whose share of a frequent feature the top level had covered with an anti-feature latent) took the
worst seed of `uneven` from parents 0.79 / children 0.62 (MoE) and 0.83 / 0.78 (tree) to 0.96 / 0.88 and
0.92 / 0.84, and the tree's `close` from 0.86 to 0.92; over all 18 runs the MoE's mean children went from 0.91
to 0.92. Elsewhere seeds moved both ways: the MoE's `close` seed 2 fell from 0.81 to 0.66 of the children and
its `orthogonal` seed 0 from 0.93 to 0.89, the tree's `centred` seed 2 to parents 0.94 / edges 0.86, and those
floors were lowered to match (the `uneven` ones raised).

Two changes of the next session moved the table to the figures above. An expert's subspace is orthogonal to
its parent's decoder row after whitening, not only before (whitening had tilted it back by up to cosine 0.8,
and the expert read the parent's own value: whole experts sent their true children to one slot), and top-level
fragments count as firing together only where both fire with at least half their mean value (TopK k = 2 picks
a fragment weakly beside its twin on 4-13% of the rows, which had blocked every merge on `centred`).
The MoE's worst seed of `close` went from 0.66 to 0.77 of the children and of `centred` from 0.94 to 0.97,
the tree's `centred` parents / edges from 0.94 / 0.86 to 1.00 / 0.94; the MoE's `uneven` seed 2 fell from
0.88 to 0.84 and its `orthogonal` edges to 0.89, and the tree's `orthogonal` edges moved both ways (0.90 /
0.96 / 0.86 to 0.93 / 0.91 / 0.88). Over the 18 runs the MoE's mean children went from 0.922 to 0.924,
the tree's stayed 0.95. Then the MoE's starved children were revived at 70% and 85% of the run
(`revive_children_at`, for SmolLM2's dead children): mean 0.927, `orthogonal` edges 0.89 -> 0.93 on seed 2,
and every expert redone at each round with clusters cut in two merged (`expert_reinit` all,
`child_separation` 2): mean 0.938, worst seed 0.83 (`close`). Then a polish round at 80% of the run
(`polish_at`: parents refitted, each expert redone only where its fresh version reconstructs its tokens
better, nothing merged at the top level), since training had taken `close`'s children apart again after
the last round: mean 0.966, `close` 0.83 / 0.89 / 0.84 -> 0.98 / 1.00 / 0.92. And at each round but the
last, top-level latents that fire on no sample token are re-seeded (`reseed_dead_parents`; on `close` seed 2
nine of 24 were dead and one latent held two true parents): the worst parents 0.94 -> 0.96 (`close` 1.00 on
every seed), mean children 0.967, `orthogonal` seed 1 0.97 -> 0.91 and `centred` seed 0 edges 0.98 -> 0.94,
the table above.

The tree's table changed with a floor under its TopK codes (`min_activation` 0.25: a latent fires only at a
quarter of its level's median firing value or more). TopK fills all k slots on every token, and on `uneven`
(1-3 events per row, k = 3) a quarter of the top level's firings matched no feature of the row, at a tenth
of a true firing's value: `uneven` went from parents 0.96 / 0.92 / 0.92 and children 0.92 / 0.84 / 0.92 to
the table's, mean children over the 18 runs 0.954 -> 0.974. Seeds moved both ways elsewhere: `leaning` seed
0 0.93 -> 0.89 (two true parents share one top latent there), `orthogonal` edges 0.93 / 0.91 / 0.88 -> 0.91 /
0.91 / 0.87, `close` children 0.95 / 0.92 / 0.92 -> 1.00 / 0.97 / 0.97.

Then the tree's later child round (60% of the run) redid every parent's children, not only those of parents
with a starved child (`child_reinit` "all"): a rare parent's latent that still held a mixture at the first
round had its children cut along the mixture, none starved, and they stayed unmatched. Mean children over the
18 runs 0.974 -> 0.995, `leaning` seed 0 0.89 -> 0.97, `uneven` 1.00 / 0.91 / 0.95 -> 1.00 / 0.98 / 0.99,
`close` 1.00 everywhere; edges and parents within 0.01. The tree's children floors went to 0.95 everywhere.

The models train with their CPU kernels pinned to AVX2 (`trainer.synthetic.PINNED_KERNELS`): on an AVX-512
machine, before the pin, the MoE's `centred` seed 0 found 0.94 of the children (1.00 with AVX2) and the tree's
`uneven` seed 1 (before `child_reinit`) 0.82 (0.91): the same training, rounded differently, ends in another
of its nearby optima, and a floor set just under one machine's figure failed on the other. Pinned, the MoE's
figures above came within 0.03 of the earlier AVX2 machine's (`uneven` seed 2 edge precision 0.97 -> 0.95,
whose floor went to the goal's 0.9).

And after the last child round the tree's re-assignments merge top-level fragments from cosine 0.4
(`late_merge_cos`): on `orthogonal` the top level had split parents again into "parent + one child" latents
(cosine 0.45-0.49 with the parent's main latent, just under `merge_cos`), whose children hung from latents
that match no parent: edge precision 0.91 / 0.91 / 0.88 -> 0.95 / 0.96 / 0.95, parents 1.00 / 0.95 / 1.00 ->
1.00 everywhere; nothing merged on the other generators.

Then the MoE's fragments of one parent also count as such where they fire together on at most half the rows
chance would give them (`merge_lift` 0.5; "almost never" was too strict beside a parent on 47% of the rows):
`uneven` seed 2 0.879 -> 0.902, every other run the same (both measured pinned on one machine), the table
above. (Re-measured then, the tree's `centred` seed 2 was at edge precision 0.905 and children 0.98.)

Then the latents a MoE round frees (promoted children, dead parents, the second of a merged pair) are
re-seeded after the round's repairs, on what the repaired model leaves unexplained, and the polish round
merges fragments too, from cosine 0.4 (`late_merge_cos`, the merged latent keeping the sum of the pair's
encoders): the table as it was then. `orthogonal` 0.91 / 0.91 / 0.95 -> 0.99 / 1.00 / 1.00, `centred` edges
0.94 -> 1.00, `uneven` 0.97 / 0.91 / 0.90 -> 0.95 / 0.94 / 0.91, `close` seed 1 0.96 -> 1.00. Over seeds 0-5
of five of these generators and three more (README, "Six seeds") mean children 0.943 -> 0.953.

Then only the merged pairs' freed latents wait for the repairs; promoted children and dead parents are
re-seeded at once again (parked, dead latents missed a latent holding two true parents on `noisy` and
`rawmix`, generators built apart from this family), and the polish round's merged encoder is kept at
`merge_pair`'s norm: the table above. `centred` seed 0 1.00 -> 0.97, `close` 0.98 / 1.00 / 1.00 -> 0.97 /
0.96 / 0.97, `uneven` 0.95 / 0.94 / 0.91 -> 0.96 / 0.92 / 0.88, `orthogonal` seed 2 1.00 -> 0.99; over seeds
0-5 of eight generators and 0-2 of five more (README, "Re-seeding order") mean children 0.959 -> 0.962.

And the tree re-seeds its dead top latents at each child round (`reseed_dead_parents`, for parents lost on
`noisy` and `zipfhi`, generators built apart from this family): `raw-scale` seed 2 parents 0.97 -> 1.00,
children moved by up to 0.03 (`close` 1.00 / 1.00 / 1.00 -> 0.97 / 1.00 / 0.97, `leaning` seed 0 0.97 ->
0.96).

Then the MoE's expert subspace is left to the preset (`model_sizes` gave 4): as many dimensions as the
children, at most 8 (`config.subspace_for`), since a parent's children all lie in its s dimensions and 7-8
nearly orthogonal children do not fit in 4. `uneven` (8 children) 0.96 / 0.92 / 0.88 -> 0.99 / 0.96 / 0.96,
`close` (6) 0.97 / 0.96 / 0.97 -> 1.00 / 1.00 / 0.99, `orthogonal` (6) 0.99 / 1.00 / 0.99 -> 1.00 / 0.96 /
0.97, `raw-scale` (5) the same; `uneven`'s parents 1.00 / 1.00 / 0.96 -> 0.96 / 0.96 / 1.00. The MoE's
`uneven` children floor went from 0.85 to the goal's 0.9. And a live top latent that holds two parents
gives its smaller half to a spare latent at the rounds that re-seed dead ones (`split_mixed_parents`): the
table above; `uneven` parents 0.96 / 0.96 / 1.00 -> 1.00 everywhere and children 0.99 / 0.96 / 0.96 -> 0.98 /
1.00 / 0.96, `centred` 0.97 -> 1.00 (seed 0), `close` 1.00 / 1.00 / 0.99 -> 0.98 / 0.95 / 0.99, `leaning`
seed 0 0.95 -> 0.94.

The issue's goal (>= 0.9 children, >= 0.95 parents, edge precision >= 0.9 on every generator) is met by both
architectures on every generator at these seeds. The budget is 1500 steps so that CI stays near 15 minutes.
"""

from __future__ import annotations

import dataclasses

import pytest

from trainer.synthetic import FAMILY, Job, Recovery, judge_in_parallel

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
# (arch, generator) -> (parents, children, edge precision) that every seed must reach
FLOORS = {
    ("moe", "centred"): (0.95, 0.95, 0.95),
    ("moe", "leaning"): (0.95, 0.9, 0.95),
    ("moe", "uneven"): (0.95, 0.9, 0.9),
    ("moe", "raw-scale"): (0.95, 0.95, 0.95),
    ("moe", "orthogonal"): (0.95, 0.95, 0.95),
    ("moe", "close"): (0.95, 0.9, 0.95),
    ("tree", "centred"): (0.95, 0.95, 0.9),
    ("tree", "leaning"): (0.95, 0.95, 0.95),
    ("tree", "uneven"): (0.95, 0.95, 0.95),
    ("tree", "raw-scale"): (0.95, 0.95, 0.95),
    ("tree", "orthogonal"): (0.95, 0.95, 0.9),
    ("tree", "close"): (0.95, 0.95, 0.95),
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
    paper's settings found 0.02 (moe) and 0.01 (tree) of the children, the project's 0.95 and 0.97 (the
    table above)."""
    ours = judged[arch, PAPER_VS_PROJECT, 0, "project"]
    paper = judged[arch, PAPER_VS_PROJECT, 0, "paper"]
    assert ours.children_found >= paper.children_found + 0.4, (ours, paper)
    assert ours.parents_found >= paper.parents_found - 0.05, (ours, paper)

"""Typed, validated configuration for the HSAE architectures and their training: the one source of defaults.

Paper defaults are kept where they do not depend on scale (coefficients, thresholds, clip, betas); sizes are
scaled down so that a default run fits a laptop CPU. `None` in a size field means "the architecture's
default", resolved in `__post_init__`, so the CLI, a config file and the API all read the same objects.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from trainer.errors import HSAEError

ARCHES = ("moe", "tree", "topk")


class ConfigError(HSAEError, ValueError):
    """A configuration value is invalid; the message is one line naming the field and the problem."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _from_dict(cls, data: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    _check(not unknown, f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    try:
        return cls(**data)
    except TypeError as err:  # a missing required field
        raise ConfigError(f"{cls.__name__}: {err}") from None


@dataclass
class ArchConfig:
    """Which HSAE to train and its sizes and loss coefficients."""

    arch: Literal["moe", "tree", "topk"] = "moe"
    """`moe` (MoE H-SAE, arXiv 2506.01197), `tree` (Tree HSAE, arXiv 2602.11881) or `topk` (flat TopK SAE)."""

    preset: Literal["project", "paper"] = "project"
    """Which defaults the other fields started from (see `PRESETS`): `project`, chosen by measurement over a
    family of synthetic hierarchies (bench/bench_family.py), or `paper`, each paper's own settings."""

    width: int | None = None
    """Number of latents of a flat `topk` SAE, or number of parents of `moe` (default 4096 / 1024).
    `tree` takes `levels` instead."""

    k: int | None = None
    """Active latents per token at the top level (`moe`: active parents, each with one child). Default 32."""

    children: int = 16
    """`moe`: children per parent (paper: 16 with subspace 4, or 64 with subspace 8)."""

    subspace: int | None = None
    """`moe`: dimension s of each parent's expert subspace. Default (`subspace_for`): as many dimensions as
    children, at most 8 (project preset); the paper's 4, or 8 from 64 children (paper preset). A child's atom
    lies in its parent's s dimensions, so s < C children that point apart cannot all be told from each
    other: on the synthetic family, parents of 8 nearly orthogonal children found 0.92 of them at s = 4 and
    0.97-1.00 at s = 8 (README, "Expert subspace as wide as the children")."""

    levels: list[int] | None = None
    """`tree`: level widths, top to bottom, strictly increasing (default 512,1024,2048,4096; paper 2k-16k)."""

    level_k: list[int] | None = None
    """`tree`: TopK k of each level (default `k` at every level; the paper steers every level's L0 to 50)."""

    min_activation: float = 0.0
    """`tree` with TopK levels: a latent among a token's top k fires only where its value is at least this
    share of the median value of its level's firings (0 = plain TopK, the paper; the project preset: 0.25).
    The floors are fitted on the sample of every re-assignment and child initialisation (0 before the first)
    and saved with the weights. Why: TopK fills all k slots on every token, and a token with fewer features
    than k gets the rest as weak, spurious firings. On the synthetic family's `uneven` (1-3 parent events
    per row, k = 3), 24% of the top level's firings and 31% of the child level's matched no feature of their
    row, at a tenth of a true firing's value (median 0.7 against 6.7), and halved the IoU of rare parents'
    latents. With the floor, `uneven` went from parents 0.96 / 0.92 / 0.92 and children 0.92 / 0.84 / 0.92
    to 1.00 / 1.00 / 1.00 and 1.00 / 0.91 / 0.95 (3 seeds; 0.15 and 0.2 did worse). A share, not a fixed
    value: a floor of 1 (1/sqrt(d) of a mean token, the MoE's θ) fixed `uneven` as well, but on SmolLM2,
    whose tokens hold many weak features, it silenced 16% / 34% of the two levels' firings of a trained tree;
    a quarter of the median silences none there (their 5% quantile is 0.55x the median). sae-lens has no
    TopK with a floor: a level exports as plain TopK with its floor in the metadata (`hsae_min_activation`),
    and sae-lens then also reports the firings below it."""

    activation: Literal["topk", "jumprelu"] = "topk"
    """`tree`: each level's activation: TopK (`level_k` active latents on every token), or JumpReLU as in
    the paper, a learnt threshold per latent and an adaptive penalty λ_l·L0 that steers the level's mean L0
    to `target_l0` (trainer/models/jumprelu.py)."""

    target_l0: list[float] | None = None
    """`tree` with `activation=jumprelu`: the mean L0 each level is steered to, top to bottom (default
    `level_k`; the paper: 50 at every level)."""

    lambda_rate: float = 1e-3
    """`tree` with jumprelu: η of the adaptive sparsity coefficient, λ_l += η·(EMA of L0_l − target_l) after
    every step (the paper's 0.001)."""

    lambda_ema: float | None = None
    """`tree` with jumprelu: the decay β of the L0 average the controller reads. None = the paper's 0.999,
    or 1 − 20/steps when the run is shorter than 20,000 steps (a lag of 1000 steps would overshoot)."""

    lambda_init: float = 0.0
    """`tree` with jumprelu: λ_l at the start (thresholds start from data at the target L0)."""

    bandwidth: float = 0.05
    """`tree` with jumprelu: width ε of the rectangle kernel of the straight-through estimators of the
    thresholds (sae-lens's default; normalised inputs have mean norm sqrt(d))."""

    rho: float = 0.01
    """`tree`: weight of the parent = sum-of-children constraint."""

    perturb_rate: float = 0.05
    """`tree`: probability that an active parent's contribution is replaced by the sum of its children's."""

    reassign_every: int | None = None
    """`tree`: optimizer steps between re-assignments of every child to its best parent (see `assign_by`);
    the first assignment happens then too. None = the paper's 5000, or a tenth of the run if shorter."""

    assign_by: Literal["coactivation", "encoder", "decoder"] = "coactivation"
    """`tree`: how a child picks its parent at each re-assignment: the parent it fires with most often
    (P(parent | child) over `reassign_tokens` training rows encoded by the current model), or the parent
    whose encoder (the paper's main text) or decoder vector is most cosine-similar. The paper's ablation
    found the three equivalent; on the synthetic hierarchy of the tests co-activation gives the better
    tree."""

    reassign_tokens: int = 16384
    """Training rows encoded at each re-assignment (`tree` with `assign_by=coactivation`: to count
    co-activations) or expert re-initialisation (`moe`); all rows if there are fewer."""

    unassigned_fraction: float = 0.2
    """`tree`: the fraction of children with the lowest best-parent score (P(parent | child) or cosine) that
    stay unassigned; children that never fired with any parent stay unassigned too."""

    l1_coef: float = 1e-3
    """`moe`: L1 penalty on parent and child codes (warmed up)."""

    child_l1: Literal["kept", "all"] = "kept"
    """`moe`: which child codes the L1 sees: the kept child of each active parent (the codes that reach the
    reconstruction), or, as the authors' code, every child of every selected expert (`all`)."""

    center: bool = True
    """`moe`: subtract the offset the tokens share (`center_quantile`, then `fold_density`) before scaling
    each token to unit norm. The paper does not centre; without it the shared mean direction of real
    activations is one parent that fires on almost every token."""

    center_quantile: float | None = 0.05
    """`moe` (the subtracted offset) and `tree` (every level's initial decoder bias): along the sample mean's
    direction, this quantile of the tokens' projections; None = the mean itself (before this field). The
    mean also holds each frequent feature's share, and subtracting it leaves the tokens without that feature
    an "anti-feature" the top level learns as one more latent (trainer/models/base.py, `shared_offset`).
    Measured over the synthetic family (3 seeds, 1,500 steps), the MoE's worst seed of `uneven` went from
    0.79 to 0.96 of the parents and 0.62 to 0.88 of the children, the tree's from 0.83 to 0.92 and 0.78 to
    0.84 (tests/trainer/test_family_quality.py has every seed). It is one scalar along one direction: with a
    large real offset it keeps most of the frequent features' share. On SmolLM2, where the tokens vary
    densely along the mean's direction, the MoE falls back to the mean (`fold_density`)."""

    fold_density: float = 0.5
    """`moe` with `center`: at the first expert initialisation, if some top-level latent fires on more than
    this share of the sample's tokens, the offset falls back to the sample's mean and those latents are
    re-seeded: the tokens vary densely along the mean's direction (real residual streams), and a root on
    nearly every token means nothing (`fold_dense_parents`). 1 = never. On the synthetic family it never
    fires; on SmolLM2 it does, and there the MoE ends within 0.001 of the mean-centred one's explained
    variance (0.816 against 0.817) with 9.5% of its children dead against 6.2%."""

    expert_init_at: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5])
    """`moe`: fractions of the run at which experts are re-initialised from data (top-s principal directions
    of what their parent leaves unexplained, children by spherical k-means in that subspace); which experts,
    see `expert_reinit`. Empty = never (the paper: random init only). A late round (0.8) with
    `expert_reinit="all"` and `child_separation=2` finds more children on the synthetic family (the worst seed
    of `close` 0.74 -> 0.88, of `uneven` 0.58 -> 0.75), since children found on parents that were still
    moving drift apart again; on SmolLM2 the same settings (with blind read-outs and promoted children freed)
    cost 0.03 of eval explained variance (0.774 -> 0.742 in one session, bench/bench_real.py): redone
    late, experts that partition a continuum do not recover in the 20% of the run left. So the late round is
    an option, not a default (README, "Presets"); every expert redone and split clusters merged at the rounds
    up to 50% are defaults (`expert_reinit`)."""

    revive_children_at: list[float] = field(default_factory=lambda: [0.7, 0.85])
    """`moe`: fractions of the run at which starved children (less than 1/(4C) of their expert's sample
    tokens) are re-seeded on what their expert's tokens leave unexplained, every other weight kept
    (`revive_children`), as dead latents are resampled. Empty = never (the paper). After the last expert
    round children can starve with half the run left and nothing brings them back: on SmolLM2
    (`bench/bench_real.py`, one data folder) 10.2% of the children were dead at the end, 5.8% with the two
    revivals, explained variance and CE loss score unchanged (0.777, 0.981); on the synthetic family (3 seeds)
    children found went from 0.924 to 0.927 on average and the worst `orthogonal` edge precision from 0.89
    to 0.93."""

    polish_at: list[float] = field(default_factory=lambda: [0.8])
    """`moe`: fractions of the run at which the parents' decoder rows are refitted and each expert is
    redone from data as at an `expert_init_at` round, but only where the fresh expert reconstructs its
    tokens better than the trained one; top-level fragments are merged only from `late_merge_cos`, nothing
    else is freed. Empty = never (the paper).

    Why: after the last round, training takes children apart again: the read-out P↓ is shared by an
    expert's children, each child's gradient moves it along the parent's direction (present on every
    token of the expert), and siblings then win each other's tokens; parents' rows lean towards one child
    again. On the synthetic family's `close` generator (seed 0) a run stopped just after the last round
    (the rounds' schedule kept) found 0.97 of the children, 0.98 at 1,000 steps, 0.83 at the end of 1,500;
    with P↓ held fixed after the last round `close` kept 0.95 / 1.00 / 0.93 (seeds 0-2), but `uneven`
    (up to 8 children in 4 dimensions: P↓ must keep learning) fell to 0.83. With the polish round at 80%
    (3 seeds, 1,500 steps) the family's mean
    went from 0.938 to 0.966, `close` from 0.83 / 0.89 / 0.84 to 0.98 / 1.00 / 0.92, `orthogonal`'s worst
    seed 0.88 -> 0.91, no generator's worst seed lower. Redoing every expert (no guard) found fewer on the
    family (mean 0.958, `orthogonal` 0.88 / 0.94 / 0.88) and cost SmolLM2 0.03 of eval
    explained variance (0.816 -> 0.784, `bench/bench_real.py`): there experts that partition a continuum
    do not recover; with the guard they keep their weights (0.815, CE loss score 0.983 both, dead children
    7.0% -> 6.4%)."""

    reseed_dead_parents: bool = True
    """`moe`: at each `expert_init_at` round but the last, top-level latents that fire on none of the
    sample's tokens are re-seeded on the residuals of badly reconstructed tokens (as dead latents are
    resampled) and their experts redone. Not at the last round: a latent re-seeded then has no round left
    to be merged if it takes a child from its parent (on `orthogonal` seed 1, children 0.97 -> 0.84 when
    the last round re-seeded too). On the synthetic family (3 seeds) the worst parents went from 0.94 to
    0.96 (`close` seed 2: 0.94 -> 1.00, one latent had held two true parents with 9 of 24 dead) and mean
    children from 0.966 to 0.967. False = never (the paper).

    `tree`: at every `child_init_at` round, the top level's latents that fire on none of the sample's rows
    are re-seeded the same way before the children are redone (the paper has no such rounds). Over 13
    synthetic generators x 3 seeds (README) the worst parents went from 0.91 to 0.96 (`zipfhi` seed 0 0.91
    -> 0.97, `noisy` seed 1 0.92 -> 0.96, where two true parents had shared one latent), mean children
    0.986 -> 0.981; re-seeding at the first round only kept the children (0.989) but not the parents
    (0.91). On SmolLM2 (levels 1024 / 4096, 400 steps) no top latent was dead at either round."""

    split_mixed_parents: bool = True
    """`moe`: at the rounds of `reseed_dead_parents`, live top-level latents that hold two parents
    (`moe.mixed_parents`: the two halves of what a latent and its child explain nearly orthogonal) take
    them first: the latent keeps its larger half's direction, a spare latent (dead, or on under 0.1% of the
    sample's tokens) takes the smaller's. Over 13 synthetic generators x 3 seeds and 8 x 3 more (README,
    "Mixed parents split"): mean children 0.978 -> 0.984, parents under 0.95 in 2 -> 1 of 63 runs; SmolLM2
    unchanged (no spare parents at its rounds). False = dead latents only go to badly reconstructed tokens
    (the paper: never)."""

    expert_reinit: Literal["all", "starved"] = "all"
    """`moe`: which experts the rounds after the first redo: every expert, or only those with a starved child
    (one that takes less than 1/(4C) of its expert's tokens). A parent can swallow one of its children (its
    decoder row leans towards that child, whose tokens then scatter over every slot), and an expert whose
    child was cut over several slots at the first round (parents still moving): neither has a starved child.
    With `child_separation` 2 (both the default since the session of 2026-12-06; the rounds stay at 10%, 30%
    and 50%), the family's children found went from 0.927 to 0.938 on average and its worst seed from 0.78 to
    0.83 (`close`; `uneven` 0.86 -> 0.88, `orthogonal` 0.89 -> 0.88-0.97, `leaning` 0.94 -> 0.95), and on
    SmolLM2 (one data folder) explained variance 0.777 -> 0.776, CE loss score 0.981 -> 0.982, dead children
    5.8% -> 7.3%."""

    refit_parents: bool = True
    """`moe`: before each expert initialisation, move every parent's decoder row towards the least-squares
    direction of what it reconstructs (the mean of its tokens' residual plus its own part, one Jacobi step
    over the sample, line-searched): the centre of its children, not one of them. On SmolLM2 it took eval
    explained variance from 0.774 to 0.778 and dead children from 8.9% to 7.1%; on the family the worst seed
    from 0.58 to 0.62 of the children, the mean unchanged (0.91)."""

    expert_blind_to_parent: bool = False
    """`moe`: keep each expert's read-out P↓_j orthogonal to its parent's decoder row d_j (projected after
    every optimizer step, as unit-norm decoders are), so that which child wins depends on what sets siblings
    apart, never on how strongly the parent itself is present. Trained freely, P↓ turns towards d_j, where
    most of the expert's residual is (the parent's own magnitude error), and the children found at an expert
    initialisation scatter: on the synthetic `close` generator (seed 1) children found fell from 0.93 right
    after the last initialisation to 0.60 at the end of the run; blind to the parent they stayed at 0.90.
    Off by default: it matters with the late round (`expert_init_at`); without that round it found fewer
    children on the family (mean 0.89 against 0.91 with the refit alone)."""

    child_separation: float = 2.0
    """`moe`: at each expert initialisation, two of an expert's k-means clusters are merged (the freed slot
    left dormant) when their tokens are not separated: the gap between the two clusters' mean cosine
    contrast is below this many times the sum of its standard deviations (a cluster split in two halves
    scores about 1.3), and together they are tight (`child_tightness`). 0 (the paper) = keep every slot.
    An expert with fewer true children than slots otherwise splits some of them in two, neither half their
    match (2.0 is the value measured on the synthetic family). With a late all-expert round (0.8) it left
    10-17% of SmolLM2's children dormant (a dormant child is a dead one); with the rounds at 10-50% and every
    expert redone (`expert_reinit`), 7.3% of the children ended dead, against 5.8% without it."""

    child_tightness: float = 0.9
    """`moe`: two clusters are merged only when their tokens' directions lie this close to their joint
    centroid (mean cosine, weighted by norm). On SmolLM2's residuals most neighbouring clusters fail it
    (they partition a continuum, median 0.81) and keep their slots; a true child split in two passes it."""

    promoted_share: float = 1.0
    """`moe`: at each expert initialisation, a top-level latent that fires together with one more frequent
    latent on at least this share of its rows (at least twice that latent's base rate) is a child promoted to
    the top level: it is freed and re-seeded on a badly reconstructed token, and the other latent's expert
    takes its tokens. 1 (the default) = never. Measured on the synthetic family's uneven generator, the most
    frequent parent (on 44% of rows) otherwise kept four of its children as top-level latents beside itself,
    and the freed latents found the rare parents that had shared latents. On SmolLM2, where distinct
    features co-fire far above their base rates, 0.5 (with `expert_blind_to_parent`) took dead children from
    7% to 17%."""

    merge_cos: float = 0.5
    """`moe`/`tree`: at each data re-initialisation (`expert_init_at` / `child_init_at`), top-level latents
    whose decoder rows are closer than this cosine and that (almost) never fire on the same token are merged
    into one parent whose children tell them apart; the freed latent is re-seeded on a badly reconstructed
    token. 1 = never (the papers)."""

    merge_lift: float = 0.0
    """`moe`/`tree`: top-level latents closer than `merge_cos` (the tree's `late_merge_cos` after its last
    child round) are fragments too where they fire together strongly on at most this share of the rows
    chance would give them (the product of their rates); 0 = only where they (almost) never do. The MoE's
    project preset: 0.5. Fragments of a frequent parent avoid each other without never meeting: on the
    synthetic family's `uneven` (seed 2) two latents at decoder cosine 0.77, one on 47% of the rows, fired
    together on 0.37 of chance and stayed apart. Family (3 seeds, pinned kernels, both settings measured on
    one machine): `uneven` seed 2 children 0.879 -> 0.902, every other run the same; every run now at 0.90
    or more. On SmolLM2 (`bench/bench_real.py`, held-out tokens) it merges nothing more: explained variance
    0.775, CE loss score 0.981, dead children 7.0%, as before. The tree's preset keeps 0: on the family 0.5
    moved two of its runs up (`centred` seed 0 children 0.984 -> 1.000, `uneven` seed 1 edges 0.992 ->
    1.000) and none down, but it was not measured on SmolLM2."""

    child_init_at: list[float] = field(default_factory=lambda: [0.3, 0.6])
    """`tree`: fractions of the run at which children are initialised from data (every level below the top,
    top first): each parent's events (its own contribution plus what its level leaves unexplained) are split
    by spherical k-means into its share of the level below, each child assigned to that parent, encoders
    fitted as least-squares read-outs. All children the first time, later as `child_reinit` says. Empty =
    never (the paper: random init, tree from the first re-assignment). The first
    round waits until the top level has learned its features: at 10% of the run it found fewer children."""

    child_reinit: Literal["all", "starved"] = "starved"
    """`tree`: which parents' children the `child_init_at` rounds after the first redo: every parent's (the
    project preset), or only those of parents with a starved child (the default of a config built directly,
    so that an older checkpoint resumes as it trained). At the first round (30% of the run) the
    top level has not settled: on `uneven` seed 1 a rare parent's latent still held a mixture, its 7 children
    were cut along the mixture, none starved, and the second round left them all unmatched (IoU 0.14-0.37).
    Redoing every parent's children at 60% took the family's children found (3 seeds, 1,500 steps, pinned
    kernels) from 0.974 to 0.995 on average and its worst seed from 0.89 (`leaning`) to 0.97. On SmolLM2
    (levels 1024 / 4096, 400 steps) dead children fell from 40% to 19% and P(parent | child) rose from 0.81 to
    0.87, at 0.019 of eval explained variance (0.660 -> 0.641) and 0.007 of CE loss score: the fresh
    children have 40% of a short run left."""

    late_merge_cos: float = 1.0
    """`moe`: the polish round (`polish_at`) merges the top level's fragments of one parent from this cosine
    (as `merge_cos` and `merge_lift` at the earlier rounds; the merged latent's encoder points along the sum
    of the pair's, at the tied encoder's norm; the freed one is re-seeded after the round's repairs); project
    preset 0.4. After the last round (50%) the top level splits parents again into "parent + one child"
    latents on `orthogonal` (children as strong as their parent and orthogonal to it; seed 0 ended with two
    such pairs at decoder cosine 0.41 and 0.51, firing together on 0.05 and 0.10 of chance), and their
    children, cut by magnitude, match no true child. Measured over 8 synthetic generators x 6 seeds (README,
    with every freed latent re-seeded after the repairs and the bare sum of encoders, as it landed):
    `orthogonal` children 0.939 -> 0.983 (worst seed 0.91 -> 0.94), `centred` 0.995 -> 1.000, mean 0.947 ->
    0.953; with the tied encoder, `uneven` seed 0 lost two parents (1.00 -> 0.92). On SmolLM2 nothing is
    merged.

    `tree` with co-activation: after the last `child_init_at` round, every re-assignment first merges the
    top level's fragments of one parent (decoder rows closer than this cosine that almost never fire strongly
    together, as `merge_cos`; the freed latent re-seeded, its children moved to the merged one). 1 = never
    (the default of a config built directly); the project preset 0.4. After the last child round 40% of the
    run is left, and with children as strong as their parent and orthogonal to it (`orthogonal`) the top
    level splits parents again into "parent + one child" latents (decoder cosine 0.45-0.49 with the
    parent's main latent, cosine 0.7 with both the parent and the child, co-firing on 2-3% of their rows),
    whose children then hang from a latent that matches no parent: edge precision 0.91 / 0.91 / 0.88 ->
    0.95 / 0.96 / 0.95 (seeds 0-2), the other five generators unchanged (nothing merged). At 0.5 (the
    fragments sit just below it) 0.93 / 0.91 / 0.89. On SmolLM2 (levels 1024 / 4096, 400 steps) it merged
    nothing: every figure the same."""

    ortho_coef: float = 0.1
    """`moe`: cross-orthogonality penalty between top-level encoder and decoder (warmed up)."""

    top_recon_coef: float = 0.1
    """`moe`: weight of the reconstruction from the parents alone."""

    coef_warmup_steps: int = 1000
    """`moe`: steps over which the L1 and orthogonality coefficients rise linearly from 0."""

    aux_k: int | None = None
    """`topk`/`tree`: latents used by the AuxK dead-latent loss (Gao et al.; default min(512, d_in // 2))."""

    aux_coef: float = 1 / 32
    """`topk`/`tree`: AuxK loss coefficient."""

    def __post_init__(self) -> None:
        _check(self.arch in ARCHES, f"arch must be one of {', '.join(ARCHES)}, got {self.arch!r}")
        _check(self.preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.k is None:
            self.k = 32
        if self.arch == "tree":
            _check(self.width is None, "width does not apply to arch 'tree'; give levels (widths, top first)")
            if self.levels is None:
                self.levels = [512, 1024, 2048, 4096]
            self.levels = [int(w) for w in self.levels]
            _check(len(self.levels) >= 2, f"tree needs at least 2 levels, got {len(self.levels)}")
            _check(all(w >= 1 for w in self.levels), f"level widths must be positive, got {self.levels}")
            _check(
                all(a < b for a, b in zip(self.levels, self.levels[1:])),
                f"levels must be strictly increasing top to bottom, got {self.levels}",
            )
            if self.level_k is None:
                self.level_k = [min(self.k, w) for w in self.levels]
            self.level_k = [int(k) for k in self.level_k]
            _check(
                len(self.level_k) == len(self.levels),
                f"level_k has {len(self.level_k)} entries but there are {len(self.levels)} levels",
            )
            for w, k in zip(self.levels, self.level_k):
                _check(1 <= k <= w, f"level k ({k}) must be between 1 and its level width ({w})")
            _check(
                self.activation in ("topk", "jumprelu"),
                f"activation must be topk or jumprelu, got {self.activation!r}",
            )
            if self.activation == "jumprelu":
                if self.target_l0 is None:
                    self.target_l0 = [float(k) for k in self.level_k]
                self.target_l0 = [float(t) for t in self.target_l0]
                _check(
                    len(self.target_l0) == len(self.levels),
                    f"target_l0 has {len(self.target_l0)} entries but there are {len(self.levels)} levels",
                )
                for w, t in zip(self.levels, self.target_l0):
                    _check(0 < t <= w, f"target_l0 ({t}) must be > 0 and at most its level width ({w})")
                _check(self.lambda_rate >= 0, f"lambda_rate must be >= 0, got {self.lambda_rate}")
                _check(
                    self.lambda_ema is None or 0 <= self.lambda_ema < 1,
                    f"lambda_ema must be in [0, 1), got {self.lambda_ema}",
                )
                _check(self.lambda_init >= 0, f"lambda_init must be >= 0, got {self.lambda_init}")
                _check(self.bandwidth > 0, f"bandwidth must be > 0, got {self.bandwidth}")
            else:
                _check(self.target_l0 is None, "target_l0 applies only to activation 'jumprelu'")
            _check(self.rho >= 0, f"rho must be >= 0, got {self.rho}")
            _check(self.min_activation >= 0, f"min_activation must be >= 0, got {self.min_activation}")
            _check(0 <= self.perturb_rate < 1, f"perturb_rate must be in [0, 1), got {self.perturb_rate}")
            _check(
                self.reassign_every is None or self.reassign_every >= 1,
                f"reassign_every must be >= 1, got {self.reassign_every}",
            )
            _check(
                self.assign_by in ("coactivation", "encoder", "decoder"),
                f"assign_by must be coactivation, encoder or decoder, got {self.assign_by!r}",
            )
            _check(
                0 <= self.unassigned_fraction < 1,
                f"unassigned_fraction must be in [0, 1), got {self.unassigned_fraction}",
            )
        else:
            _check(
                self.levels is None and self.level_k is None and self.target_l0 is None,
                f"levels/level_k/target_l0 apply only to arch 'tree', not {self.arch!r}",
            )
            _check(
                self.activation == "topk", f"activation jumprelu applies only to 'tree', not {self.arch!r}"
            )
            if self.width is None:
                self.width = 1024 if self.arch == "moe" else 4096
            _check(self.width >= 1, f"width must be >= 1, got {self.width}")
            _check(1 <= self.k <= self.width, f"k ({self.k}) must be between 1 and width ({self.width})")
        if self.arch == "moe":
            _check(self.children >= 1, f"children must be >= 1, got {self.children}")
            if self.subspace is None:
                self.subspace = subspace_for(self.children, self.preset)
            _check(self.subspace >= 1, f"subspace must be >= 1, got {self.subspace}")
            _check(
                self.coef_warmup_steps >= 0,
                f"coef_warmup_steps must be >= 0, got {self.coef_warmup_steps}",
            )
            _check(self.child_l1 in ("kept", "all"), f"child_l1 must be kept or all, got {self.child_l1!r}")
            for name in ("l1_coef", "ortho_coef", "top_recon_coef", "child_separation"):
                _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
            _check(
                self.expert_reinit in ("all", "starved"),
                f"expert_reinit must be all or starved, got {self.expert_reinit!r}",
            )
            for name in ("child_tightness", "promoted_share"):
                value = getattr(self, name)
                _check(0 <= value <= 1, f"{name} must be in [0, 1], got {value}")
        _check(
            self.child_reinit in ("all", "starved"),
            f"child_reinit must be all or starved, got {self.child_reinit!r}",
        )
        for name in ("expert_init_at", "child_init_at", "revive_children_at", "polish_at"):
            fractions = [float(f) for f in getattr(self, name)]
            setattr(self, name, fractions)
            _check(
                all(0 < f < 1 for f in fractions),
                f"{name} must hold fractions of the run in (0, 1), got {fractions}",
            )
        _check(
            self.center_quantile is None or 0 <= self.center_quantile <= 1,
            f"center_quantile must be in [0, 1] or null, got {self.center_quantile}",
        )
        _check(0 < self.fold_density <= 1, f"fold_density must be in (0, 1], got {self.fold_density}")
        _check(-1 <= self.merge_cos <= 1, f"merge_cos must be a cosine in [-1, 1], got {self.merge_cos}")
        _check(0 <= self.merge_lift < 1, f"merge_lift must be in [0, 1), got {self.merge_lift}")
        _check(
            -1 <= self.late_merge_cos <= 1,
            f"late_merge_cos must be a cosine in [-1, 1], got {self.late_merge_cos}",
        )
        _check(self.reassign_tokens >= 1, f"reassign_tokens must be >= 1, got {self.reassign_tokens}")
        _check(self.aux_k is None or self.aux_k >= 1, f"aux_k must be >= 1, got {self.aux_k}")
        _check(self.aux_coef >= 0, f"aux_coef must be >= 0, got {self.aux_coef}")

    def validate_for(self, d_in: int) -> None:
        """Checks what depends on the activations' width, known only once the data is."""
        _check(d_in >= 1, f"d_in must be >= 1, got {d_in}")
        if self.arch == "moe":
            _check(self.subspace <= d_in, f"subspace ({self.subspace}) must not exceed d_in ({d_in})")

    def resolved_reassign_every(self, total_steps: int) -> int:
        return self.reassign_every or min(5000, max(1, total_steps // 10))

    def resolved_lambda_ema(self, total_steps: int) -> float:
        return self.lambda_ema if self.lambda_ema is not None else min(0.999, max(0.0, 1 - 20 / total_steps))

    def resolved_aux_k(self, d_in: int) -> int:
        return self.aux_k if self.aux_k is not None else max(1, min(512, d_in // 2))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        return _from_dict(cls, data)


@dataclass
class TrainConfig:
    """How to train: optimizer, schedule, checkpoints, logging, device."""

    batch_size: int = 1024
    """Tokens per optimizer step (tree paper 1024; the MoE paper used 32,512 on accelerators)."""

    lr: float = 5e-4
    """Peak Adam learning rate (MoE paper 5e-4)."""

    steps: int | None = None
    """Optimizer steps; None = one pass over the activations (resolved by `train` from the source)."""

    warmup_steps: int | None = None
    """Linear learning-rate warm-up from 0; None = min(1000, 10% of steps) (papers: 1000 steps / 10%)."""

    min_lr_ratio: float = 0.0
    """The cosine decay ends at lr * min_lr_ratio."""

    adam_betas: tuple[float, float] | None = None
    """Adam betas; None = the architecture's paper value (moe/topk (0.9, 0.999), tree (0.0, 0.995))."""

    grad_clip: float | None = 0.75
    """Global gradient-norm clip (MoE paper 0.75); None disables it."""

    seed: int = 0
    """Seeds the initialisation, the data order and the tree's random perturbations."""

    max_norm_multiple: float | None = 10.0
    """Rows whose norm exceeds this multiple of the median norm (of the normalisation sample) are skipped:
    the rare massive activations of attention sinks (see trainer/outliers.py). None keeps every row."""

    checkpoint_every: int = 1000
    """Steps between checkpoints (one is always written at the end); 0 = only at the end."""

    log_every: int = 50
    """Steps between progress-bar updates and lines in train_log.jsonl."""

    dead_window_tokens: int = 1_000_000
    """A latent that has not fired for this many tokens counts as dead (logged; drives the AuxK loss)."""

    device: str = "auto"
    """`auto` (cuda when available), `cpu`, `cuda`, `cuda:1`, ..."""

    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype under autocast (weights and Adam state stay float32); auto: bf16 on cuda, else fp32."""

    progress: bool = True
    """Show a tqdm progress bar (tokens/s, loss, explained variance, L0)."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(
            self.max_norm_multiple is None or self.max_norm_multiple > 1,
            f"max_norm_multiple must be > 1 (a multiple of the median norm), got {self.max_norm_multiple}",
        )
        _check(self.steps is None or self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(
            self.warmup_steps is None or self.warmup_steps >= 0,
            f"warmup_steps must be >= 0, got {self.warmup_steps}",
        )
        _check(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.adam_betas is not None:
            self.adam_betas = tuple(float(b) for b in self.adam_betas)  # JSON gives a list
            _check(
                len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas),
                f"adam_betas must be two numbers in [0, 1), got {self.adam_betas}",
            )
        _check(
            self.grad_clip is None or self.grad_clip > 0,
            f"grad_clip must be > 0 or None, got {self.grad_clip}",
        )
        _check(self.checkpoint_every >= 0, f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        _check(
            self.dead_window_tokens >= 1, f"dead_window_tokens must be >= 1, got {self.dead_window_tokens}"
        )
        _check(
            self.dtype in ("auto", "float32", "bfloat16"),
            f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}",
        )
        try:
            torch.device("cpu" if self.device == "auto" else self.device)
        except RuntimeError:
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return getattr(torch, self.dtype)

    def resolved_warmup(self, steps: int) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, steps // 10)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["adam_betas"] is not None:
            data["adam_betas"] = list(data["adam_betas"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, data)


def subspace_for(children: int, preset: str) -> int:
    """The MoE's expert subspace when none is given: the paper pairs 16 children with s = 4 and 64 with 8;
    the project gives every child a dimension of its own, up to 8 (the paper's larger s)."""
    if preset == "paper":
        return 4 if children <= 16 else 8
    return min(children, 8)


# Per preset and architecture, the fields that differ from the dataclass defaults
# ({"arch": ..., "train": ...}).
# The project's defaults differ from the papers' where measurement on the synthetic family said so; the README
# ("Presets") has the figures.
PRESETS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "project": {
        "moe": {"arch": {"merge_lift": 0.5, "late_merge_cos": 0.4}, "train": {"lr": 2e-3}},
        "tree": {"arch": {"min_activation": 0.25, "child_reinit": "all", "late_merge_cos": 0.4}, "train": {}},
        "topk": {"arch": {}, "train": {}},
    },
    "paper": {
        "moe": {
            "arch": {
                "center": False, "center_quantile": None, "fold_density": 1.0, "child_l1": "all",
                "expert_init_at": [], "merge_cos": 1.0, "revive_children_at": [], "polish_at": [],
                "reseed_dead_parents": False, "split_mixed_parents": False,
                "expert_reinit": "starved", "refit_parents": False, "child_separation": 0.0,
                "expert_blind_to_parent": False,
                "promoted_share": 1.0,
            },
            "train": {"lr": 5e-4},
        },
        "tree": {
            "arch": {
                "assign_by": "encoder", "reassign_every": 5000, "child_init_at": [], "merge_cos": 1.0,
                "center_quantile": None,
            },
            "train": {"lr": 5e-4},
        },
        "topk": {"arch": {}, "train": {}},
    },
}


@dataclass
class RunConfig:
    """A config file's content: `{"arch": {...}, "train": {...}}` (JSON)."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        _check_sections(data)
        return cls(ArchConfig.from_dict(data.get("arch", {})), TrainConfig.from_dict(data.get("train", {})))

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_config_file(path))

    @classmethod
    def compose(
        cls,
        arch: dict[str, Any] | None = None,
        train: dict[str, Any] | None = None,
        preset: str | None = None,
    ) -> RunConfig:
        """Dataclass defaults < the preset's fields for the architecture < `arch` / `train` given fields.
        The preset is `preset`, else `arch["preset"]`, else `project`."""
        arch, train = dict(arch or {}), dict(train or {})
        name = arch.get("arch", ArchConfig.arch)
        preset = preset or arch.get("preset") or "project"
        _check(preset in PRESETS, f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
        _check(name in ARCHES, f"arch must be one of {', '.join(ARCHES)}, got {name!r}")
        chosen = PRESETS[preset][name]
        arch_fields = {**chosen["arch"], **arch, "preset": preset}
        train_fields = {**chosen["train"], **train}
        return cls(ArchConfig.from_dict(arch_fields), TrainConfig.from_dict(train_fields))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config file's JSON object, its sections checked; fields are checked when composed."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    _check(isinstance(data, dict), f"config file {path} must hold a JSON object")
    _check_sections(data)
    return data


def _check_sections(data: dict[str, Any]) -> None:
    unknown = sorted(set(data) - {"arch", "train"})
    _check(not unknown, f"unknown config section(s): {', '.join(unknown)} (expected arch, train)")
    for section in ("arch", "train"):
        _check(isinstance(data.get(section, {}), dict), f"config section {section!r} must be a JSON object")

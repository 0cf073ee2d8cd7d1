"""MoE H-SAE ("Incorporating Hierarchical Semantics in Sparse Autoencoder Architectures", arXiv 2506.01197).

Inputs are scaled to unit norm; θ = 1/sqrt(d). Top level: z = TopK_k(ReLU_θ(E x)), no bias, where ReLU_θ
keeps values ≥ θ and zeroes the rest (as the authors' code does). Each of the k active parents j runs its
expert in an s-dim subspace: h = LeakyReLU_θ(E_j P↓_j x) (slope 0.01 below θ); only the argmax child is kept,
and it is zeroed when z_j ≤ 0. x̂ = Σ_{j active} z_j d_j + P↑_j D_j c_j.

Parameters (F parents, C children, S subspace, D model width): W_enc_DF, W_dec_FD (top level); P_down_FSD
(row s of P↓_j), P_up_FSD (P↑_j = P_up_FSD[j]ᵀ, so each (j, s) is one row of a [F·S, D] table); E_enc_FCS and
D_dec_FCS (row c = child c's encoder / unit-norm decoder atom in the subspace). Child (j, c) is level-1 latent
j·C + c.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import ArchConfig
from trainer.models.base import (
    CALIBRATION_SCALES,
    EPS,
    HSAE,
    PROMOTED_MIN_ROWS,
    LevelCode,
    StepOutput,
    fragment_pairs,
    merge_pair,
    merge_unseparated,
    promoted_children,
    reseed_latent,
    reseed_on_residuals,
    silent_latents,
    sparse_decode,
    spherical_kmeans,
    tokens_like,
    unit_rows,
)
from trainer.models.registry import register

LEAK = 0.01


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_grouped_mm_works: dict[tuple[str, torch.dtype, int], bool] = {}


def grouped_matvec(
    x_BD: Tensor, tokens_N: Tensor, experts_N: Tensor, W_EOD: Tensor, method: str = "auto"
) -> Tensor:
    """out[n] = W[experts[n]] @ x[tokens[n]] for N (token, expert) pairs, [N, O].

    `method`: "grouped_mm" (one grouped GEMM, no host sync: `grouped_matvec_gmm`), "buckets" (below), or
    "auto": grouped_mm wherever this torch runs it (probed once per device, dtype and width), else buckets.
    On a 2-core CPU the grouped GEMM took the demo's forward and backward expert pass (B=1024, k=32, 1024
    experts, s=4, d=576) from 266 to 135 ms and a whole training step from 0.31 to 0.24 s; at the synthetic
    family's sizes (d 64-256, k 2-3) from 1.5-3.2 to 0.9-1.9 ms."""
    if method == "grouped_mm" or (method == "auto" and _grouped_mm_runs(x_BD)):
        return grouped_matvec_gmm(x_BD, tokens_N, experts_N, W_EOD)
    return grouped_matvec_buckets(x_BD, tokens_N, experts_N, W_EOD)


def _grouped_mm_runs(x_BD: Tensor) -> bool:
    """Whether this torch runs a grouped GEMM, forward and backward, on x's device and dtype at x's width
    (probed once per device, dtype and width with a tiny product: older cards or odd widths fall back)."""
    if _GROUPED_MM is None:
        return False
    key = (str(x_BD.device), _compute_dtype(x_BD), x_BD.shape[1])
    if key not in _grouped_mm_works:
        try:
            with torch.enable_grad():
                a = torch.ones(16, key[2], device=x_BD.device, dtype=key[1], requires_grad=True)
                b = torch.ones(2, key[2], 8, device=x_BD.device, dtype=key[1], requires_grad=True)
                offs = torch.tensor([8, 16], device=x_BD.device, dtype=torch.int32)
                out = _GROUPED_MM(a, b, offs=offs)
                torch.autograd.grad(out, (a, b), torch.ones_like(out))
            _grouped_mm_works[key] = True
        except (RuntimeError, TypeError, NotImplementedError, ValueError):
            _grouped_mm_works[key] = False
    return _grouped_mm_works[key]


def _compute_dtype(x_BD: Tensor) -> torch.dtype:
    kind = x_BD.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x_BD.dtype


def grouped_matvec_gmm(x_BD: Tensor, tokens_N: Tensor, experts_N: Tensor, W_EOD: Tensor) -> Tensor:
    """`grouped_matvec` as one grouped GEMM (as MoE layers run their experts on a GPU): the pairs sorted by
    expert, their rows gathered, one `grouped_mm` over all E experts with each expert's row count as its
    group (empty groups cost nothing), and the rows put back in pair order. Every step is a device op with
    no shape that depends on the data: no host sync. The output width is padded to 8 with zero rows of W
    (grouped GEMMs need 16-byte aligned row strides; s = 4 bf16 values are 8 bytes)."""
    E, out_width, _ = W_EOD.shape
    dtype = _compute_dtype(x_BD)
    pad = -out_width % 8
    W = F.pad(W_EOD, (0, 0, 0, pad)) if pad else W_EOD
    order_N = torch.argsort(experts_N)
    counts_E = torch.zeros(E, dtype=torch.int32, device=x_BD.device)
    counts_E.index_add_(0, experts_N, torch.ones_like(experts_N, dtype=torch.int32))
    offs_E = counts_E.cumsum(0, dtype=torch.int32)
    x_ND = x_BD[tokens_N[order_N]].to(dtype)
    y_NO = _GROUPED_MM(x_ND, W.to(dtype).transpose(1, 2), offs=offs_E)[:, :out_width]
    return y_NO.new_empty(y_NO.shape).index_copy(0, order_N, y_NO)  # backward: one index_select


def grouped_matvec_buckets(x_BD: Tensor, tokens_N: Tensor, experts_N: Tensor, W_EOD: Tensor) -> Tensor:
    """`grouped_matvec` by buckets of experts of similar use, where this torch has no grouped GEMM.

    Why this shape of computation (measured on a 2-core CPU, B=1024, k=32, 1024 experts with skewed use,
    s=4, d=576, forward + backward): gathering W[experts] per pair and one bmm moves B·k·s·d floats and took
    470 ms; a custom chunked kernel with embedding_bag/sparse backward took 100 ms; this version, 53 ms.
    It sorts the pairs by expert (as MoE layers do) and puts the experts in buckets whose row capacity is
    their pair count rounded up to a power of two, so padding at most doubles the activation rows moved and
    there is one bmm per bucket (about log2(N) buckets, never a loop over experts). Only the weights of
    experts that some token selected are read, and only the activations are copied.
    """
    N, D = experts_N.numel(), x_BD.shape[1]
    order_N = torch.argsort(experts_N)
    experts_sorted_N = experts_N[order_N]
    counts_E = torch.bincount(experts_N, minlength=W_EOD.shape[0])
    starts_E = counts_E.cumsum(0) - counts_E
    row_N = torch.arange(N, device=x_BD.device) - starts_E[experts_sorted_N]  # row within its expert's group
    capacity_N = 2 ** torch.ceil(torch.log2(counts_E[experts_sorted_N].float())).long()
    rank_E = torch.empty_like(counts_E)
    pieces, positions = [], []
    for capacity in torch.unique(capacity_N).tolist():
        in_bucket = torch.nonzero(capacity_N == capacity).squeeze(1)
        experts = experts_sorted_N[in_bucket]
        bucket_experts = torch.unique_consecutive(experts)
        rank_E[bucket_experts] = torch.arange(len(bucket_experts), device=x_BD.device)
        slot, row = rank_E[experts], row_N[in_bucket]
        x_GCD = x_BD.new_zeros(len(bucket_experts), capacity, D)
        x_GCD[slot, row] = x_BD[tokens_N[order_N[in_bucket]]]
        y_GCO = torch.bmm(x_GCD, W_EOD[bucket_experts].transpose(1, 2).to(x_GCD.dtype))
        pieces.append(y_GCO[slot, row])
        positions.append(order_N[in_bucket])
    return torch.cat(pieces)[torch.argsort(torch.cat(positions))]


def _residual(model: MoEHSAE, x_BD: Tensor, codes: list[LevelCode], kept: LevelCode) -> Tensor:
    """[B, D]: x − x̂ with the parents and the kept children, as training reconstructs."""
    return x_BD - model.decode(codes, level=0) - model._decode_child_code(kept)


def _seed_residuals(
    model: MoEHSAE, x_BD: Tensor, codes: list[LevelCode], kept: LevelCode, n: int, generator: torch.Generator
) -> Tensor:
    """[n, D]: the residuals (`_residual`) of n sample tokens drawn in proportion to their squared residual,
    where freed or folded top-level latents are re-seeded, as dead latents are resampled."""
    residual_BD = _residual(model, x_BD, codes, kept)
    return residual_BD[torch.multinomial(residual_BD.pow(2).sum(-1), n, generator=generator)]


def _reseed_parents(
    model: MoEHSAE, x_BD: Tensor, codes: list[LevelCode], kept: LevelCode, latents: list[int], salt: int
) -> None:
    """Re-seeds each of `latents` on the residuals (`_residual`) of sample tokens (`reseed_on_residuals`,
    a generator seeded by the sample's length plus `salt`), as dead latents are resampled."""
    generator = torch.Generator(device=x_BD.device).manual_seed(len(x_BD) + salt)
    residual_BD = _residual(model, x_BD, codes, kept)
    reseed_on_residuals(model.W_enc_DF, model.W_dec_FD, latents, residual_BD, generator)


@torch.no_grad()
def merge_fragments(
    model: MoEHSAE, x_BD: Tensor, min_cos: float, rounds: int = 4, max_lift: float = 0.0,
    park: list[int] | None = None, keep_encoders: bool = False,
) -> list[int]:
    """Merges top-level latents that are fragments of one parent (`fragment_pairs`) into one parent whose
    expert (re-initialised next) tells them apart; the freed latent is re-seeded on the residual of a badly
    reconstructed sample token, or, with `park`, silenced (a zero encoder) and appended to it, to be re-seeded
    once the round's repairs are done (`MoEHSAE.reassign`). A few rounds, so that a parent split in more
    than two merges too. Returns the merged parents. Measured on the synthetic family (seeds 0 / 1 / 2),
    parents found went from 0.75 / 1.00 / 0.94 to 1.00 on `centred` and from 0.95 / 0.90 / 1.00 to 1.00 on
    `orthogonal`.

    `keep_encoders` (the polish round): the merged latent's encoder points along the sum of the pair's
    trained encoders instead of the tied one `merge_pair` gives (with a fifth of the run left, a tied encoder
    has no time to become selective again: on `uneven` seed 0 a frequent parent's merged latent fired on
    20,204 sample rows against the parent's 11,556 and took two rare parents' rows, parents found 1.00 ->
    0.92), at `merge_pair`'s norm: both encoders read the parent, so the bare sum doubled the merged latent's
    value on the pair's rows, and a latent re-seeded right after the repairs landed on that overshoot
    (decoder cosine -0.94 with the parent; tests/trainer/test_moe_init.py)."""
    merged: list[int] = []
    generator = torch.Generator(device=x_BD.device).manual_seed(len(x_BD))
    for _ in range(rounds):
        codes, kept, _, _ = model._codes(x_BD)
        pairs = fragment_pairs(codes[0].indices, model.W_dec_FD, min_cos, codes[0].values, max_lift)
        if not pairs:
            break
        if park is None:
            seeds_PD = _seed_residuals(model, x_BD, codes, kept, len(pairs), generator)
        else:  # parked: any seed does, the latent is silenced and re-seeded later
            seeds_PD = model.W_dec_FD[[free for _, free, _, _ in pairs]]
        for (keep, free, n_keep, n_free), seed_D in zip(pairs, seeds_PD):
            either_D = model.W_enc_DF[:, keep] + model.W_enc_DF[:, free] if keep_encoders else None
            merge_pair(model.W_enc_DF, model.W_dec_FD, keep, free, n_keep, n_free, seed_D)
            if either_D is not None:  # the pair's encoders, at the merged encoder's norm (`merge_pair`'s)
                model.W_enc_DF[:, keep] = either_D * (model.W_enc_DF[:, keep].norm() / either_D.norm())
            if park is not None:
                model.W_enc_DF[:, free] = 0  # silent (below the threshold on every token) until re-seeded
                park.append(free)
            merged.append(keep)
    return merged


@torch.no_grad()
def free_promoted_children(model: MoEHSAE, x_BD: Tensor, min_share: float) -> list[int]:
    """Frees the top-level latents that are children promoted beside their parent (`promoted_children`):
    each is re-seeded on the residual of a badly reconstructed sample token, as dead latents are resampled,
    and its parent's expert (returned, to be re-initialised) takes its tokens."""
    codes, kept, _, _ = model._codes(x_BD)
    pairs = promoted_children(codes[0].indices, model.n_parents, min_share)
    if not pairs:
        return []
    _reseed_parents(model, x_BD, codes, kept, [child for child, _ in pairs], salt=1)
    return [parent for _, parent in pairs]


# a live top latent holds two parents when the two halves of what it and its child explain point this far
# apart (cosine of their means), the smaller half on at least this share of its rows
MIXED_MAX_COS = 0.3
MIXED_MIN_SHARE = 0.05
# ... and takes a latent that fires on fewer than this share of the sample's rows (or none)
RARE_SHARE = 1e-3


@torch.no_grad()
def mixed_parents(
    model: MoEHSAE, x_BD: Tensor, codes: list[LevelCode], kept: LevelCode, generator: torch.Generator
) -> list[tuple[int, Tensor, Tensor]]:
    """Top-level latents that hold two parents, most apart first: (latent, mean of its larger half, of the
    smaller). For each latent, the rows it fires on give what it is there to explain: the row's residual
    plus the latent's own part and its kept child's. Two spherical 2-means halves of those whose means are
    nearly orthogonal are two parents (one parent's halves share the parent: cosine 0.5-0.9 on the family,
    child magnitudes up to the parent's); a wide expert then holds the second parent as children of the
    first (`uneven` seed 3, subspace 8: a parent on 2.8% of the rows and its two children under a frequent
    parent's latent to the end of the run)."""
    C = model.n_children
    parent = codes[0]
    on_BK = parent.indices >= 0
    residual_BD = _residual(model, x_BD, codes, kept)
    tokens_N = tokens_like(parent.indices)[on_BK]
    latents_N, values_N, children_N = parent.indices[on_BK], parent.values[on_BK], kept.indices[on_BK]
    child_values_N = kept.values[on_BK]
    order = torch.argsort(latents_N, stable=True)
    tokens_N, latents_N, values_N = tokens_N[order], latents_N[order], values_N[order]
    children_N, child_values_N = children_N[order], child_values_N[order]
    counts_F = torch.bincount(latents_N, minlength=model.n_parents)
    starts_F = (counts_F.cumsum(0) - counts_F).tolist()
    found = []
    for j, n in enumerate(counts_F.tolist()):
        if n < 4 * PROMOTED_MIN_ROWS:
            continue
        at = slice(starts_F[j], starts_F[j] + n)
        child_n = children_N[at]
        on_n = child_n >= 0
        own_nD = values_N[at, None] * model.W_dec_FD[j] + model._decode_children(
            torch.where(on_n, child_n // C, -1)[:, None], child_n.remainder(C)[:, None],
            torch.where(on_n, child_values_N[at], 0)[:, None],
        )
        target_nD = residual_BD[tokens_N[at]] + own_nD
        centroids_2D = spherical_kmeans(target_nD, 2, generator)
        half_n = (unit_rows(target_nD) @ centroids_2D.T).argmax(-1)
        sizes = torch.bincount(half_n, minlength=2)
        if int(sizes.min()) < max(PROMOTED_MIN_ROWS, MIXED_MIN_SHARE * n):
            continue
        means_2D = torch.stack([target_nD[half_n == h].mean(0) for h in (0, 1)])
        cos = float(unit_rows(means_2D[0]) @ unit_rows(means_2D[1]))
        if cos < MIXED_MAX_COS:
            big = int(sizes.argmax())
            found.append((cos, j, means_2D[big], means_2D[1 - big]))
    return [(j, big_D, small_D) for _, j, big_D, small_D in sorted(found, key=lambda f: f[0])]


@torch.no_grad()
def split_mixed_parents(model: MoEHSAE, x_BD: Tensor, codes: list[LevelCode], kept: LevelCode) -> list[int]:
    """Each latent that holds two parents (`mixed_parents`, most apart first) paired with a spare one (fires
    on fewer than `RARE_SHARE` of the sample's tokens, the dead first): it keeps its larger half's direction
    at its own encoder norm, the spare latent takes the smaller's at the level's mean encoder norm. Returns
    the latents re-seeded, both of each pair (`reseed_dead_parents` says why)."""
    on = codes[0].indices >= 0
    counts_F = torch.bincount(codes[0].indices[on], minlength=model.n_parents)
    spare = torch.nonzero(counts_F < max(PROMOTED_MIN_ROWS, RARE_SHARE * len(x_BD))).squeeze(1)
    spare = spare[torch.argsort(counts_F[spare], stable=True)].tolist()  # the dead first
    if not spare:
        return []
    generator = torch.Generator(device=x_BD.device).manual_seed(len(x_BD) + 11)
    gain = model.W_enc_DF.norm(dim=0).mean()
    mixed = mixed_parents(model, x_BD, codes, kept, generator)
    # in a large sample a latent can be both rare and (on its few rows) mixed: it is not a spare then
    spare = [latent for latent in spare if latent not in {j for j, _, _ in mixed}]
    split = []
    for (j, big_D, small_D), free in zip(mixed, spare):
        reseed_latent(model.W_enc_DF, model.W_dec_FD, j, big_D, model.W_enc_DF[:, j].norm())
        reseed_latent(model.W_enc_DF, model.W_dec_FD, free, small_D, gain)
        split += [j, free]
    return split


@torch.no_grad()
def reseed_dead_parents(model: MoEHSAE, x_BD: Tensor) -> list[int]:
    """Re-seeds the top-level latents that fire on none of the sample's tokens on the residuals of badly
    reconstructed tokens (`_seed_residuals`), as dead latents are resampled; returns them (their experts are
    redone next). Why: a dead parent leaves the live ones to cover more true parents than they can. On the
    synthetic `close` generator (seed 2) 9 of 24 top latents were dead at the end and one latent held two
    true parents (IoU 0.70 with one, 0.32 with the other).

    With `cfg.split_mixed_parents`, latents that hold two parents first take the spare ones, dead or on
    fewer than 0.1% of the sample's tokens (`split_mixed_parents`): each keeps its larger half's direction,
    a spare latent takes the smaller's (both returned). The residual misses such a pair once the latent's
    expert has learnt the second parent as children: on `uneven` seed 3 (subspace 8) six latents fired on
    under 0.1% of the tokens, none on none, and two true parents shared a latent to the end (parents 0.92
    -> 1.00 with the split). Over 13 generators x 3 seeds and 8 x 3 more (README) mean children 0.978 ->
    0.984; SmolLM2 has no spare parents at its rounds (the same run)."""
    codes, kept, _, _ = model._codes(x_BD)
    dead = silent_latents(codes[0].indices, model.n_parents)
    split = split_mixed_parents(model, x_BD, codes, kept) if model.cfg.split_mixed_parents else []
    if split:
        codes, kept, _, _ = model._codes(x_BD)
    rest = [latent for latent in dead if latent not in split]
    if rest:
        _reseed_parents(model, x_BD, codes, kept, rest, salt=5)
    return [*split, *rest]


@torch.no_grad()
def fold_dense_parents(model: MoEHSAE, x_raw_BD: Tensor, max_density: float) -> list[int]:
    """When some top-level latent fires on more than `max_density` of the sample's tokens, the subtracted
    offset (`input_mean_D`) falls back to the sample's mean and those latents are re-seeded on the residuals
    of badly reconstructed tokens, as dead latents are resampled. Returns them (none: nothing changes).

    Why: `shared_offset` (a low quantile along the mean's direction) is the right offset where the mean is
    made of sparse features; where the tokens vary densely along that direction (real residual streams),
    the top level learns the variation as latents on nearly every token, and the mean is the right offset.
    Measured on SmolLM2 (demo corpus, layer 15) after 10% of a 1,000-step run from the 5% quantile, 17
    latents fired on more than half of the tokens, 8 of them on over 95%; on the synthetic family, none in
    18 runs. Moving the offset by those latents' mean contributions instead left 21% of the children dead
    at the end (bench/bench_real.py: explained variance 0.811, L0 23); falling back to the mean, 9.5%
    (0.816, L0 26.8; the mean from the start: 0.817, 6.2%, L0 29.6)."""
    x_BD = model.normalize(x_raw_BD)[0]
    indices_BK = model._codes(x_BD)[0][0].indices
    on_BK = indices_BK >= 0
    density_F = torch.bincount(indices_BK[on_BK], minlength=model.n_parents).float() / len(x_BD)
    dense = torch.nonzero(density_F > max_density).squeeze(1).tolist()
    if not dense:
        return []
    model.input_mean_D.copy_(x_raw_BD.mean(0))
    x_BD = model.normalize(x_raw_BD)[0]  # the new offset's normalisation
    codes, kept, _, _ = model._codes(x_BD)
    _reseed_parents(model, x_BD, codes, kept, dense, salt=2)
    return dense


@torch.no_grad()
def revive_children(model: MoEHSAE, x_BD: Tensor) -> int:
    """Re-seeds each starved child (one that takes less than 1/(4C) of its expert's sample tokens, in an
    expert with at least 4·C of them) on what its expert's tokens leave unexplained: the subspace residual
    of one of those tokens, drawn in proportion to its squared norm, as decoder atom and, at the mean norm
    of the expert's other encoders, as encoder row. The expert's other children keep their weights. Returns
    the count revived."""
    C = model.n_children
    codes, kept, _, _ = model._codes(x_BD)
    on = kept.indices >= 0
    use_FC = torch.bincount(kept.indices[on], minlength=model.n_parents * C).view(-1, C)
    total_F1 = use_FC.sum(1, keepdim=True)
    starved_FC = (use_FC * 4 * C < total_F1) & (total_F1 >= 4 * C) & ~model.dormant_FC
    if not bool(starved_FC.any()):
        return 0
    residual_BD = _residual(model, x_BD, codes, kept)
    # the pairs sorted by expert once (as `init_experts` does), each expert's tokens a slice
    experts_N = kept.indices[on] // C
    order = torch.argsort(experts_N, stable=True)
    tokens_N = tokens_like(kept.indices)[on][order]
    starts_F = (total_F1.squeeze(1).cumsum(0) - total_F1.squeeze(1)).tolist()
    counts_F = total_F1.squeeze(1).tolist()
    generator = torch.Generator(device=x_BD.device).manual_seed(int(total_F1.sum()) + 3)
    revived = 0
    for j in torch.nonzero(starved_FC.any(1)).squeeze(1).tolist():
        tokens_n = tokens_N[starts_F[j] : starts_F[j] + counts_F[j]]
        r_nS = residual_BD[tokens_n] @ model.P_down_FSD[j].T
        slots = torch.nonzero(starved_FC[j]).squeeze(1)
        weight_n = r_nS.pow(2).sum(-1)
        if int((weight_n > 0).sum()) < len(slots):
            continue
        picks = torch.multinomial(weight_n, len(slots), replacement=False, generator=generator)
        atoms_CS = unit_rows(r_nS[picks])
        alive = ~starved_FC[j] & ~model.dormant_FC[j]
        gain = model.E_enc_FCS[j][alive].norm(dim=-1).mean() if bool(alive.any()) else torch.tensor(1.0)
        model.D_dec_FCS[j, slots] = atoms_CS
        model.E_enc_FCS[j, slots] = atoms_CS * gain
        revived += len(slots)
    return revived


REFIT_STEPS = (1.0, 0.5, 0.25, 0.125, 0.0)


@torch.no_grad()
def refit_parent_decoders(model: MoEHSAE, x_BD: Tensor) -> None:
    """Moves each parent's decoder row to the direction that best reconstructs, with the other parents
    fixed, what it is there for: Σ over its tokens of z·(residual + z·d), one Jacobi step of least squares
    for the top level. Parents with fewer than 4·C sample tokens keep theirs.

    Why: trained with experts that had not yet found a child, a parent's row leans towards that child
    (measured on the synthetic family's `close` generator: decoder cosine 0.87 with one child, 0.75-0.77
    with its siblings); that child's tokens then leave almost nothing in the expert's subspace and scatter
    over its slots. Refitted, the row is the centre of its children again."""
    codes, _, _, _ = model._codes(x_BD)
    parent = codes[0]
    on_BK = parent.indices >= 0
    residual_BD = x_BD - model.decode(codes, level=0)
    experts_N, values_N = parent.indices[on_BK], parent.values[on_BK]
    tokens_N = tokens_like(parent.indices)[on_BK]
    share_ND = values_N[:, None] * residual_BD[tokens_N]
    target_FD = torch.zeros_like(model.W_dec_FD).index_add_(0, experts_N, share_ND)
    weight_F = torch.zeros_like(model.W_dec_FD[:, 0]).index_add_(0, experts_N, values_N.pow(2))
    target_FD += weight_F[:, None] * model.W_dec_FD
    enough_F = torch.bincount(experts_N, minlength=model.n_parents) >= 4 * model.n_children
    old_FD = model.W_dec_FD[enough_F].clone()
    fresh_FD = unit_rows(target_FD[enough_F])

    def error(step: float) -> float:
        model.W_dec_FD[enough_F] = unit_rows((1 - step) * old_FD + step * fresh_FD)
        return float((x_BD - model.decode(codes, level=0)).pow(2).sum())

    # all parents step at once, each as if the others stayed: with k parents per token sharing what is left
    # (k = 32 on SmolLM2), the full step overshoots (explained variance 0.71 -> 0.14 after 300 steps), so
    # the step is the one of REFIT_STEPS (0: none) that reconstructs the sample best from the parents alone
    error(min(REFIT_STEPS, key=error))


@torch.no_grad()
def init_experts(
    model: MoEHSAE, x_BD: Tensor, only_starved: bool, also: Collection[int] = (), only_better: bool = False,
    only: Collection[int] | None = None,
) -> int:
    """Re-initialises experts from data. For each parent j, the residuals x − x̂_top of the sample tokens
    where j fires, less their part along j's decoder row d_j, give the subspace: P↓_j = P↑_jᵀ span the s
    directions where j's residuals exceed the residuals of all sample tokens most (principal directions after
    whitening by the sample's residual second moment; plain principal directions would be the residual every
    token shares). Children: spherical k-means centroids of the residuals in that subspace (k-means++
    seeded) are D_j and, times the factor that reads each token's residual along its nearest centroid
    from P↓_j x best, E_j. Finally the fresh encoders are scaled as the sample's reconstruction asks
    (`_calibrate`).

    Why d_j's part is left out: how far j's value misses along d_j is the parent's to fix, and a subspace
    that spends one of its s dimensions on it has one fewer for the children. The whitened directions are
    not orthogonal to d_j even though the residuals are, so d_j is projected out of them too: otherwise
    the expert reads the parent's own value (z_j·d_j, the largest part of x along P↓_j) and the child with
    the largest share of it wins on every token. On the `close` generator (seed 2) whole experts sent all
    three of their true children to one slot; projected, children found right after the last round went
    from 0.76 to 0.84 and at the end of the run from 0.66 to 0.81. Over the family at 1,500 steps
    (3 seeds) that took the MoE's worst seed from 0.80 to 0.92 of the children on `centred`, from 0.89 to
    0.94 on `orthogonal`, and its worst parents from 0.88 to 1.00 (`centred`) and 0.67 to 0.75 (`uneven`).

    Why: the argmax child is a vector quantiser of the residual in the subspace, and quantisers trained by
    gradient from random codebooks collapse. Measured on the synthetic family (bench/bench_family.py), a
    random start left one or two children of each expert taking all its tokens and the others starved.
    Experts with fewer than 4·C tokens in the sample keep their weights. With `only_starved`, only experts
    with a child that takes less than 1/(4C) of the expert's tokens are redone, and those in `also` (parents
    just merged, whose expert now covers both fragments). With `only_better` (a polish round), an expert
    outside `also` is redone only where the fresh one, as the model would run it (before `_calibrate`),
    reconstructs what its tokens leave without it better than the current one does (`_expert_output`).
    Returns the count redone.

    Why the guard is the reconstruction as run, not each child at its best value: k-means centroids are
    exactly the directions that fit the tokens best, so by that measure a fresh expert beats a trained one
    nearly always; on SmolLM2 a polish round that redid every expert cost 0.03 of eval explained
    variance (0.816 -> 0.784; judged at best values, 0.785), with the guard as run 0.815."""
    C, S = model.n_children, model.subspace_dim
    codes, kept, _, _ = model._codes(x_BD)
    parent = codes[0]
    on_BK = parent.indices >= 0
    residual_BD = x_BD - model.decode(codes, level=0)
    tokens_N = tokens_like(parent.indices)[on_BK]
    experts_N = parent.indices[on_BK]
    order = torch.argsort(experts_N, stable=True)
    tokens_N, experts_N = tokens_N[order], experts_N[order]
    counts_F = torch.bincount(experts_N, minlength=model.n_parents)
    starts_F = (counts_F.cumsum(0) - counts_F).tolist()
    if only_starved:
        on = kept.indices >= 0
        use_FC = torch.bincount(kept.indices[on], minlength=model.n_parents * C).view(-1, C).float()
        starved_F = (use_FC < use_FC.sum(1, keepdim=True) / (4 * C)).any(1)
    generator = torch.Generator(device=x_BD.device).manual_seed(int(counts_F.sum()))
    whiten_DD = _inverse_sqrt(residual_BD.T @ residual_BD / len(residual_BD))
    if only_better:  # what each token leaves unexplained with every kept child, the expert's own added back
        left_BD = _residual(model, x_BD, codes, kept)
    redone = []
    for j, n in enumerate(counts_F.tolist()):
        if n < 4 * C or (only_starved and not bool(starved_F[j]) and j not in also):
            continue
        if only is not None and j not in only:
            continue
        tokens_n = tokens_N[starts_F[j] : starts_F[j] + n]
        R_nD = residual_BD[tokens_n]
        d_D = unit_rows(model.W_dec_FD[j])
        R_nD = R_nD - (R_nD @ d_D).unsqueeze(-1) * d_D
        # the directions where j's tokens leave more unexplained than tokens at large do: plain principal
        # directions of real activations are the residual every token shares, the same for every expert,
        # and k experts adding it at once wreck the reconstruction
        specific_SD = torch.linalg.svd(R_nD @ whiten_DD, full_matrices=False).Vh[:S] @ whiten_DD
        if specific_SD.shape[0] < S:
            continue
        specific_SD = specific_SD - (specific_SD @ d_D).unsqueeze(-1) * d_D  # whitening tilted it to d_j
        basis_SD = torch.linalg.qr(specific_SD.T).Q.T
        r_nS = R_nD @ basis_SD.T
        centroids_CS = spherical_kmeans(r_nS, C, generator)
        alive_C = torch.ones(C, dtype=torch.bool, device=x_BD.device)
        if model.cfg.child_separation > 0:
            centroids_CS, alive_C = merge_unseparated(
                r_nS, centroids_CS, model.cfg.child_separation, model.cfg.child_tightness
            )
        # encoder: the centroids (the argmax child is then the nearest one), times the least-squares factor
        # that reads, from the input's projection (what the expert sees), each token's residual along its
        # nearest centroid (what its child should add). A least-squares read-out per child would mask most
        # of them: 16 classes in 4 dimensions, a few always win the argmax. A dormant slot (merged away)
        # gets a zero encoder: it wins only where every other child would be negative, and then adds 0.
        nearest_n = (unit_rows(r_nS) @ centroids_CS.T).masked_fill(~alive_C, -2.0).argmax(-1)
        target_n = (r_nS * centroids_CS[nearest_n]).sum(-1).clamp_min(0)
        read_n = ((x_BD[tokens_n] @ basis_SD.T) * centroids_CS[nearest_n]).sum(-1)
        gain = float((read_n * target_n).sum() / read_n.pow(2).sum().clamp_min(EPS))
        E_CS = centroids_CS * max(gain, 0.0) * alive_C[:, None]
        if only_better and j not in also:
            x_nD = x_BD[tokens_n]
            old_nD = _expert_output(model, x_nD, model.P_down_FSD[j], model.P_up_FSD[j], model.E_enc_FCS[j],
                                    model.D_dec_FCS[j], model.dormant_FC[j])
            new_nD = _expert_output(model, x_nD, basis_SD, basis_SD, E_CS, centroids_CS, ~alive_C)
            target_nD = left_BD[tokens_n] + old_nD  # what the expert is there to reconstruct
            if float((target_nD - new_nD).pow(2).sum()) >= float((target_nD - old_nD).pow(2).sum()):
                continue
        model.P_down_FSD[j] = basis_SD
        model.P_up_FSD[j] = basis_SD
        model.E_enc_FCS[j] = E_CS
        model.D_dec_FCS[j] = centroids_CS
        model.dormant_FC[j] = ~alive_C
        redone.append(j)
    if redone:
        _calibrate(model, x_BD, torch.tensor(redone, device=x_BD.device))
    return len(redone)


def _expert_output(
    model: MoEHSAE, x_nD: Tensor, P_down_SD: Tensor, P_up_SD: Tensor, E_CS: Tensor, D_CS: Tensor,
    dormant_C: Tensor,
) -> Tensor:
    """[n, D]: what one expert of these weights adds to each of its tokens, as `MoEHSAE._children` and
    `_decode_children` compute it: its argmax child's leaky code (dormant slots never) times that child's
    atom, lifted by P↑."""
    h_nC = (x_nD @ P_down_SD.T) @ E_CS.T
    h_nC = torch.where(h_nC >= model.theta, h_nC, LEAK * h_nC).masked_fill(dormant_C, float("-inf"))
    value_n, slot_n = h_nC.max(-1)
    return (value_n[:, None] * D_CS[slot_n]) @ P_up_SD


def _calibrate(model: MoEHSAE, x_BD: Tensor, experts: Tensor) -> float:
    """Scales the fresh experts' encoders by the factor of CALIBRATION_SCALES that reconstructs the sample
    best (as training does: parents plus kept children), and returns it. Each fresh expert is fitted alone,
    but k of them add up on every token; on real activations that overshoot briefly wrecked the
    reconstruction (explained variance from 0.66 to -1.0 for a few steps after a round)."""
    fresh_FCS = model.E_enc_FCS[experts].clone()

    def error(scale: float) -> float:
        model.E_enc_FCS[experts] = fresh_FCS * scale
        codes, kept, _, _ = model._codes(x_BD)
        x_hat_BD = model.decode(codes, level=0) + model._decode_child_code(kept)
        return float((x_BD - x_hat_BD).pow(2).sum())

    best = min(CALIBRATION_SCALES, key=error)
    model.E_enc_FCS[experts] = fresh_FCS * best
    return best


def _inverse_sqrt(moment_DD: Tensor) -> Tensor:
    """(M + m·I)^{-1/2} of a symmetric positive semi-definite matrix, m its mean eigenvalue: shrunk, so that
    directions in which almost nothing is left anywhere are not blown up into the most specific ones."""
    values_D, vectors_DD = torch.linalg.eigh(moment_DD.double())
    values_D = values_D.clamp_min(0) + values_D.clamp_min(0).mean()
    return ((vectors_DD * values_D.rsqrt()) @ vectors_DD.T).to(moment_DD.dtype)


def _fill_silent_slots(z_BF: Tensor, values_BK: Tensor, top_BK: Tensor) -> tuple[Tensor, Tensor]:
    """On a token where fewer than k parents pass the threshold, the remaining slots hold parents of value 0;
    this gives them the lowest-index silent parents, as the authors' k rounds of argmax do (argmax returns
    the first of equal values), instead of whichever zeros `topk` returns. They reconstruct nothing, but
    their experts' codes are computed, and the authors' L1 (`child_l1="all"`) charges them.

    The first 2k columns of such a token hold at least k silent parents (at most k - 1 pass), so only they
    are searched; no host sync."""
    B, K = top_BK.shape
    active_BK = values_BK > 0
    # active slots first (their order does not matter), then the silent ones in column order
    order_BK = torch.argsort((~active_BK).to(torch.int8), dim=-1, stable=True)
    values_BK, top_BK = values_BK.gather(1, order_BK), top_BK.gather(1, order_BK)
    n_active_B1 = active_BK.sum(-1, keepdim=True)
    silent_BH = z_BF[:, : 2 * K] <= 0
    rank_BH = silent_BH.cumsum(-1)
    take_BH = silent_BH & (rank_BH <= K - n_active_B1)
    slot_BH = torch.where(take_BH, n_active_B1 + rank_BH - 1, K)  # K: a spare column, dropped
    columns_BH = torch.arange(silent_BH.shape[1], device=z_BF.device).expand(B, -1)
    filled_BK1 = torch.cat([top_BK, top_BK.new_zeros(B, 1)], 1).scatter(1, slot_BH, columns_BH)
    return values_BK, filled_BK1[:, :K]


def cross_orthogonality(W_enc_DF: Tensor, W_dec_FD: Tensor) -> Tensor:
    """‖E Dᵀ − diag‖_F / (F² − F) with unit encoder rows E and decoder rows D.

    ‖E Dᵀ‖_F² = Σ (EᵀE) ⊙ (DᵀD): two D×D Gram matrices, O(F·D²), instead of the F×F matrix, O(F²·D)."""
    E_FD, D_FD = unit_rows(W_enc_DF.T), unit_rows(W_dec_FD)
    total = ((E_FD.T @ E_FD) * (D_FD.T @ D_FD)).sum()
    diagonal = (E_FD * D_FD).sum(-1).pow(2).sum()
    m = E_FD.shape[0]
    return (total - diagonal).clamp_min(EPS).sqrt() / max(m * m - m, 1)


@register("moe")
class MoEHSAE(HSAE):
    normalization = "unit_norm"
    expert_matmul = "auto"  # `grouped_matvec`'s method: grouped_mm where it runs, else buckets

    def __init__(self, cfg: ArchConfig, d_in: int):
        super().__init__(cfg, d_in)
        self.init_steps: set[int] = set()  # resolved by `start_training`
        self.revive_steps: set[int] = set()
        self.polish_steps: set[int] = set()
        F_, C, S = cfg.width, cfg.children, cfg.subspace
        self.n_parents, self.n_children, self.subspace_dim, self.k = F_, C, S, cfg.k
        self.theta = 1.0 / math.sqrt(d_in)
        W_dec_FD = unit_rows(torch.randn(F_, d_in))
        self.W_dec_FD = nn.Parameter(W_dec_FD)
        self.W_enc_DF = nn.Parameter(W_dec_FD.T.clone())  # tied init
        P_down_FSD = unit_rows(torch.randn(F_, S, d_in))
        self.P_down_FSD = nn.Parameter(P_down_FSD)
        self.P_up_FSD = nn.Parameter(P_down_FSD.clone())  # P↑ = P↓ᵀ at init
        E_enc_FCS = unit_rows(torch.randn(F_, C, S))
        self.E_enc_FCS = nn.Parameter(E_enc_FCS)
        self.D_dec_FCS = nn.Parameter(E_enc_FCS.clone())  # D_j = E_jᵀ at init
        # slots an expert initialisation left out (`child_separation`): never the argmax child, so no
        # gradient revives one half of a true child until the next initialisation looks again
        self.register_buffer("dormant_FC", torch.zeros(F_, C, dtype=torch.bool))

    @property
    def level_widths(self) -> list[int]:
        return [self.n_parents, self.n_parents * self.n_children]

    @property
    def level_k(self) -> list[int]:
        return [self.k, self.k]  # one child slot per active parent

    def forward_flops_per_token(self) -> float:
        """Top encoder 2·D·F and sparse decoder 2·k·D, and per active parent: P↓ (2·S·D), the child encoder
        (2·C·S), the kept child's atom (2·S) and P↑ (2·S·D)."""
        D, F_, S, C, K = self.d_in, self.n_parents, self.subspace_dim, self.n_children, self.k
        return 2.0 * D * F_ + 2.0 * K * D + K * (4.0 * S * D + 2.0 * C * S + 2.0 * S)

    def train_flops(self, batch_size: int) -> float:
        """Adds the cross-orthogonality penalty, once per step: two D×D Gram matrices of F rows (4·F·D²)."""
        return super().train_flops(batch_size) + 3.0 * 4.0 * self.n_parents * self.d_in**2

    def level_info(self) -> list[dict]:
        top, low = super().level_info()
        return [top, {**low, "children_per_parent": self.n_children, "subspace": self.subspace_dim}]

    def parent_of(self, level: int) -> Tensor | None:
        if level != 1:
            return None
        return torch.arange(self.n_parents * self.n_children, device=self.W_dec_FD.device) // self.n_children

    # ---- forward pieces ------------------------------------------------------------------------------
    def _parents(self, x_BD: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pre_BF = x_BD @ self.W_enc_DF
        z_BF = torch.where(pre_BF >= self.theta, pre_BF, 0)
        values_BK, top_BK = z_BF.topk(self.k, dim=-1, sorted=False)
        return z_BF, *_fill_silent_slots(z_BF, values_BK, top_BK)

    def _children(self, x_BD: Tensor, top_BK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Expert codes of the k selected parents only: (h_NC before the argmax, value_N, slot_N)."""
        B, K = top_BK.shape
        experts_N = top_BK.reshape(-1)
        tokens_N = torch.arange(B, device=x_BD.device).unsqueeze(1).expand(B, K).reshape(-1)
        u_NS = grouped_matvec(x_BD, tokens_N, experts_N, self.P_down_FSD, self.expert_matmul)
        h_NC = torch.bmm(self.E_enc_FCS[experts_N].to(u_NS.dtype), u_NS.unsqueeze(-1)).squeeze(-1)
        h_NC = torch.where(h_NC >= self.theta, h_NC, LEAK * h_NC)
        if self.cfg.child_separation > 0:  # the only setting that leaves slots dormant (`init_experts`)
            value_N, slot_N = h_NC.masked_fill(self.dormant_FC[experts_N], float("-inf")).max(-1)
        else:
            value_N, slot_N = h_NC.max(-1)
        return h_NC, value_N, slot_N

    def _decode_children(self, experts_BK: Tensor, slots_BK: Tensor, values_BK: Tensor) -> Tensor:
        """Σ_k P↑_j D_j[:, c] · value via one embedding_bag over the [F·S, D] rows of P↑: it reads K·S rows
        per token and its backward writes only those (11 ms forward + backward at the sizes measured for
        `grouped_matvec`, against 680 ms for a gather of P↑_j per pair and a bmm)."""
        B, K = experts_BK.shape
        S = self.subspace_dim
        experts_BK = experts_BK.clamp(min=0)
        atoms_BKS = self.D_dec_FCS[experts_BK, slots_BK.clamp(min=0)]
        v_BKS = values_BK.unsqueeze(-1) * atoms_BKS.to(values_BK.dtype)
        rows_BKS = experts_BK.unsqueeze(-1) * S + torch.arange(S, device=experts_BK.device)
        P_up_rows = self.P_up_FSD.reshape(-1, self.d_in)
        weights = v_BKS.reshape(B, K * S).to(P_up_rows.dtype)
        return F.embedding_bag(rows_BKS.reshape(B, K * S), P_up_rows, per_sample_weights=weights, mode="sum")

    def _codes(self, x_BD: Tensor) -> tuple[list[LevelCode], LevelCode, Tensor, Tensor]:
        """(codes, kept, z_BF, h_NC). `kept` holds the kept child of every active parent with its leaky value,
        negative ones included, as the reconstruction in training uses it; the level-1 code reports a child
        only where its value is > 0, the one meaning of "active" everywhere."""
        z_BF, values_BK, top_BK = self._parents(x_BD)
        h_NC, value_N, slot_N = self._children(x_BD, top_BK)
        active_BK = values_BK > 0
        child_values_BK = torch.where(active_BK, value_N.view_as(values_BK), 0)
        parent = LevelCode(torch.where(active_BK, top_BK, -1), torch.where(active_BK, values_BK, 0))
        child_BK = top_BK * self.n_children + slot_N.view_as(top_BK)
        kept = LevelCode(torch.where(active_BK, child_BK, -1), child_values_BK)
        on_BK = child_values_BK > 0
        child = LevelCode(torch.where(on_BK, child_BK, -1), torch.where(on_BK, child_values_BK, 0))
        return [parent, child], kept, z_BF, h_NC

    # ---- the common surface --------------------------------------------------------------------------
    def encode(self, x_raw_BD: Tensor) -> list[LevelCode]:
        return self._codes(self.normalize(x_raw_BD)[0])[0]

    def decode(self, codes: list[LevelCode], level: int | None = None) -> Tensor:
        """level 0: parents alone; 1 or None: parents and children."""
        parents_BD = sparse_decode(self.W_dec_FD, codes[0].indices, codes[0].values)
        return parents_BD if level == 0 else parents_BD + self._decode_child_code(codes[1])

    def _decode_child_code(self, child: LevelCode) -> Tensor:
        experts_BK = torch.where(child.indices >= 0, child.indices // self.n_children, -1)
        slots_BK = child.indices.remainder(self.n_children)
        values_BK = torch.where(child.indices >= 0, child.values, 0)
        return self._decode_children(experts_BK, slots_BK, values_BK)

    def loss(self, x_raw_BD: Tensor, step: int, dead: list[Tensor] | None = None) -> StepOutput:
        x_BD, _ = self.normalize(x_raw_BD)
        codes, kept, z_BF, h_NC = self._codes(x_BD)
        x_hat_top_BD = self.decode(codes, level=0)
        x_hat_BD = x_hat_top_BD + self._decode_child_code(kept)
        recon = (x_BD - x_hat_BD).pow(2).sum(-1).mean()
        top_recon = (x_BD - x_hat_top_BD).pow(2).sum(-1).mean()
        if self.cfg.child_l1 == "all":  # the authors' code: every child of the selected experts
            child_l1 = h_NC.abs().sum()
        else:  # only the kept children, the codes that reach the reconstruction
            child_l1 = kept.values.abs().sum()
        l1 = (z_BF.abs().sum() + child_l1) / x_BD.shape[0]
        ortho = cross_orthogonality(self.W_enc_DF, self.W_dec_FD)
        cfg = self.cfg
        warm = min(1.0, step / cfg.coef_warmup_steps) if cfg.coef_warmup_steps else 1.0
        loss = recon + cfg.top_recon_coef * top_recon + warm * (cfg.l1_coef * l1 + cfg.ortho_coef * ortho)
        logs = {"recon": recon, "top_recon": top_recon, "l1": l1, "ortho": ortho}
        logs = {name: value.detach() for name, value in logs.items()}
        return StepOutput(loss, logs, codes, x_BD, x_hat_BD)

    def decoder_directions(self, level: int) -> Tensor:
        if level == 0:
            return unit_rows(self.W_dec_FD.detach())
        atoms_FCD = torch.einsum("fcs,fsd->fcd", self.D_dec_FCS.detach(), self.P_up_FSD.detach())
        return unit_rows(atoms_FCD.reshape(-1, self.d_in))

    def unit_norm_params(self) -> list[tuple[nn.Parameter, int]]:
        return [(self.W_dec_FD, -1), (self.D_dec_FCS, -1)]

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        if self.cfg.expert_blind_to_parent:
            self.project_out_parents()

    @torch.no_grad()
    def project_out_parents(self) -> None:
        """Keeps every row of P↓_j orthogonal to its parent's decoder row d_j (`expert_blind_to_parent`)."""
        d_FD = unit_rows(self.W_dec_FD)
        self.P_down_FSD -= torch.einsum("fsd,fd->fs", self.P_down_FSD, d_FD).unsqueeze(-1) * d_FD.unsqueeze(1)

    def centers_inputs(self) -> bool:
        return self.cfg.center

    # ---- experts re-initialised from data ---------------------------------------------------------------
    def start_training(self, total_steps: int) -> None:
        self.init_steps = {max(1, round(f * total_steps)) for f in self.cfg.expert_init_at}
        self.revive_steps = {max(1, round(f * total_steps)) for f in self.cfg.revive_children_at}
        self.polish_steps = {max(1, round(f * total_steps)) for f in self.cfg.polish_at}

    def reassign_due(self, step: int) -> bool:
        return step in self.init_steps or step in self.revive_steps or step in self.polish_steps

    def reassign_tokens(self) -> int:
        return self.cfg.reassign_tokens if self.init_steps or self.revive_steps or self.polish_steps else 0

    @torch.no_grad()
    def reassign(self, sample_raw_ND: Tensor | None = None, step: int = 0) -> list[nn.Parameter]:
        """Re-initialises experts from what their parents leave unexplained (see `init_experts`): at the
        first scheduled step every expert, later every expert or only those with a starved child
        (`expert_reinit`). Before that, promoted children are freed, split parents merged and the parents'
        decoder rows refitted (each as configured). A polish round (`polish_at`) only refits the parents'
        rows, merges fragments from `late_merge_cos` and redoes the experts whose fresh children explain
        their tokens better; a revival round (`revive_children_at`) only re-seeds starved children.

        The second latent of each merged pair is re-seeded last, on the residuals of the sample as the
        repaired model reconstructs it, and its expert initialised there. Re-seeded at once, it went where
        the repairs were about to help, the tokens whose child a split parent's fragments lacked, and split
        that parent again. Promoted children and dead parents are re-seeded at once: re-seeded last too,
        they missed a latent that held two true parents, whose redone expert had taken up the pair's
        difference (`noisy` seed 0: the two parents shared one latent to the end, parents 0.96). Measured on
        the synthetic family (README, "Re-seeding order"; pinned kernels): mean children over 8 generators
        x 6 seeds and 5 more x 3 seeds 0.959-0.960 with every freed latent re-seeded at once (the polish
        round's merges last), 0.958-0.959 all last, 0.962 the merged pairs' last (`noisy` 0.955 -> 1.000,
        `rawmix` 0.941 -> 0.983 against all last, `orthogonal` 0.983 as with all last); on the family alone
        all within what seeds move. On SmolLM2 no latent is freed or merged: the run is unchanged."""
        if sample_raw_ND is None:
            raise ValueError("re-initialising experts needs a sample of activations")
        cfg = self.cfg
        sample_raw_ND = sample_raw_ND.to(self.W_dec_FD.device).float()
        polish = step in self.polish_steps and step not in self.init_steps
        if step not in self.init_steps and not polish:  # a revival round only
            revive_children(self, self.normalize(sample_raw_ND)[0])
            return [self.E_enc_FCS, self.D_dec_FCS]
        first = step <= min(self.init_steps, default=0)
        folded = []
        if first and cfg.center and cfg.fold_density < 1:
            folded = fold_dense_parents(self, sample_raw_ND, cfg.fold_density)
        x_BD = self.normalize(sample_raw_ND)[0]
        # the merged pairs' freed latents are parked (silent) and re-seeded once the repairs are done
        adopted, merged, park = [], [], []
        if cfg.promoted_share < 1 and not polish:
            adopted = free_promoted_children(self, x_BD, cfg.promoted_share)
        if cfg.reseed_dead_parents and not polish and step < max(self.init_steps):
            adopted += reseed_dead_parents(self, x_BD)
        if cfg.merge_cos < 1 and not polish:
            merged = merge_fragments(self, x_BD, cfg.merge_cos, max_lift=cfg.merge_lift, park=park)
        elif polish and cfg.late_merge_cos < 1:  # fragments split again after the last round
            merged = merge_fragments(
                self, x_BD, cfg.late_merge_cos, max_lift=cfg.merge_lift, park=park, keep_encoders=True
            )
        if cfg.refit_parents:
            refit_parent_decoders(self, x_BD)
        only_starved = not first and cfg.expert_reinit == "starved"
        init_experts(self, x_BD, only_starved=only_starved, also={*adopted, *merged}, only_better=polish)
        if park:  # where the repaired model still leaves most unexplained
            codes, kept, _, _ = self._codes(x_BD)
            _reseed_parents(self, x_BD, codes, kept, park, salt=7)
            init_experts(self, x_BD, only_starved=False, only=set(park))
        if cfg.expert_blind_to_parent:
            self.project_out_parents()
        top = [self.W_enc_DF, self.W_dec_FD] if folded or adopted or merged or cfg.refit_parents else []
        return [*top, self.P_down_FSD, self.P_up_FSD, self.E_enc_FCS, self.D_dec_FCS]

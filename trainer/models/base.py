"""What every HSAE architecture offers the training loop, the checkpoint and the indexer.

Shape suffixes: B batch, D model width (d_in), F latents of a level, K active slots, S expert subspace,
C children per parent, N flattened (token, slot) pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.config import ArchConfig

EPS = 1e-8


@dataclass
class LevelCode:
    """A level's sparse code: `indices` int64 [B, K] (-1 = unused slot), `values` [B, K] (0 where unused)."""

    indices: Tensor
    values: Tensor

    def active_BK(self) -> Tensor:
        return self.indices >= 0

    def l0(self) -> Tensor:
        return self.active_BK().sum(-1).float().mean()


def pad_codes(codes: list[LevelCode]) -> LevelCode:
    """One level's codes of consecutive batches joined, each padded to the widest K (index -1, value 0): a
    JumpReLU level's K varies from batch to batch."""
    k = max(code.indices.shape[1] for code in codes)
    indices = [F.pad(code.indices, (0, k - code.indices.shape[1]), value=-1) for code in codes]
    values = [F.pad(code.values, (0, k - code.values.shape[1]), value=0) for code in codes]
    return LevelCode(torch.cat(indices), torch.cat(values))


@dataclass
class StepOutput:
    """What one training forward pass hands the loop."""

    loss: Tensor
    logs: dict[str, Tensor]  # detached scalars, read only on logging steps (no device sync otherwise)
    codes: list[LevelCode]
    x_BD: Tensor  # input in normalised space
    x_hat_BD: Tensor  # the model's final reconstruction, normalised space


@dataclass
class SaeLensLevel:
    """One ordinary SAE level in raw activation space (input scale folded in), ready for sae-lens: TopK (`k`)
    or JumpReLU (`threshold_F`, k None)."""

    W_enc_DF: Tensor
    b_enc_F: Tensor
    W_dec_FD: Tensor
    b_dec_D: Tensor
    k: int | None
    threshold_F: Tensor | None = None
    min_activation: float = 0.0
    """TopK with a floor (`ArchConfig.min_activation`): sae-lens's TopK has none, so it is metadata."""


def sparse_decode(W_dec_FD: Tensor, indices_BK: Tensor, values_BK: Tensor) -> Tensor:
    """Σ_k values[b,k] · W_dec[indices[b,k]] without a dense [B, F] code: embedding_bag reads only the K
    active rows per token (and its backward writes only those rows), unlike `codes_BF @ W_dec_FD`."""
    weights = torch.where(indices_BK >= 0, values_BK, 0).to(W_dec_FD.dtype)
    return F.embedding_bag(indices_BK.clamp(min=0), W_dec_FD, per_sample_weights=weights, mode="sum")


def topk_relu(pre_BF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest pre-activations, ReLU'd; slots whose value is 0 get index -1."""
    values_BK, indices_BK = pre_BF.topk(k, dim=-1, sorted=False)
    values_BK = values_BK.relu()
    return values_BK, torch.where(values_BK > 0, indices_BK, -1)


def tokens_like(indices_BK: Tensor) -> Tensor:
    """int64 [B, K]: each slot's token (row) index."""
    return torch.arange(indices_BK.shape[0], device=indices_BK.device).unsqueeze(1).expand_as(indices_BK)


def unit_rows(W: Tensor, dim: int = -1) -> Tensor:
    return W / W.norm(dim=dim, keepdim=True).clamp_min(EPS)


class HSAE(nn.Module):
    """Base of the three architectures; level 0 is the top (roots).

    A model holds its input normalisation: `unit_norm` scales every token to norm 1 (MoE paper); `constant`
    multiplies by one scale, fitted once from a sample so that the mean norm is sqrt(d) (Tree paper), which
    sae-lens can fold exactly into its weights.
    """

    arch: ClassVar[str]
    normalization: ClassVar[str] = "constant"
    default_betas: ClassVar[tuple[float, float]] = (0.9, 0.999)

    def __init__(self, cfg: ArchConfig, d_in: int):
        super().__init__()
        cfg.validate_for(d_in)
        self.cfg = cfg
        self.d_in = d_in
        self.register_buffer("input_scale", torch.ones(()))
        # subtracted before scaling when the architecture centres its inputs (`centers_inputs`), else zeros
        self.register_buffer("input_mean_D", torch.zeros(d_in))
        # set by the training loop under data parallelism: (first row of this rank's slice, rows in the whole
        # batch), so that random draws per row are the ones one process would make (`batch_rand`)
        self.data_parallel_rows: tuple[int, int] | None = None

    # ---- sizes and structure -------------------------------------------------------------------------
    @property
    def level_widths(self) -> list[int]:
        raise NotImplementedError

    @property
    def level_k(self) -> list[int]:
        """Slots K of each level's code."""
        raise NotImplementedError

    def forward_flops_per_token(self) -> float:
        """Multiply-adds ×2 of one token's encode and decode: each level's dense encoder (2·D·W) and sparse
        decoder (2·k·D). Architectures with other shapes override it."""
        return sum(2.0 * self.d_in * (w + k) for w, k in zip(self.level_widths, self.level_k))

    def train_flops(self, batch_size: int) -> float:
        """FLOPs of one training step as nanoGPT counts them for MFU: forward + backward = 3 × the forward's
        matrix products (elementwise work and the sparse kernels' waste are not counted)."""
        return 3.0 * batch_size * self.forward_flops_per_token()

    def level_info(self) -> list[dict[str, Any]]:
        """cfg.json "levels": one dict per level (width, k, and architecture extras)."""
        return [{"width": w, "k": k} for w, k in zip(self.level_widths, self.level_k)]

    def parent_of(self, level: int) -> Tensor | None:
        """int64 [W_level]: each latent's parent in level-1 (-1 = none); None for level 0 or a flat SAE."""
        return None

    def edges(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """The structural hierarchy as (parent (level, index), child (level, index)) pairs."""
        out = []
        for level in range(1, len(self.level_widths)):
            parents = self.parent_of(level)
            if parents is None:
                continue
            for child in torch.nonzero(parents >= 0).squeeze(1).tolist():
                out.append(((level - 1, int(parents[child])), (level, child)))
        return out

    # ---- normalisation -------------------------------------------------------------------------------
    def normalize(self, x_raw_BD: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (x in normalised space, the per-token factor [B, 1] that took it there)."""
        x_raw_BD = x_raw_BD - self.input_mean_D.to(x_raw_BD.dtype)
        if self.normalization == "unit_norm":
            scale_B1 = 1.0 / x_raw_BD.norm(dim=-1, keepdim=True).clamp_min(EPS)
        else:
            scale_B1 = self.input_scale.to(x_raw_BD.dtype).expand(x_raw_BD.shape[0], 1)
        return x_raw_BD * scale_B1, scale_B1

    def denormalize(self, x_hat_BD: Tensor, scale_B1: Tensor) -> Tensor:
        """The inverse of `normalize` for a reconstruction made in normalised space."""
        return x_hat_BD / scale_B1 + self.input_mean_D.to(x_hat_BD.dtype)

    def centers_inputs(self) -> bool:
        """Whether `fit_normalization` estimates a mean to subtract (for an architecture without a decoder
        bias)."""
        return False

    @torch.no_grad()
    def fit_normalization(self, sample_BD: Tensor) -> None:
        if self.centers_inputs():
            self.input_mean_D.copy_(shared_offset(sample_BD.float(), self.cfg.center_quantile))
            sample_BD = sample_BD - self.input_mean_D
        if self.normalization == "constant":
            mean_norm = sample_BD.float().norm(dim=-1).mean().clamp_min(EPS)
            self.input_scale.fill_(math.sqrt(self.d_in) / mean_norm.item())

    def normalization_info(self) -> dict[str, Any]:
        if self.normalization == "unit_norm":
            centered = self.centers_inputs()
            first = "the offset the tokens share (input_mean_D) subtracted, then " if centered else ""
            description = first + "every token scaled to norm 1"
            return {"kind": "unit_norm", "centered": centered, "description": description}
        return {
            "kind": "constant",
            "scale": float(self.input_scale),
            "description": "x * scale, scale fitted so the mean token norm is sqrt(d_in)",
        }

    @torch.no_grad()
    def prepare(self, sample_raw_BD: Tensor) -> None:
        """Data-dependent initialisation, once before training: normalisation, then `init_from_data`."""
        self.fit_normalization(sample_raw_BD)
        self.init_from_data(self.normalize(sample_raw_BD)[0])

    def init_from_data(self, sample_BD: Tensor) -> None:
        pass

    def start_training(self, total_steps: int) -> None:
        """Called by the loop before its first step (also when resuming) with the run's length."""

    def batch_rand(self, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """torch.rand(shape) for a [B, ...] batch; under data parallelism drawn for the whole global batch
        and sliced to this rank's rows, so every rank's generator advances alike and the draws are one
        process's."""
        if self.data_parallel_rows is None:
            return torch.rand(shape, device=device)
        first, rows = self.data_parallel_rows
        return torch.rand((rows, *shape[1:]), device=device)[first : first + shape[0]]

    # ---- the small surface every architecture implements ---------------------------------------------
    def encode(self, x_raw_BD: Tensor) -> list[LevelCode]:
        raise NotImplementedError

    def decode(self, codes: list[LevelCode], level: int | None = None) -> Tensor:
        """Reconstruction in normalised space; `level` picks a coarser one (see each architecture)."""
        raise NotImplementedError

    def reconstruct(self, x_raw_BD: Tensor, level: int | None = None) -> Tensor:
        _, scale_B1 = self.normalize(x_raw_BD)
        return self.denormalize(self.decode(self.encode(x_raw_BD), level), scale_B1)

    def forward(self, x_raw_BD: Tensor) -> Tensor:
        return self.reconstruct(x_raw_BD)

    def loss(self, x_raw_BD: Tensor, step: int, dead: list[Tensor] | None = None) -> StepOutput:
        """One training forward pass; `dead` holds a bool [W_l] mask per level of latents dead so far."""
        raise NotImplementedError

    def decoder_directions(self, level: int) -> Tensor:
        """[W_level, D] unit directions in raw space (the normalisations are isotropic, so they are the
        normalised-space ones)."""
        raise NotImplementedError

    def saelens_export(self, level: int) -> SaeLensLevel | None:
        """The level as an ordinary TopK SAE in raw space, or None when it is not one."""
        return None

    # ---- hooks around the optimizer step -------------------------------------------------------------
    def unit_norm_params(self) -> list[tuple[nn.Parameter, int]]:
        """(parameter, dim) pairs whose slices along `dim` are kept at unit norm."""
        return []

    @torch.no_grad()
    def before_optimizer_step(self) -> None:
        """Removes the gradient component parallel to each unit-norm decoder vector, so that the step moves
        the direction rather than the (renormalised-away) length."""
        for param, dim in self.unit_norm_params():
            if param.grad is None:
                continue
            unit = unit_rows(param, dim)
            param.grad -= (param.grad * unit).sum(dim, keepdim=True) * unit

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """`step` = optimizer steps completed so far."""
        for param, dim in self.unit_norm_params():
            param.copy_(unit_rows(param, dim))

    def reassign_due(self, step: int) -> bool:
        """Whether the training loop should call `reassign` after `step` optimizer steps (a tree that is
        rebuilt from time to time, as the Tree HSAE's is)."""
        return False

    def reassign_tokens(self) -> int:
        """How many training rows `reassign` wants to see (0: it needs none)."""
        return 0

    def reassign(self, sample_raw_ND: Tensor | None = None, step: int = 0) -> list[nn.Parameter]:
        """Rebuilds the architecture's tree, from `reassign_tokens()` raw training rows when it wants any;
        `step` is the one `reassign_due` said yes to. Returns the parameters it re-initialised, whose
        optimizer state the loop then clears."""
        return []

    # ---- checkpoint ----------------------------------------------------------------------------------
    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        state = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        return {"arch": self.cfg.to_dict(), "d_in": self.d_in}, state

    @classmethod
    def from_checkpoint(cls, cfg: dict[str, Any], state: dict[str, Tensor]) -> HSAE:
        model = cls(ArchConfig.from_dict(cfg["arch"]), int(cfg["d_in"]))
        # buffers added since a checkpoint was written (the input mean, the MoE's dormant slots) keep the
        # values a fresh model starts with
        state = {**dict(model.named_buffers()), **state}
        model.load_state_dict(state)
        return model


# the factors a data initialisation tries on its fresh encoders, keeping the one that reconstructs best
CALIBRATION_SCALES = (1.0, 0.5, 0.25, 0.125, 0.0625)
KMEANS_ITERS = 20
KMEANS_RESTARTS = 3


def _lloyd_step(u_NS: Tensor, unit_NS: Tensor, centroids_CS: Tensor, alive_C: Tensor | None = None) -> Tensor:
    """One Lloyd step of spherical k-means: each token to its nearest (alive) centroid by cosine, each
    centroid that got tokens to the direction of their sum; the others (and dead ones) stay."""
    cos_NC = unit_NS @ centroids_CS.T
    if alive_C is not None:
        cos_NC = cos_NC.masked_fill(~alive_C, -2.0)
    sums_CS = torch.zeros_like(centroids_CS).index_add_(0, cos_NC.argmax(-1), u_NS)
    norms_C1 = sums_CS.norm(dim=-1, keepdim=True)
    moved_C1 = norms_C1 > 0 if alive_C is None else (norms_C1 > 0) & alive_C[:, None]
    return torch.where(moved_C1, sums_CS / norms_C1.clamp_min(EPS), centroids_CS)


def spherical_kmeans(u_NS: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """[n, S] unit centroids of the directions of `u_NS`: Lloyd steps on cosine from k-means++ seeds, the
    best of KMEANS_RESTARTS starts by Σ ‖u‖·cos(u, its centroid) (one start can merge two well-separated
    clusters and split a third)."""
    unit_NS = unit_rows(u_NS)
    norms_N = u_NS.norm(dim=-1)
    best, best_score = None, -float("inf")
    for _ in range(KMEANS_RESTARTS):
        first = torch.randint(len(unit_NS), (1,), generator=generator, device=u_NS.device)
        centroids = [unit_NS[first[0]]]
        for _ in range(n - 1):
            gap_N = (1 - (unit_NS @ torch.stack(centroids).T).max(-1).values).clamp_min(0) + 1e-9
            centroids.append(unit_NS[torch.multinomial(gap_N, 1, generator=generator)[0]])
        centroids_CS = torch.stack(centroids)
        for _ in range(KMEANS_ITERS):
            centroids_CS = _lloyd_step(u_NS, unit_NS, centroids_CS)
        score = float((norms_N * (unit_NS @ centroids_CS.T).max(-1).values).sum())
        if score > best_score:
            best, best_score = centroids_CS, score
    return best


# fragments of one parent fire together on at most this share of the rarer one's rows, counting a row only
# where both fire with at least this share of their mean value (a fragment picked beside its twin is weak)
MAX_FRAGMENT_COFIRING = 0.05
WEAK_SHARE = 0.5


@torch.no_grad()
def fragment_pairs(
    indices_NK: Tensor, W_dec_FD: Tensor, min_cos: float, values_NK: Tensor | None = None,
    max_lift: float = 0.0,
) -> list[tuple[int, int, float, float]]:
    """Top-level latents that look like fragments of one parent: decoder rows closer than `min_cos` that
    (almost) never fire strongly on the same row, or (`max_lift` > 0) fire strongly together on at most
    `max_lift` times the rows chance would give them (the product of their strong rates). Greedy by cosine,
    each latent in at most one pair. Returns (keep, free, rows of keep, rows of free) with `keep` the one
    firing more often.

    Why: with more top latents than the data has parents, training splits a parent into latents that each
    take some of its children (the flat SAE's feature splitting, one level up); a hierarchy wants one parent
    whose children tell the fragments apart. Measured on the synthetic family, fragments have decoder
    cosines of 0.5-0.9, while distinct parents fire together at their base rates.

    Why "strongly" (`values_NK` given: a row counts for a latent only where its value is at least
    WEAK_SHARE of its mean value): fragments that each take a row with one event of their parent fire on
    disjoint rows, but with TopK k = 2 and two events per row a fragment is often picked, weakly, beside its
    twin instead of the row's other, weakly present parent. On `centred` (seed 0), at the last expert
    initialisation, the fragments of four parents fired together on 4-13% of the rarer one's rows, so
    counting every row missed them, and each fragment's expert split its two true children over four slots.
    Distinct features that co-occur fire together with their usual values.

    Why the lift: fragments of a frequent parent avoid each other (each takes some of its events), but beside
    a parent on half of the rows "almost never" is too strict. On `uneven` (seed 2, MoE) two latents at
    decoder cosine 0.77, one on 47% of the rows, fired together strongly on 15% of the rarer one's rows, 0.37
    of chance, and another pair at 0.82 on 7%, 0.59 of chance; a parent's promoted child fires with it above
    chance (3.3-3.6 there), as distinct features co-occurring do at about 1."""
    width = W_dec_FD.shape[0]
    fire_NF = W_dec_FD.new_zeros(indices_NK.shape[0], width + 1)
    slot_NK = torch.where(indices_NK >= 0, indices_NK, width)
    fire_NF.scatter_(1, slot_NK, 1.0)
    fire_NF = fire_NF[:, :width]
    n_F = fire_NF.sum(0)
    strong_NF = fire_NF
    if values_NK is not None:
        value_NF = W_dec_FD.new_zeros(indices_NK.shape[0], width + 1).scatter_(1, slot_NK, values_NK.float())
        value_NF = value_NF[:, :width]
        mean_F = value_NF.sum(0) / n_F.clamp(min=1)
        strong_NF = (fire_NF > 0) & (value_NF >= WEAK_SHARE * mean_F)
        strong_NF = strong_NF.to(fire_NF.dtype)
    both_FF = strong_NF.T @ strong_NF
    dec_FD = unit_rows(W_dec_FD)
    cos_FF = dec_FD @ dec_FD.T
    rarer_FF = torch.minimum(n_F[:, None], n_F[None, :])
    apart_FF = both_FF <= MAX_FRAGMENT_COFIRING * rarer_FF
    if max_lift > 0:
        strong_F = strong_NF.sum(0)
        apart_FF |= both_FF <= max_lift * strong_F[:, None] * strong_F[None, :] / len(strong_NF)
    ok_FF = (cos_FF > min_cos) & apart_FF & (rarer_FF >= 1)
    pairs = torch.nonzero(torch.triu(ok_FF, diagonal=1))
    pairs = pairs[torch.argsort(cos_FF[pairs[:, 0], pairs[:, 1]], descending=True)].tolist()
    taken: set[int] = set()
    out = []
    for i, j in pairs:
        if i in taken or j in taken:
            continue
        taken.update((i, j))
        keep, free = (i, j) if n_F[i] >= n_F[j] else (j, i)
        out.append((keep, free, float(n_F[keep]), float(n_F[free])))
    return out


@torch.no_grad()
def merge_pair(W_enc_DF: Tensor, W_dec_FD: Tensor, keep: int, free: int, n_keep: float, n_free: float,
               seed_D: Tensor) -> None:
    """`keep` becomes the frequency-weighted mean direction of the pair (decoder, and encoder at the pair's
    mean encoder norm); `free` is re-seeded along `seed_D` (a badly reconstructed row's residual) at the
    level's mean encoder norm, as dead latents are resampled."""
    d_D = unit_rows(n_keep * unit_rows(W_dec_FD[keep]) + n_free * unit_rows(W_dec_FD[free]))
    gain = (n_keep * W_enc_DF[:, keep].norm() + n_free * W_enc_DF[:, free].norm()) / (n_keep + n_free)
    W_dec_FD[keep] = d_D
    W_enc_DF[:, keep] = d_D * gain
    reseed_latent(W_enc_DF, W_dec_FD, free, seed_D, W_enc_DF.norm(dim=0).mean())


def reseed_latent(W_enc_DF: Tensor, W_dec_FD: Tensor, latent: int, seed_D: Tensor, gain: Tensor) -> None:
    """Latent `latent` re-seeded along `seed_D` (a badly reconstructed row's residual), its encoder at
    `gain` (the level's mean encoder norm), as dead latents are resampled."""
    seed_D = unit_rows(seed_D)
    W_dec_FD[latent] = seed_D
    W_enc_DF[:, latent] = seed_D * gain


def silent_latents(indices_BK: Tensor, width: int) -> list[int]:
    """The latents of a level of `width` that fire on none of the rows of `indices_BK` (-1: a silent slot)."""
    fired_F = torch.bincount(indices_BK[indices_BK >= 0], minlength=width)
    return torch.nonzero(fired_F == 0).squeeze(1).tolist()


def reseed_on_residuals(
    W_enc_DF: Tensor, W_dec_FD: Tensor, latents: list[int], residual_BD: Tensor, generator: torch.Generator
) -> None:
    """Each of `latents` re-seeded (`reseed_latent`) along the residual of a row drawn in proportion to its
    squared residual, its encoder at the level's mean encoder norm, as dead latents are resampled."""
    seeds_PD = residual_BD[torch.multinomial(residual_BD.pow(2).sum(-1), len(latents), generator=generator)]
    gain = W_enc_DF.norm(dim=0).mean()
    for latent, seed_D in zip(latents, seeds_PD):
        reseed_latent(W_enc_DF, W_dec_FD, latent, seed_D, gain)


@torch.no_grad()
def shared_offset(sample_ND: Tensor, quantile: float | None) -> Tensor:
    """The offset every token shares, to subtract before sparse coding: along the direction m̂ of the sample's
    mean, the `quantile` of the tokens' projections onto m̂ (None: the mean itself).

    Why not the mean: the mean also holds every frequent sparse feature's share (f·E[a]·u for a feature of
    direction u on a fraction f of the tokens). Subtracted, it leaves each token without that feature a
    component −f·E[a]·u, which the top level then covers with an "anti-feature" latent on the 1 − f of the
    tokens that lack it, a slot that TopK's spare slots make free. Measured on the synthetic family's `uneven`
    generator (one parent on 44% of the rows), the mean's component along that parent was 0.48 of a unit
    event, an anti-feature latent fired on 37% of the rows, four of the parent's children became top-level
    latents beside it and four rare parents were never found. A low quantile of the projections is where
    the tokens that lack the frequent features sit: 0.0 of a unit event on `uneven`, and 0.92-0.95 of a real
    shared offset (the `raw-scale` generator) along its direction. Dense variation along m̂ (real residual
    streams: the 5% quantile is 0.82 of the mean) shows in the model as roots on nearly every token, and the
    MoE then falls back to the mean (`fold_dense_parents`)."""
    mean_D = sample_ND.mean(0)
    if quantile is None:
        return mean_D
    direction_D = mean_D / mean_D.norm().clamp_min(EPS)
    return direction_D * torch.quantile(sample_ND @ direction_D, quantile)


# a promoted child fires with its parent at least this many times the parent's base rate
PROMOTED_MIN_LIFT = 2.0
PROMOTED_MIN_ROWS = 8


@torch.no_grad()
def promoted_children(indices_NK: Tensor, width: int, min_share: float) -> list[tuple[int, int]]:
    """(child, parent) pairs of top-level latents where `child` fires together with the more frequent
    `parent` on at least `min_share` of its rows, and at least PROMOTED_MIN_LIFT times as often as `parent`
    fires at large: a child that the top level learned beside its parent (the flat SAE's absorption, one
    level up). Each latent is in at most one pair, rarest children first.

    Why: with spare top-level slots (k above a token's number of parents), a frequent parent's children are
    cheaper to reconstruct as top-level latents than rare parents are; the children then never reach the
    parent's expert, and rare parents share latents. Distinct parents fire together near their base rates."""
    fire_NF = torch.zeros(indices_NK.shape[0], width + 1, device=indices_NK.device)
    fire_NF.scatter_(1, torch.where(indices_NK >= 0, indices_NK, width), 1.0)
    fire_NF = fire_NF[:, :width]
    n_F = fire_NF.sum(0)
    both_FF = (fire_NF.T @ fire_NF).fill_diagonal_(0)
    share_FF = both_FF / n_F.clamp_min(1)[:, None]  # [child, parent]: P(parent | child)
    lift_FF = share_FF / (n_F / len(fire_NF)).clamp_min(EPS)[None, :]
    ok_FF = (share_FF >= min_share) & (lift_FF >= PROMOTED_MIN_LIFT)
    ok_FF &= (n_F[None, :] > n_F[:, None]) & (n_F[:, None] >= PROMOTED_MIN_ROWS)
    pairs, taken = [], set()
    for child in torch.argsort(n_F).tolist():
        if child in taken or not bool(ok_FF[child].any()):
            continue
        parent = int(torch.where(ok_FF[child], share_FF[child], -1.0).argmax())
        if parent in taken:
            continue
        taken.add(child)
        pairs.append((child, parent))
    return pairs


def merge_unseparated(
    u_NS: Tensor, centroids_CS: Tensor, min_separation: float, min_tightness: float, lloyd_steps: int = 5
) -> tuple[Tensor, Tensor]:
    """Merges spherical k-means clusters of `u_NS` that are one cluster cut in two; returns (centroids,
    alive bool [C]), dead clusters' centroids unchanged.

    A pair (a, b) is merged when both (vectorised over all pairs, the lowest separation first, a few Lloyd
    steps after each merge):
    - its tokens are not separated: along t = cos(u, c_a) − cos(u, c_b), |mean_a − mean_b| is less than
      `min_separation` × (std_a + std_b) (one Gaussian cut in two halves scores 1.3; well separated clusters
      several times that), and
    - together they are tight: ‖Σ u‖ / Σ ‖u‖ over both ≥ `min_tightness`. A continuum cut into cells fails
      this (on SmolLM2's expert residuals two neighbouring cells score 0.81 at the median), so its slots stay;
      the two halves of one true child pass it."""
    C = len(centroids_CS)
    unit_NS = unit_rows(u_NS)
    norms_N = u_NS.norm(dim=-1)
    centroids_CS = centroids_CS.clone()
    alive_C = torch.ones(C, dtype=torch.bool, device=u_NS.device)
    upper_CC = torch.ones(C, C, dtype=torch.bool, device=u_NS.device).triu(1)
    while int(alive_C.sum()) > 1:
        separation_CC, tight_CC, n_C = _pair_statistics(u_NS, unit_NS, norms_N, centroids_CS, alive_C)
        candidate_CC = upper_CC & alive_C[:, None] & alive_C[None, :] & (tight_CC >= min_tightness)
        separation_CC = separation_CC.masked_fill(~candidate_CC, float("inf"))
        a, b = divmod(int(separation_CC.argmin()), C)
        if not float(separation_CC[a, b]) < min_separation:
            break
        alive_C[b if n_C[a] >= n_C[b] else a] = False
        for _ in range(lloyd_steps):
            centroids_CS = _lloyd_step(u_NS, unit_NS, centroids_CS, alive_C)
    return centroids_CS, alive_C


def _pair_statistics(
    u_NS: Tensor, unit_NS: Tensor, norms_N: Tensor, centroids_CS: Tensor, alive_C: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """For the clusters of `u_NS` by nearest alive centroid: ([C, C] separation of each pair, [C, C] their
    joint tightness, [C] token counts); see `merge_unseparated`."""
    C = len(centroids_CS)
    cos_NC = (unit_NS @ centroids_CS.T).masked_fill(~alive_C, -2.0)
    assign_N = cos_NC.argmax(-1)
    cos_NC = cos_NC.masked_fill(~alive_C, 0.0)
    A_NC = F.one_hot(assign_N, C).to(u_NS.dtype)
    n_C = A_NC.sum(0)
    # contrast_NC[i, b] = cos(u_i, its own centroid) − cos(u_i, c_b); its mean and spread over a's
    # tokens are [a, b] (two passes: cosines near 1 leave nothing to a difference of sums of squares)
    contrast_NC = cos_NC.gather(1, assign_N[:, None]) - cos_NC
    count_C1 = n_C.clamp_min(1)[:, None]
    mean_CC = (A_NC.T @ contrast_NC) / count_C1
    std_CC = ((A_NC.T @ (contrast_NC - mean_CC[assign_N]).pow(2)) / count_C1).sqrt()
    separation_CC = (mean_CC + mean_CC.T) / (std_CC + std_CC.T).clamp_min(EPS)
    few_C = n_C < 2
    separation_CC = separation_CC.masked_fill(few_C[:, None] | few_C[None, :], 0.0)
    sums_CS = A_NC.T @ u_NS
    mass_C = A_NC.T @ norms_N
    gram_CC = sums_CS @ sums_CS.T
    joint_CC = (gram_CC.diagonal()[:, None] + gram_CC.diagonal()[None, :] + 2 * gram_CC).clamp_min(0)
    tight_CC = joint_CC.sqrt() / (mass_C[:, None] + mass_C[None, :]).clamp_min(EPS)
    return separation_CC, tight_CC, n_C


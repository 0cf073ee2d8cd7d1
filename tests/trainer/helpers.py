"""Small configurations shared by the trainer tests."""

from __future__ import annotations

import torch
from torch import Tensor

from trainer.config import ArchConfig, TrainConfig
from trainer.models.base import unit_rows

D_IN = 32
MODEL_INFO = {"name": "unit-test", "layer": 3, "hook": "blocks.3.hook_resid_post"}

TINY_ARCHES = {
    "topk": dict(arch="topk", width=48, k=4),
    "moe": dict(arch="moe", width=16, k=3, children=4, subspace=3, coef_warmup_steps=5),
    "tree": dict(arch="tree", levels=[12, 24, 48], level_k=[3, 3, 4], reassign_every=4),
}


def tiny_arch_config(arch: str, **overrides) -> ArchConfig:
    return ArchConfig(**{**TINY_ARCHES[arch], **overrides})


def tiny_train_config(**overrides) -> TrainConfig:
    defaults = dict(batch_size=64, lr=3e-3, steps=12, checkpoint_every=5, log_every=4, progress=False)
    defaults["dead_window_tokens"] = 256  # dead latents appear within the 12 steps, so AuxK runs
    return TrainConfig(**{**defaults, **overrides})


def two_parents_one_direction() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """2,000 rows in 16 dimensions, each one of two orthogonal parents u1, u2 (basis rows 0 and 1) at a
    magnitude in [0.5, 1.5], plus a little noise; and the unit direction between the two parents, where a
    latent that holds both sits. Returns (basis, which parent per row, rows, between)."""
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g)).Q.T
    which_N = torch.randint(2, (2000,), generator=g)
    scale_N1 = 0.5 + torch.rand(2000, 1, generator=g)
    x_ND = basis[which_N] * scale_N1 + 0.01 * torch.randn(2000, 16, generator=g)
    return basis, which_N, x_ND, unit_rows(basis[0] + basis[1])

"""Small configurations shared by the trainer tests."""

from __future__ import annotations

from trainer.config import ArchConfig, TrainConfig

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

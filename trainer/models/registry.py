"""One registry from architecture name to model class (as SAELens's registry.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from trainer.config import ArchConfig, ConfigError
from trainer.models.base import HSAE

_MODELS: dict[str, type[HSAE]] = {}


def register(name: str) -> Callable[[type[HSAE]], type[HSAE]]:
    def add(cls: type[HSAE]) -> type[HSAE]:
        cls.arch = name
        _MODELS[name] = cls
        return cls

    return add


def model_class(arch: str) -> type[HSAE]:
    try:
        return _MODELS[arch]
    except KeyError:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(sorted(_MODELS))}") from None


def architectures() -> list[str]:
    return sorted(_MODELS)


def build_model(cfg: ArchConfig, d_in: int, seed: int | None = None) -> HSAE:
    """A freshly initialised model (the loop calls `prepare(sample)` before training). With `seed`, the
    initialisation is reproducible and the global RNG is left as it was."""
    if seed is None:
        return model_class(cfg.arch)(cfg, d_in)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(cfg.arch)(cfg, d_in)

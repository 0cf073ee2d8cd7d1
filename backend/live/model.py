"""What the live service needs to know of a run, and what it asks of a model: tokenize a prompt, encode a
batch of them. The real model (transformer.py) needs torch and a language model; `load_model` imports it on
first use, so that this module, the service and a browse-only server stay free of torch."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class LiveRunSpec:
    """What the service needs to know of a run (a copy, so no database object crosses threads)."""

    name: str
    model_name: str
    layer: int
    checkpoint_path: str | None
    checkpoint_digest: str

    @property
    def key(self) -> tuple[str | None, str, str, int]:
        return (self.checkpoint_path, self.checkpoint_digest, self.model_name, self.layer)


@dataclass(frozen=True)
class PromptToken:
    id: int
    start: int
    end: int


@dataclass(frozen=True)
class LevelCodes:
    indices_TK: np.ndarray  # int64, -1 = unused slot
    values_TK: np.ndarray  # float32


@dataclass(frozen=True)
class SteerTerm:
    """One decoder direction added while steering: feature (level, index) at `coefficient` times its
    contribution at activation 1 (the service passes strength × the feature's max activation)."""

    level: int
    index: int
    coefficient: float


@dataclass(frozen=True)
class Continuation:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class SteerOutput:
    steered: Continuation
    unsteered: Continuation


class LiveModel(Protocol):
    device: str
    parents: list[
        np.ndarray | None
    ]  # per level: each latent's parent in the level above (-1: none); None at 0

    def tokenize(self, text: str) -> list[PromptToken]: ...

    def encode(self, prompts: list[list[int]]) -> list[list[LevelCodes]]:
        """Per prompt, per level, the codes of its tokens (BOS excluded)."""
        ...

    def steer(self, prompt: list[int], terms: list[SteerTerm], max_new_tokens: int) -> SteerOutput:
        """Greedy continuations of the prompt with the terms' directions added at the hooked layer, and
        without."""
        ...


def load_model(spec: LiveRunSpec, device: str, cpu_threads: int | None = None) -> LiveModel:
    """The run's real model (TransformerLiveModel.load); torch is imported here, on the first live request."""
    from backend.live.transformer import TransformerLiveModel

    return TransformerLiveModel.load(spec, device, cpu_threads)


def free_device_memory() -> None:
    """Give cached GPU memory back after dropping a model; nothing to do if torch was never imported."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()

"""What the run row of an indexed checkpoint says about where its features came from: plain data, handed from
the trainer's indexing to whatever stores it (the backend's writer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    """What the run row says about where the features came from."""

    name: str
    model_name: str
    layer: int
    hook: str
    arch: str
    checkpoint_digest: str
    config: dict[str, Any]
    corpus: dict[str, Any]
    metrics: dict[str, Any] | None = None
    checkpoint_path: str | None = None  # absolute; lets the server load the checkpoint for live prompts

"""What the trainer sees of activations: an iterator of float32 [B, D] batches, wherever they come from.

A source cycles over its rows with a fresh permutation each epoch, seeded by (seed, epoch), so a run resumed
at step s sees exactly the batches an uninterrupted run would have seen from step s on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch


class ActivationSource(Protocol):
    d_in: int
    num_rows: int

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        """Endless float32 [B, D] batches; the first `start_step` batches are skipped exactly."""
        ...

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) in order, as float32 (evaluation and encoding walk the data with it)."""
        ...


def epoch_permutation(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


class TensorSource:
    """Rows of an in-memory (or memory-mapped) [N, D] array."""

    def __init__(self, rows_ND: np.ndarray | torch.Tensor):
        if isinstance(rows_ND, torch.Tensor):
            rows_ND = rows_ND.detach().cpu().numpy()
        if rows_ND.ndim != 2:
            raise ValueError(f"activations must be a 2-D [N, d] matrix, got shape {tuple(rows_ND.shape)}")
        self.rows_ND = rows_ND
        self.num_rows, self.d_in = rows_ND.shape

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.rows_ND[start:stop], dtype=np.float32)

    def batch_indices(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[np.ndarray]:
        """The sorted row indices of each batch `batches` yields."""
        if batch_size > self.num_rows:
            raise ValueError(f"batch size {batch_size} exceeds the {self.num_rows} rows of activations")
        per_epoch = self.num_rows // batch_size  # the ragged tail of each permutation is dropped
        epoch, offset = divmod(start_step, per_epoch)
        while True:
            order = epoch_permutation(self.num_rows, seed, epoch)
            for b in range(offset, per_epoch):
                # Sorted reads are memmap-friendly.
                yield np.sort(order[b * batch_size : (b + 1) * batch_size])
            epoch, offset = epoch + 1, 0

    def gather(self, idx: np.ndarray) -> np.ndarray:
        """Rows at sorted indices idx, as float32."""
        return np.asarray(self.rows_ND[idx], dtype=np.float32)

    def batches(self, batch_size: int, *, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
        for idx in self.batch_indices(batch_size, seed=seed, start_step=start_step):
            yield torch.from_numpy(self.gather(idx))


def batch_stream(
    source: ActivationSource, batch_size: int, *, seed: int, start_step: int = 0,
    shard: tuple[int, int] = (0, 1),
) -> Iterator[torch.Tensor]:
    """`source.batches(...)`, or with `shard=(rank, world_size)` rank's contiguous slice of each global batch
    (batch_size / world_size rows; the slices of all ranks, in rank order, are the one-process batch). Only
    that slice is read."""
    rank, world = shard
    if world == 1:
        yield from source.batches(batch_size, seed=seed, start_step=start_step)
        return
    if not hasattr(source, "batch_indices"):
        raise TypeError(f"{type(source).__name__} cannot be read in slices for data-parallel training")
    per_rank = batch_size // world
    for idx in source.batch_indices(batch_size, seed=seed, start_step=start_step):
        yield torch.from_numpy(source.gather(idx[rank * per_rank : (rank + 1) * per_rank]))

"""Sparse co-activation counts between two levels of codes: the post-hoc baseline tree, the edge statistics
and the Tree HSAE's co-activation re-assignment all count (parent, child) pairs this way. Only torch is
imported, so the model modules can use it without importing the metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from trainer.models.base import LevelCode


def pair_keys(parent_BK: Tensor, child_BJ: Tensor, child_width: int) -> Tensor:
    """int64 key parent·child_width + child for every (parent, child) pair active on the same token."""
    both = (parent_BK >= 0).unsqueeze(2) & (child_BJ >= 0).unsqueeze(1)
    return (parent_BK.unsqueeze(2) * child_width + child_BJ.unsqueeze(1))[both]


@dataclass
class CoactivationCounts:
    """Sparse (parent, child) co-activation counts between two levels of codes, mergeable across chunks."""

    parent_width: int
    child_width: int
    # sorted pair keys parent·child_width + child, and their counts
    keys: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    counts: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @torch.no_grad()
    def update(self, parent: LevelCode, child: LevelCode) -> None:
        pairs = pair_keys(parent.indices.detach().cpu(), child.indices.detach().cpu(), self.child_width)
        self._add(*torch.unique(pairs, return_counts=True))

    def merge(self, other: CoactivationCounts) -> CoactivationCounts:
        self._add(other.keys, other.counts)
        return self

    def _add(self, keys: Tensor, counts: Tensor) -> None:
        keys, inverse = torch.unique(torch.cat([self.keys, keys]), return_inverse=True)
        summed = torch.zeros(len(keys), dtype=torch.long)
        self.counts = summed.index_add_(0, inverse, torch.cat([self.counts, counts]))
        self.keys = keys

    def best_parents(self) -> Tensor:
        """int64 [child_width]: the parent each child co-fires with most (ties: lowest index), -1 if none."""
        parents, children = self.keys // self.child_width, self.keys % self.child_width
        best = torch.zeros(self.child_width, dtype=torch.long)
        best = best.scatter_reduce(0, children, self.counts, "amax")
        top = self.counts == best[children]
        out = torch.full((self.child_width,), self.parent_width, dtype=torch.long)
        out = out.scatter_reduce(0, children[top], parents[top], "amin")
        return torch.where(out == self.parent_width, -1, out)


class CoFiring:
    """Counts, over a stream of codes of two adjacent levels, how often each child fires and how often it
    fires together with each parent. Dense int32 [P·C] counts (one index_add per chunk) while P·C is at most
    `DENSE_PAIRS_MAX`; sparse `CoactivationCounts` (sorted pair keys) beyond, where a dense table would not
    fit in memory. Both give the same answer."""

    DENSE_PAIRS_MAX = 1 << 26  # 256 MB of int32

    def __init__(self, parent_width: int, child_width: int, device: torch.device):
        self.parent_width, self.child_width = parent_width, child_width
        self.fired_C = torch.zeros(child_width, dtype=torch.long, device=device)
        if parent_width * child_width <= self.DENSE_PAIRS_MAX:
            self.dense = torch.zeros(parent_width * child_width, dtype=torch.int32, device=device)
        else:
            self.dense, self.sparse = None, CoactivationCounts(parent_width, child_width)

    def update(self, parent: LevelCode, child: LevelCode) -> None:
        on_child = child.indices[child.indices >= 0]
        self.fired_C += torch.bincount(on_child, minlength=self.child_width)
        if self.dense is None:
            self.sparse.update(parent, child)
            return
        keys = pair_keys(parent.indices, child.indices, self.child_width)
        self.dense.index_add_(0, keys, torch.ones_like(keys, dtype=torch.int32))

    def best_parents(self) -> tuple[Tensor, Tensor]:
        """(int64 [C] the parent each child co-fires with most, ties to the lowest index, -1 if none;
        float64 [C] its P(parent | child) = co-firings / firings, -1 if none)."""
        fired_C = self.fired_C.cpu()
        if self.dense is None:
            parent_C = self.sparse.best_parents()
            on = parent_C >= 0
            keys = parent_C[on] * self.child_width + torch.arange(self.child_width)[on]
            best_C = torch.zeros(self.child_width, dtype=torch.long)
            best_C[on] = self.sparse.counts[torch.searchsorted(self.sparse.keys, keys)]
        else:
            best_C, parent_C = self.dense.view(self.parent_width, self.child_width).cpu().max(0)
            best_C = best_C.long()
            parent_C = torch.where(best_C > 0, parent_C, -1)
        score_C = torch.where(best_C > 0, best_C.double() / fired_C.clamp(min=1).double(), -1.0)
        return parent_C, score_C


def coactivation_parents(parent_C: Tensor, score_C: Tensor, unassigned_fraction: float) -> Tensor:
    """int64 [C]: the best parents of `CoFiring.best_parents`, with -1 also for the `unassigned_fraction` of
    children of lowest P(parent | child) (those that never co-fired come first)."""
    parent_C = parent_C.clone()
    n_unassigned = int(unassigned_fraction * len(parent_C))
    if n_unassigned:
        # a stable sort: among equal scores the lower-index children leave first, a deterministic rule
        parent_C[torch.sort(score_C, stable=True).indices[:n_unassigned]] = -1
    return parent_C

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

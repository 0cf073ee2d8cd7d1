"""Hierarchy quality from codes, streamed: counts accumulate per chunk and add across chunks or ranks.

For every edge (parent p in level l−1, child c in level l) and every parent with at least one child:
  P(parent | child)       = #(p and c active) / #(c active)             per edge
  P(child | parent)       = #(p and c active) / #(p active)             per edge
  P(any child | parent)   = #(p and some child of p active) / #(p active)  per parent
  Hamming(p)              = #tokens where "p active" ≠ "some child of p active"  (the paper's distance
                            between a parent's activity and the OR of its children's, over the tokens seen)
The paper does not say over how many tokens it counts its Hamming distance, so we report it two ways that do
not depend on that: per 1,000 tokens (`hamming_per_1k`), and divided by the number of tokens where either
side is active (`hamming_jaccard`, a Jaccard distance in [0, 1]: 0 = the parent fires exactly when one of its
children does). Summaries are plain means over the edges / parents whose denominators are non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from trainer.coactivation import CoactivationCounts
from trainer.models import HSAE, LevelCode
from trainer.models.base import tokens_like


@dataclass
class HierarchyStats:
    """Counts over the tokens seen so far, for the tree given by `parent_maps` (child level → parent_of)."""

    level_widths: list[int]
    parent_maps: dict[int, Tensor]  # level l ≥ 1 → int64 [W_l], parent index in level l−1 or -1
    tokens: int = 0
    active: list[Tensor] = field(default_factory=list)  # per level, [W_l]
    coactive: dict[int, Tensor] = field(default_factory=dict)  # per child level, [W_l]: child and its parent
    any_child: dict[int, Tensor] = field(default_factory=dict)  # per child level, [W_{l-1}]
    parent_and_child: dict[int, Tensor] = field(default_factory=dict)  # per child level, [W_{l-1}]

    def __post_init__(self) -> None:
        self.parent_maps = {level: m.detach().cpu().long() for level, m in self.parent_maps.items()}
        if not self.active:
            self.active = [torch.zeros(w, dtype=torch.long) for w in self.level_widths]
        for level in self.parent_maps:
            self.coactive.setdefault(level, torch.zeros(self.level_widths[level], dtype=torch.long))
            self.any_child.setdefault(level, torch.zeros(self.level_widths[level - 1], dtype=torch.long))
            self.parent_and_child.setdefault(
                level, torch.zeros(self.level_widths[level - 1], dtype=torch.long)
            )

    @classmethod
    def for_model(cls, model: HSAE) -> HierarchyStats:
        maps = {}
        for level in range(1, len(model.level_widths)):
            parents = model.parent_of(level)
            if parents is not None:
                maps[level] = parents.clone()
        return cls(list(model.level_widths), maps)

    @torch.no_grad()
    def update(self, codes: list[LevelCode]) -> None:
        codes = [LevelCode(c.indices.detach().cpu(), c.values.detach().cpu()) for c in codes]
        self.tokens += codes[0].indices.shape[0]
        for level, code in enumerate(codes):
            on = code.indices[code.indices >= 0]
            self.active[level] += torch.bincount(on, minlength=self.level_widths[level])
        for level, parent_of in self.parent_maps.items():
            parent, child = codes[level - 1], codes[level]
            width = self.level_widths[level - 1]
            parent_on = parent.indices >= 0
            parent_keys = torch.unique(
                tokens_like(parent.indices)[parent_on] * width + parent.indices[parent_on]
            )
            child_idx = child.indices.clamp(min=0)
            child_parent = parent_of[child_idx]
            child_on = (child.indices >= 0) & (child_parent >= 0)
            child_keys = tokens_like(child.indices)[child_on] * width + child_parent[child_on]
            both = torch.isin(child_keys, parent_keys)
            self.coactive[level] += torch.bincount(
                child_idx[child_on][both], minlength=self.level_widths[level]
            )
            groups = torch.unique(child_keys)  # (token, parent) pairs with at least one active child
            self.any_child[level] += torch.bincount(groups % width, minlength=width)
            with_parent = groups[torch.isin(groups, parent_keys)]
            self.parent_and_child[level] += torch.bincount(with_parent % width, minlength=width)

    def merge(self, other: HierarchyStats) -> HierarchyStats:
        """Adds another chunk's (or rank's) counts in place; both must describe the same tree."""
        same_maps = self.parent_maps.keys() == other.parent_maps.keys() and all(
            torch.equal(self.parent_maps[lv], other.parent_maps[lv]) for lv in self.parent_maps
        )
        if self.level_widths != other.level_widths or not same_maps:
            raise ValueError("cannot merge hierarchy stats of different trees")
        self.tokens += other.tokens
        for mine, theirs in zip(self.active, other.active):
            mine += theirs
        for level in self.parent_maps:
            self.coactive[level] += other.coactive[level]
            self.any_child[level] += other.any_child[level]
            self.parent_and_child[level] += other.parent_and_child[level]
        return self

    # ---- results ---------------------------------------------------------------------------------------
    def edges(self) -> list[tuple[tuple[int, int], tuple[int, int]]]:
        """In the order of `HSAE.edges()`: by child level, then child index."""
        out = []
        for level, parent_of in sorted(self.parent_maps.items()):
            for child in torch.nonzero(parent_of >= 0).squeeze(1).tolist():
                out.append(((level - 1, int(parent_of[child])), (level, child)))
        return out

    def edge_stats(self) -> list[dict[str, Any]]:
        stats = []
        for (pl, p), (cl, c) in self.edges():
            n_p, n_c, n_pc = int(self.active[pl][p]), int(self.active[cl][c]), int(self.coactive[cl][c])
            stats.append(
                {
                    "coactive": n_pc,
                    "p_parent_given_child": n_pc / n_c if n_c else None,
                    "p_child_given_parent": n_pc / n_p if n_p else None,
                }
            )
        return stats

    def parent_stats(self) -> dict[tuple[int, int], dict[str, float | int | None]]:
        """Per parent with at least one child: activity, Hamming distance to the OR of its children."""
        out = {}
        for level, parent_of in sorted(self.parent_maps.items()):
            for p in torch.unique(parent_of[parent_of >= 0]).tolist():
                n_p = int(self.active[level - 1][p])
                m_p = int(self.any_child[level][p])
                q_p = int(self.parent_and_child[level][p])
                hamming = n_p + m_p - 2 * q_p
                union = n_p + m_p - q_p
                out[(level - 1, p)] = {
                    "active": n_p,
                    "hamming": hamming,
                    "hamming_per_1k": 1000 * hamming / self.tokens if self.tokens else None,
                    "hamming_jaccard": hamming / union if union else None,
                    "p_any_child_given_parent": q_p / n_p if n_p else None,
                }
        return out

    def summary(self) -> dict[str, Any]:
        def mean(values: list[float | None]) -> float | None:
            kept = [v for v in values if v is not None]
            return sum(kept) / len(kept) if kept else None

        edges, parents = self.edge_stats(), list(self.parent_stats().values())
        return {
            "tokens": self.tokens,
            "edges": len(edges),
            "parents_with_children": len(parents),
            "p_parent_given_child": mean([e["p_parent_given_child"] for e in edges]),
            "p_child_given_parent": mean([e["p_child_given_parent"] for e in edges]),
            "p_any_child_given_parent": mean([p["p_any_child_given_parent"] for p in parents]),
            "hamming_per_1k": mean([p["hamming_per_1k"] for p in parents]),
            "hamming_jaccard": mean([p["hamming_jaccard"] for p in parents]),
        }


def posthoc_tree(
    parent_codes: LevelCode, child_codes: LevelCode, parent_width: int, child_width: int
) -> Tensor:
    """The baseline tree over two flat SAEs: each child goes to the parent it co-activates with most; children
    that never co-fire with any parent stay unassigned (-1). Returns int64 [child_width]."""
    counts = CoactivationCounts(parent_width, child_width)
    counts.update(parent_codes, child_codes)
    return counts.best_parents()

"""A synthetic ground-truth hierarchy: the oracle for the models' quality tests.

Each parent p has a unit direction u_p and `children` children whose own components r_c are orthogonal to
u_p and sum to zero over the siblings (so u_p is exactly their centroid). When parent p fires with child c
the token gets a·u_p + b·r_c, with a ~ U(0.5, 1.5) and b = offset·a·U(1 − jitter, 1 + jitter): a child's
direction, about normalize(u_p + offset·r_c), is near its parent's (cos = 1/sqrt(1 + offset²)), a child fires
only with its parent, and every active parent has exactly one active child. The jitter of b/a is what makes
u_p, rather than one of its children, the only parent direction that reconstructs every child exactly. A
token holds min_active..max_active parent events (parents drawn with uneven frequencies, children slightly
uneven), plus Gaussian noise of total norm about `noise`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SyntheticHierarchy:
    x_ND: np.ndarray  # float32 activations
    parent_dirs_PD: Tensor  # u_p
    child_dirs_CD: Tensor  # normalize(u_p + offset·r_c): the mean direction of a whole child event
    child_offsets_CD: Tensor  # r_c: what a child adds beyond its parent (orthogonal to u_p)
    parent_of_child: Tensor  # int64 [C]
    active_parents_NA: Tensor  # int64 [N, max_active], -1 padded
    active_children_NA: Tensor  # int64 [N, max_active], child of the parent in the same slot

    @property
    def edges(self) -> set[tuple[int, int]]:
        return {(int(p), c) for c, p in enumerate(self.parent_of_child)}


def make_hierarchy(
    n_tokens: int = 20_000,
    d: int = 64,
    n_parents: int = 32,
    children: int = 4,
    min_active: int = 1,
    max_active: int = 3,
    offset: float = 0.6,
    jitter: float = 0.25,
    noise: float = 0.05,
    seed: int = 0,
) -> SyntheticHierarchy:
    # numpy's generator, not torch's: a model seeded with the same number must not start at the truth
    rng = np.random.default_rng([seed, 0x5E7])
    parent_dirs = F.normalize(torch.from_numpy(rng.standard_normal((n_parents, d))).float(), dim=-1)
    offsets = torch.from_numpy(rng.standard_normal((n_parents, children, d))).float()
    offsets -= (offsets @ parent_dirs.unsqueeze(-1)) * parent_dirs.unsqueeze(1)  # ⟂ own parent
    offsets -= offsets.mean(1, keepdim=True)  # siblings sum to zero: the parent is their centroid
    offsets = F.normalize(offsets, dim=-1)
    child_dirs = F.normalize(parent_dirs.unsqueeze(1) + offset * offsets, dim=-1)

    parent_p = rng.uniform(0.5, 1.5, n_parents)
    parent_p /= parent_p.sum()
    child_p = rng.dirichlet(np.full(children, 20.0), n_parents)
    n_active = rng.integers(min_active, max_active + 1, n_tokens)
    active_parents = np.full((n_tokens, max_active), -1)
    active_children = np.full((n_tokens, max_active), -1)
    x = np.zeros((n_tokens, d), dtype=np.float64)
    parent_np = parent_dirs.double().numpy()
    offsets_np = offsets.reshape(n_parents * children, d).double().numpy()
    for t in range(n_tokens):
        parents = rng.choice(n_parents, n_active[t], replace=False, p=parent_p)
        for slot, p in enumerate(parents):
            c = p * children + rng.choice(children, p=child_p[p])
            active_parents[t, slot], active_children[t, slot] = p, c
            a = rng.uniform(0.5, 1.5)
            x[t] += a * parent_np[p] + offset * a * rng.uniform(1 - jitter, 1 + jitter) * offsets_np[c]
    x += rng.normal(0, noise / np.sqrt(d), x.shape)
    return SyntheticHierarchy(
        x_ND=x.astype(np.float32),
        parent_dirs_PD=parent_dirs,
        child_dirs_CD=child_dirs.reshape(-1, d),
        child_offsets_CD=offsets.reshape(-1, d),
        parent_of_child=torch.arange(n_parents * children) // children,
        active_parents_NA=torch.from_numpy(active_parents),
        active_children_NA=torch.from_numpy(active_children),
    )


def match_features(learned_FD: Tensor, true_TD: Tensor, threshold: float) -> Tensor:
    """int64 [F]: the true feature each learned one points at (cosine ≥ threshold), else -1."""
    sim = F.normalize(learned_FD, dim=-1) @ F.normalize(true_TD, dim=-1).T
    value, index = sim.max(-1)
    return torch.where(value >= threshold, index, -1)


def edge_recovery(
    learned_edges: list[tuple[tuple[int, int], tuple[int, int]]],
    parent_match: Tensor,
    child_match: Tensor,
    truth: SyntheticHierarchy,
) -> tuple[float, float]:
    """(precision, recall) of learned parent→child edges against the true tree.

    precision: among learned edges whose child matches a true child, the fraction whose parent matches that
    child's true parent. recall: the fraction of true edges (p, c) realised by some learned edge whose ends
    match p and c."""
    judged = correct = 0
    found = set()
    for (_, p), (_, c) in learned_edges:
        true_c = int(child_match[c])
        if true_c < 0:
            continue
        judged += 1
        true_p = int(parent_match[p])
        if true_p == int(truth.parent_of_child[true_c]):
            correct += 1
            found.add((true_p, true_c))
    precision = correct / judged if judged else 0.0
    return precision, len(found) / len(truth.edges)

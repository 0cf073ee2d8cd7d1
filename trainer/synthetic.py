"""A family of synthetic ground-truth hierarchies, and how well a model recovers one.

A model that finds the tree of one generator can be tuned to it; the defaults are chosen, and the quality
tests judge them, over a *family* that varies what real features vary:

- child direction: centred on the parent (the child adds a part orthogonal to its parent, siblings' parts
  sum to zero, so the parent is exactly their centroid) or leaning towards it (the child's own direction
  v_c has cosine `child_cos` with its parent's: 0 = unrelated, 0.8 = close to the parent);
- child magnitude tied to the parent's event or drawn independently;
- 1–3 parent events per row; uneven (Zipf) parent frequencies; 2–8 children per parent; d 64–256;
- noise, and raw scale: rows with norms far from 1 and a large shared mean, as residual streams have.

A parent event p with child c adds a·u_p + b·v_c to the row (a, b > 0). Every active parent has exactly one
active child, and a child fires only with its parent.

Recovery is judged by *firing rows*, which does not depend on how an architecture lays out its
directions: a true feature is found when some learned latent of the matching level fires on a set of rows
whose IoU with the feature's rows is at least `IOU_FOUND`. An edge (learned parent, learned child) is
correct when the child's best-IoU true child is a child of the parent's best-IoU true parent.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

IOU_FOUND = 0.5
FAMILY_STEPS = 1500
"""Optimizer steps of 1024 rows each model of the family trains for in the quality tests and the bench: the
budget that keeps the 36 models of tests/trainer/test_family_quality.py near 5 minutes on two cores."""


@dataclass(frozen=True)
class HierarchySpec:
    """One member of the family. `children` is (min, max) per parent, drawn uniformly."""

    name: str
    n_parents: int = 24
    children: tuple[int, int] = (4, 4)
    d: int = 64
    active: tuple[int, int] = (2, 2)
    child_cos: float | None = 0.4
    """None: the child's part is orthogonal to its parent and siblings sum to zero (centred on the parent);
    otherwise v_c is a unit direction with this cosine to u_p."""
    child_scale: float = 0.6
    """The child's magnitude relative to its parent's (its mean when independent)."""
    tied_magnitude: bool = False
    """b = child_scale·a·U(0.75, 1.25) (tied) or b = child_scale·U(0.5, 1.5) independent of a."""
    zipf: float = 0.0
    """Parent frequencies ∝ rank^-zipf (0: even, up to a factor 3 of jitter)."""
    noise: float = 0.05
    """Gaussian noise of about this total norm, relative to a unit parent event."""
    scale: float = 1.0
    """Raw scale: every row is multiplied by this."""
    mean_norm: float = 0.0
    """A shared offset of this norm (before `scale`) added to every row: the mean a residual stream has."""

    def model_sizes(self) -> dict[str, dict]:
        """The sizes a user would give: 4/3 of the true parents (rounded up to 8), room for the most children
        a parent has, k = the most parent events in a row, and 4× as many children for the tree. The MoE's
        expert subspace is left to the preset (`config.subspace_for`)."""
        parents = -(-self.n_parents * 4 // 3 // 8) * 8
        k = self.active[1]
        return {
            "moe": {"arch": "moe", "width": parents, "k": k, "children": self.children[1]},
            "tree": {"arch": "tree", "levels": [parents, parents * self.children[1]], "k": k},
        }


FAMILY: tuple[HierarchySpec, ...] = (
    # the generator of tests/trainer/test_quality.py: centred, tied magnitudes, two events per row
    HierarchySpec("centred", n_parents=16, child_cos=None, tied_magnitude=True),
    # the independent hierarchy of issue 11: leaning children with their own magnitudes
    HierarchySpec("leaning", n_parents=24, child_cos=0.4),
    # uneven frequencies, 1-3 events per row, 2-8 children, wider, noisier, children barely related
    HierarchySpec(
        "uneven", n_parents=24, children=(2, 8), d=128, active=(1, 3), child_cos=0.1, zipf=0.8, noise=0.1
    ),
    # raw residual-stream-like scale: norm ~40 with a shared mean, closely related children, tied
    HierarchySpec(
        "raw-scale", n_parents=32, children=(3, 5), d=256, active=(1, 2), child_cos=0.6,
        tied_magnitude=True, scale=40.0, mean_norm=2.0,
    ),
    # children unrelated in direction to their parent, strong ones
    HierarchySpec("orthogonal", n_parents=20, children=(2, 6), d=96, child_cos=0.0, child_scale=1.0),
    # children close to their parent (a breed of dog is mostly "dog"), 1-2 events per row: a TopK child
    # level can represent each parent by one latent and leave its children dead
    HierarchySpec(
        "close", n_parents=16, children=(3, 6), d=64, active=(1, 2), child_cos=0.8, child_scale=0.8
    ),
)


@dataclass
class Hierarchy:
    spec: HierarchySpec
    x_ND: np.ndarray  # float32 rows
    parent_of_child: Tensor  # int64 [C]
    parents_NA: Tensor  # int64 [N, max active], -1 padded
    children_NA: Tensor  # int64 [N, max active]: the child of the parent in the same slot
    parent_dirs_PD: Tensor = field(repr=False)
    child_dirs_CD: Tensor = field(repr=False)


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def make(spec: HierarchySpec, n_rows: int = 60_000, seed: int = 0) -> Hierarchy:
    rng = np.random.default_rng([seed, 0x5E7, len(spec.name)])
    P, d = spec.n_parents, spec.d
    u_PD = _unit(rng.standard_normal((P, d)))
    n_children = rng.integers(spec.children[0], spec.children[1] + 1, P)
    parent_of_child = np.repeat(np.arange(P), n_children)
    first_child = np.concatenate([[0], np.cumsum(n_children)[:-1]])
    v_CD = np.empty((len(parent_of_child), d))
    for p in range(P):
        own = rng.standard_normal((n_children[p], d))
        own -= (own @ u_PD[p])[:, None] * u_PD[p]  # ⟂ parent
        if spec.child_cos is None:
            own -= own.mean(0, keepdims=True)  # siblings sum to zero: the parent is their centroid
            v = _unit(own)
        else:
            c = spec.child_cos
            v = c * u_PD[p] + np.sqrt(1 - c * c) * _unit(own)
        v_CD[first_child[p] : first_child[p] + n_children[p]] = v

    parent_p = rng.uniform(0.5, 1.5, P) * np.arange(1, P + 1, dtype=float) ** -spec.zipf
    parent_p = rng.permutation(parent_p / parent_p.sum())
    child_p = [rng.dirichlet(np.full(n, 20.0)) for n in n_children]
    n_active = rng.integers(spec.active[0], spec.active[1] + 1, n_rows)
    A = spec.active[1]
    # distinct parents drawn in proportion to parent_p without replacement (the Gumbel-top-k trick, the
    # same distribution as drawing one at a time), then each one's child from its own child_p
    keys_NP = np.log(parent_p) + rng.gumbel(size=(n_rows, P))
    order_NA = np.argsort(-keys_NP, axis=1)[:, :A]
    on = np.arange(A) < n_active[:, None]
    parents_NA = np.where(on, order_NA, -1)
    cdf_PC = np.zeros((P, int(n_children.max())))
    for p, probs in enumerate(child_p):
        cdf_PC[p] = np.concatenate([np.cumsum(probs)[:-1], np.full(cdf_PC.shape[1] - len(probs) + 1, 2.0)])
    draw_NA = rng.random((n_rows, A))
    slot_NA = (draw_NA[..., None] > cdf_PC[parents_NA.clip(0)]).sum(-1)
    children_NA = np.where(on, first_child[parents_NA.clip(0)] + slot_NA, -1)

    a_NA = np.where(on, rng.uniform(0.5, 1.5, (n_rows, A)), 0.0)
    if spec.tied_magnitude:
        b_NA = spec.child_scale * a_NA * rng.uniform(0.75, 1.25, (n_rows, A))
    else:
        b_NA = np.where(on, spec.child_scale * rng.uniform(0.5, 1.5, (n_rows, A)), 0.0)
    x_ND = np.einsum("na,nad->nd", a_NA, u_PD[parents_NA.clip(0)])
    x_ND += np.einsum("na,nad->nd", b_NA, v_CD[children_NA.clip(0)])
    x_ND += rng.normal(0, spec.noise / np.sqrt(d), x_ND.shape)
    if spec.mean_norm:
        x_ND += spec.mean_norm * _unit(rng.standard_normal(d))
    x_ND *= spec.scale
    return Hierarchy(
        spec=spec,
        x_ND=x_ND.astype(np.float32),
        parent_of_child=torch.from_numpy(parent_of_child),
        parents_NA=torch.from_numpy(parents_NA),
        children_NA=torch.from_numpy(children_NA),
        parent_dirs_PD=torch.from_numpy(u_PD).float(),
        child_dirs_CD=torch.from_numpy(v_CD).float(),
    )


def _firing(indices_NK: Tensor, width: int) -> Tensor:
    """float32 [N, width] 0/1: which latents fire on which rows (slots with index -1 are silent)."""
    out = torch.zeros(indices_NK.shape[0], width + 1)
    out.scatter_(1, indices_NK.clamp(min=-1) % (width + 1), 1.0)  # -1 lands in the spare last column
    return out[:, :width]


def best_match(learned_NK: Tensor, learned_width: int, truth_NA: Tensor, truth_width: int):
    """For each learned latent its best true feature by IoU of firing rows, and that IoU; and for each true
    feature the best IoU any learned latent reaches. Returns (match_F, iou_F, best_iou_T)."""
    L, T = _firing(learned_NK, learned_width), _firing(truth_NA, truth_width)
    inter_FT = L.T @ T
    union_FT = L.sum(0)[:, None] + T.sum(0)[None, :] - inter_FT
    iou_FT = inter_FT / union_FT.clamp(min=1)
    iou_F, match_F = iou_FT.max(1)
    return match_F, iou_F, iou_FT.max(0).values


@dataclass
class Recovery:
    parents_found: float
    children_found: float
    edge_precision: float
    edge_recall: float

    def as_row(self) -> str:
        return (
            f"parents {self.parents_found:.2f}  children {self.children_found:.2f}  "
            f"edge precision {self.edge_precision:.2f}  recall {self.edge_recall:.2f}"
        )


def recovery(
    parent_indices_NK: Tensor,
    child_indices_NK: Tensor,
    widths: tuple[int, int],
    edges: list[tuple[tuple[int, int], tuple[int, int]]],
    truth: Hierarchy,
) -> Recovery:
    """How much of the true tree two levels of codes (top and the level below) and their edges recover."""
    P, C = truth.spec.n_parents, len(truth.parent_of_child)
    p_match, p_iou, p_best = best_match(parent_indices_NK, widths[0], truth.parents_NA, P)
    c_match, c_iou, c_best = best_match(child_indices_NK, widths[1], truth.children_NA, C)
    judged = correct = 0
    found = set()
    for (_, p), (_, c) in edges:
        if c_iou[c] < IOU_FOUND:
            continue
        judged += 1
        true_c = int(c_match[c])
        if p_iou[p] >= IOU_FOUND and int(p_match[p]) == int(truth.parent_of_child[true_c]):
            correct += 1
            found.add(true_c)
    return Recovery(
        parents_found=float((p_best >= IOU_FOUND).float().mean()),
        children_found=float((c_best >= IOU_FOUND).float().mean()),
        edge_precision=correct / judged if judged else 0.0,
        edge_recall=len(found) / C,
    )


def train_and_judge(
    truth: Hierarchy,
    arch: str,
    seed: int,
    *,
    preset: str = "project",
    arch_fields: dict[str, Any] | None = None,
    train_fields: dict[str, Any] | None = None,
    steps: int = FAMILY_STEPS,
    batch: int = 1024,
) -> Recovery:
    """Trains `arch` on `truth` as `hsae train` would with only the sizes given (`model_sizes`, `steps`,
    `batch`; `arch_fields` / `train_fields` override single fields), on one CPU thread, and judges it."""
    from trainer.config import RunConfig
    from trainer.data import TensorSource
    from trainer.models import build_model
    from trainer.train import train

    run_cfg = RunConfig.compose(
        {**truth.spec.model_sizes()[arch], **(arch_fields or {})},
        {"batch_size": batch, "steps": steps, "seed": seed, "checkpoint_every": 0, "log_every": steps,
         "progress": False, "device": "cpu", **(train_fields or {})},
        preset,
    )
    model = build_model(run_cfg.arch, truth.spec.d, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            train(model, TensorSource(truth.x_ND), run_cfg.train, run_dir, model_info={"name": "synthetic"})
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(truth.x_ND))
    return recovery(codes[0].indices, codes[1].indices, tuple(model.level_widths[:2]), model.edges(), truth)


@dataclass
class Job:
    """One `train_and_judge` on a generator of FAMILY, its data made where it runs."""

    generator: str
    arch: str
    seed: int
    preset: str = "project"
    arch_fields: dict[str, Any] = field(default_factory=dict)
    train_fields: dict[str, Any] = field(default_factory=dict)
    steps: int = FAMILY_STEPS
    batch: int = 1024
    rows: int = 60_000

    def run(self) -> Recovery:
        spec = next(s for s in FAMILY if s.name == self.generator)
        return train_and_judge(
            make(spec, self.rows, seed=self.seed), self.arch, self.seed, preset=self.preset,
            arch_fields=self.arch_fields, train_fields=self.train_fields, steps=self.steps, batch=self.batch,
        )


# The workers' CPU kernels, pinned to one instruction set on x86: MKL's and oneDNN's GEMMs and ATen's
# vectorised ops round differently with AVX-512 than with AVX2, and training the same model on the same data
# then ends in another of its nearby optima. Measured on this family (1,500 steps): the MoE's `centred`
# seed 0 found 1.00 of the children with AVX2 and 0.94 with AVX-512, the tree's `uneven` seed 1 0.91 and 0.82.
# MKL's setting alone gives those two seeds their AVX2 figures back; the other two pin what else could round
# differently. Not everything is pinned: over the MoE's 18 runs the pinned figures on an AVX-512 machine came
# within 0.03 of an AVX2 machine's (its `uneven` seed 2 edge precision 0.97 there, 0.95 pinned here).
PINNED_KERNELS = {
    "MKL_ENABLE_INSTRUCTIONS": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
}


def judge_in_parallel(jobs: list[Job], workers: int | None = None) -> list[Recovery]:
    """`Job.run` over many jobs, one single-threaded process per core (fresh interpreters: a forked torch
    can deadlock), their CPU kernels pinned (`PINNED_KERNELS`). The results do not depend on the number of
    workers, and hardly on the machine's vector instructions."""
    import multiprocessing
    import os
    import platform
    from concurrent.futures import ProcessPoolExecutor
    from unittest import mock

    workers = workers or min(len(jobs), os.cpu_count() or 1)
    pinned = PINNED_KERNELS if platform.machine().lower() in ("x86_64", "amd64") else {}
    # read by the spawned interpreters when they load torch; this process's environment is restored after
    with mock.patch.dict(os.environ, pinned):
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(Job.run, jobs))

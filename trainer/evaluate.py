"""Evaluation that needs no language model (explained variance, L0, dead latents, hierarchy quality), plus the
hook for CE loss recovered, which takes the language model as a callable.

Per level l, the reconstruction is what the model gives from levels 0..l (`HSAE.decode(codes, level=l)`):
moe — level 0 the parents alone, level 1 parents and children; tree — level l's own SAE; topk — its one level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from trainer.hierarchy import HierarchyStats
from trainer.models import HSAE
from trainer.outliers import inliers

ReplaceFn = Callable[[Tensor], Tensor]
HIERARCHY_ROWS = (
    "p_parent_given_child", "p_child_given_parent", "p_any_child_given_parent", "hamming_per_1k",
    "hamming_jaccard", "edges",
)


@torch.no_grad()
def evaluate(
    model: HSAE,
    batches: Iterable[Tensor],
    *,
    max_tokens: int | None = None,
    device: str | torch.device | None = None,
    max_norm: float = math.inf,
) -> dict[str, Any]:
    """Metrics over raw activations [B, D] from `batches` (stops after `max_tokens`); rows with a norm above
    `max_norm` (massive activations, see trainer/outliers.py) are counted in "outlier_rows" and left out.

    Returns {"tokens", "arch", "levels": [{"level", "width", "explained_variance", "mse", "l0",
    "dead_fraction"}], "explained_variance" (finest level), "hierarchy": summary, "edge_stats": one dict per
    edge in `model.edges()` order}; pop "edge_stats" for `checkpoint.write_hierarchy` (it can be long).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n_levels = len(model.level_widths)
    stats = HierarchyStats.for_model(model)
    sq_err = torch.zeros(n_levels, dtype=torch.float64)
    active = torch.zeros(n_levels, dtype=torch.float64)
    sum_x = torch.zeros(model.d_in, dtype=torch.float64)
    sum_sq = torch.zeros((), dtype=torch.float64)
    tokens = tokens_read = 0
    for x_raw_BD in batches:
        if max_tokens is not None and tokens_read >= max_tokens:
            break
        if max_tokens is not None:
            x_raw_BD = x_raw_BD[: max_tokens - tokens_read]
        x_raw_BD = x_raw_BD.to(device=device, dtype=torch.float32)
        tokens_read += x_raw_BD.shape[0]
        x_raw_BD = x_raw_BD[inliers(x_raw_BD, max_norm)]
        if x_raw_BD.shape[0] == 0:
            continue
        codes = model.encode(x_raw_BD)
        _, scale_B1 = model.normalize(x_raw_BD)
        for level in range(n_levels):
            x_hat_BD = model.denormalize(model.decode(codes, level), scale_B1)
            sq_err[level] += (x_raw_BD - x_hat_BD).double().pow(2).sum().cpu()
            active[level] += (codes[level].indices >= 0).sum().cpu()
        sum_x += x_raw_BD.double().sum(0).cpu()
        sum_sq += x_raw_BD.double().pow(2).sum().cpu()
        tokens += x_raw_BD.shape[0]
        stats.update(codes)
    model.train(was_training)
    if tokens == 0:
        raise ValueError("evaluate got no activations")
    total_var = (sum_sq - sum_x.pow(2).sum() / tokens).clamp_min(1e-12)  # Σ‖x − mean‖²
    levels = []
    for level, width in enumerate(model.level_widths):
        levels.append(
            {
                "level": level,
                "width": width,
                "explained_variance": float(1 - sq_err[level] / total_var),
                "mse": float(sq_err[level] / tokens),
                "l0": float(active[level] / tokens),
                "dead_fraction": float((stats.active[level] == 0).double().mean()),
            }
        )
    return {
        "tokens": tokens,
        "outlier_rows": tokens_read - tokens,
        "arch": model.arch,
        "levels": levels,
        "explained_variance": levels[-1]["explained_variance"],
        "hierarchy": stats.summary(),
        "edge_stats": stats.edge_stats(),
    }


def sae_replacement(model: HSAE, level: int | None = None, max_norm: float = math.inf) -> ReplaceFn:
    """Maps a layer's hidden states [B, T, D] to the model's reconstruction (levels 0..`level`); states with a
    norm above `max_norm` (massive activations, left out of training) pass through unchanged."""

    @torch.no_grad()
    def replace(hidden_BTD: Tensor) -> Tensor:
        device = next(model.parameters()).device
        flat = hidden_BTD.reshape(-1, hidden_BTD.shape[-1]).to(device=device, dtype=torch.float32)
        out = torch.where(inliers(flat, max_norm).unsqueeze(-1), model.reconstruct(flat, level), flat)
        return out.reshape(hidden_BTD.shape).to(device=hidden_BTD.device, dtype=hidden_BTD.dtype)

    return replace


def ce_loss_recovered(
    ce_loss: Callable[[ReplaceFn | None], float], model: HSAE, max_norm: float = math.inf
) -> dict[str, Any]:
    """CE loss score per level: (CE_zero − CE_sae) / (CE_zero − CE_clean).

    `ce_loss(replace_fn)` runs the language model over a fixed evaluation set with the hooked layer's hidden
    states replaced by `replace_fn(h)` (None = untouched) and returns the mean next-token cross-entropy.
    States above `max_norm` are kept unchanged both in the SAE's replacement and in the zero ablation, so the
    score covers the same positions (as for the BOS, which neither replaces).
    """

    def zero_ablation(hidden_BTD: Tensor) -> Tensor:
        return torch.where(inliers(hidden_BTD, max_norm).unsqueeze(-1), 0, hidden_BTD)

    clean = float(ce_loss(None))
    zero = float(ce_loss(zero_ablation))
    levels = []
    for level in range(len(model.level_widths)):
        with_sae = float(ce_loss(sae_replacement(model, level, max_norm)))
        score = (zero - with_sae) / (zero - clean) if zero != clean else float("nan")
        levels.append({"level": level, "ce_loss": with_sae, "ce_loss_score": score})
    final = levels[-1]["ce_loss_score"]
    return {"ce_clean": clean, "ce_zero": zero, "levels": levels, "ce_loss_score": final}


def _rows(metrics: dict[str, Any]) -> list[tuple[str, float | int | None]]:
    rows: list[tuple[str, float | int | None]] = [("tokens", metrics.get("tokens"))]
    if "outliers" in metrics:
        rows.append(("outlier rows left out", metrics["outliers"]["rows"]))
    for level in metrics.get("levels", []):
        i = level["level"]
        rows += [
            (f"L{i} width", level.get("width")),
            (f"L{i} explained variance", level.get("explained_variance")),
            (f"L{i} L0", level.get("l0")),
            (f"L{i} dead fraction", level.get("dead_fraction")),
        ]
    ce = metrics.get("ce")
    if ce:
        rows += [(f"L{lv['level']} CE loss score", lv["ce_loss_score"]) for lv in ce["levels"]]
    hierarchy = metrics.get("hierarchy", {})
    for key in HIERARCHY_ROWS:
        if key in hierarchy:
            rows.append((f"hierarchy {key}", hierarchy[key]))
    return rows


def format_metrics(
    metrics: dict[str, Any],
    baseline: dict[str, Any] | None = None,
    names: tuple[str, str] = ("run", "baseline"),
) -> str:
    """A plain-text table of `evaluate` results, with a baseline's beside them when given."""

    def cell(value: float | int | None) -> str:
        if value is None:
            return "-"
        return f"{value:,}" if isinstance(value, int) else f"{value:.4f}"

    ours = _rows(metrics)
    theirs = dict(_rows(baseline)) if baseline else {}
    width = max(len(name) for name, _ in ours) + 2
    header = f"{'metric':<{width}}{names[0]:>12}" + (f"{names[1]:>12}" if baseline else "")
    lines = [header, "-" * len(header)]
    for name, value in ours:
        line = f"{name:<{width}}{cell(value):>12}"
        if baseline:
            line += f"{cell(theirs.get(name)):>12}"
        lines.append(line)
    return "\n".join(lines)

"""What the decoder directions say about features, independent of any corpus: how aligned a child is with its
parent, and which output tokens a feature promotes and suppresses (its direction through the unembedding)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def _as_tensor(array: Any) -> torch.Tensor:
    return array.detach() if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))


def decoder_cosines(
    decoders: Sequence[Any],
    parent_level: np.ndarray,
    parent_idx: np.ndarray,
    child_level: np.ndarray,
    child_idx: np.ndarray,
) -> np.ndarray:
    """Cosine between each edge's parent and child decoder directions; decoders[l] is [W_l, D].

    For an MoE H-SAE, pass each child's effective direction in model space (P↑_j · D_j[:, slot])."""
    out = np.full(len(child_idx), np.nan, np.float32)
    unit = [torch.nn.functional.normalize(_as_tensor(d).float(), dim=-1) for d in decoders]
    for level in np.unique(child_level):
        rows = np.flatnonzero(child_level == level)
        if np.any(parent_level[rows] != level - 1):
            raise ValueError("every edge must link a child to the level directly above it")
        parent = unit[level - 1][torch.as_tensor(parent_idx[rows], device=unit[level - 1].device)]
        child = unit[level][torch.as_tensor(child_idx[rows], device=unit[level].device)]
        out[rows] = (parent * child.to(parent.device)).sum(-1).cpu().numpy()
    return out


def pair_cosines(
    decoders: Sequence[Any],
    level_a: np.ndarray,
    idx_a: np.ndarray,
    level_b: np.ndarray,
    idx_b: np.ndarray,
) -> np.ndarray:
    """Cosine between the decoder directions of each (level_a, idx_a), (level_b, idx_b) pair, any two levels
    (the cross-width relatives); decoders[l] is [W_l, D]."""
    out = np.full(len(idx_a), np.nan, np.float32)
    unit = [torch.nn.functional.normalize(_as_tensor(d).float(), dim=-1) for d in decoders]
    pairs = np.unique(np.stack([level_a, level_b], axis=1), axis=0) if len(idx_a) else []
    for la, lb in pairs:
        rows = np.flatnonzero((level_a == la) & (level_b == lb))
        a = unit[la][torch.as_tensor(idx_a[rows], device=unit[la].device)]
        b = unit[lb][torch.as_tensor(idx_b[rows], device=unit[lb].device)]
        out[rows] = (a * b.to(a.device)).sum(-1).cpu().numpy()
    return out


@dataclass(frozen=True)
class OutputTokens:
    """Per feature, the k output tokens whose logits its decoder direction raises most and lowers most."""

    positive_ids: np.ndarray  # int64 [F, k], strongest first
    positive_values: np.ndarray  # float32 [F, k]
    negative_ids: np.ndarray  # int64 [F, k], most negative first
    negative_values: np.ndarray
    token_strings: dict[int, str]  # every id above, decoded

    def positive(self, feature: int) -> list[tuple[str, float]]:
        return self._pairs(self.positive_ids[feature], self.positive_values[feature])

    def negative(self, feature: int) -> list[tuple[str, float]]:
        return self._pairs(self.negative_ids[feature], self.negative_values[feature])

    def _pairs(self, ids: np.ndarray, values: np.ndarray) -> list[tuple[str, float]]:
        return [(self.token_strings[int(i)], float(v)) for i, v in zip(ids, values, strict=True)]


def top_output_tokens(
    decoder_FD: Any,
    unembed_VD: Any,
    decode: Callable[[int], str],
    k: int = 10,
    batch_features: int = 1024,
) -> OutputTokens:
    """Logits of each decoder direction through the unembedding W_U [V, D] (fold the final norm's weight into
    W_U first if the model has one); `decode` turns a token id into its display string."""
    decoder = _as_tensor(decoder_FD).float()
    unembed = _as_tensor(unembed_VD).float().to(decoder.device)
    k = min(k, unembed.shape[0])
    pos_ids, pos_vals, neg_ids, neg_vals = [], [], [], []
    with torch.no_grad():
        for start in range(0, decoder.shape[0], batch_features):
            logits_BV = decoder[start : start + batch_features] @ unembed.T
            top = logits_BV.topk(k, dim=-1)
            bottom = logits_BV.topk(k, dim=-1, largest=False)
            pos_ids.append(top.indices.cpu())
            pos_vals.append(top.values.cpu())
            neg_ids.append(bottom.indices.cpu())
            neg_vals.append(bottom.values.cpu())
    positive_ids = torch.cat(pos_ids).numpy().astype(np.int64)
    negative_ids = torch.cat(neg_ids).numpy().astype(np.int64)
    used = np.unique(np.concatenate([positive_ids.ravel(), negative_ids.ravel()]))
    return OutputTokens(
        positive_ids=positive_ids,
        positive_values=torch.cat(pos_vals).numpy(),
        negative_ids=negative_ids,
        negative_values=torch.cat(neg_vals).numpy(),
        token_strings={int(i): decode(int(i)) for i in used},
    )

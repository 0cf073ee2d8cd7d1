"""The answer to a live prompt, from its tokens and per-level codes: per token the active features of every
level strongest first, with their parent links; and the strongest top-level features with their active
children. Pure Python over numpy arrays: no model is needed to test it."""

from __future__ import annotations

from typing import Any

import numpy as np

from backend.live.model import LevelCodes, PromptToken

SUMMARY_TOP = 10  # top-level features in the summary, and children shown per feature


def token_rows(
    text: str, tokens: list[PromptToken], codes: list[LevelCodes], parents: list[np.ndarray | None]
):
    """The `tokens` of the answer: per token, per level, the active features strongest first."""
    per_level = [(code.indices_TK.tolist(), code.values_TK.tolist()) for code in codes]
    parent_lists = [None if p is None else p.tolist() for p in parents] + [None] * (len(codes) - len(parents))
    rows = []
    for t, token in enumerate(tokens):
        levels, above = [], set()
        for (indices, values), parent_of in zip(per_level, parent_lists):
            active = sorted(
                ((i, v) for i, v in zip(indices[t], values[t]) if i >= 0 and v > 0),
                key=lambda item: (-item[1], item[0]),
            )
            features = []
            for index, value in active:
                parent = parent_of[index] if parent_of is not None and index < len(parent_of) else -1
                parent = parent if parent >= 0 else None
                features.append(
                    {"index": index, "value": value, "parent": parent, "parent_active": parent in above}
                )
            levels.append(features)
            above = {index for index, _ in active}
        rows.append(
            {
                "position": t,
                "id": token.id,
                "text": text[token.start : token.end],
                "start": token.start,
                "end": token.end,
                "levels": levels,
            }
        )
    return rows


def summary_tree(codes: list[LevelCodes], parents: list[np.ndarray | None], top: int = SUMMARY_TOP):
    """The strongest top-level features (by summed value over the prompt), each with its active children
    (those whose parent link points to it), recursively, at most `top` per node."""
    stats: list[dict[int, dict[str, Any]]] = []
    for level, code in enumerate(codes):
        found: dict[int, dict[str, Any]] = {}
        active = (code.indices_TK >= 0) & (code.values_TK > 0)
        for index, value in zip(code.indices_TK[active].tolist(), code.values_TK[active].tolist()):
            node = found.setdefault(
                index,
                {
                    "level": level,
                    "index": index,
                    "label": None,
                    "token_count": 0,
                    "max_value": 0.0,
                    "total_value": 0.0,
                    "children": [],
                },
            )
            node["token_count"] += 1
            node["max_value"] = max(node["max_value"], value)
            node["total_value"] += value
        stats.append(found)

    def strongest(nodes):
        return sorted(nodes, key=lambda n: (-n["total_value"], n["index"]))[:top]

    for level in range(len(stats) - 1, 0, -1):
        parent_of = parents[level]
        if parent_of is None:
            continue
        by_parent: dict[int, list[dict[str, Any]]] = {}
        for index, node in stats[level].items():
            parent = int(parent_of[index]) if index < len(parent_of) else -1
            if parent >= 0:
                by_parent.setdefault(parent, []).append(node)
        for parent, children in by_parent.items():
            if parent in stats[level - 1]:
                stats[level - 1][parent]["children"] = strongest(children)
    return strongest(stats[0].values()) if stats else []

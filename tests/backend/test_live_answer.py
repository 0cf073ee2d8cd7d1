"""backend/live/answer.py on hand-made codes: per-token features strongest first with parent links, and the
summary tree of the strongest top-level features with their active children."""

from __future__ import annotations

import numpy as np

from backend.live.answer import summary_tree, token_rows
from backend.live.model import LevelCodes, PromptToken

TEXT = "ab cd"
TOKENS = [PromptToken(7, 0, 2), PromptToken(9, 2, 5)]
PARENTS = [None, np.array([0, 0, 1, 1, 2, 2])]  # child i of parent i // 2
CODES = [
    LevelCodes(np.array([[1, 0], [2, -1]]), np.array([[0.5, 2.0], [1.0, 0.0]], np.float32)),
    LevelCodes(np.array([[1, 4], [5, 3]]), np.array([[0.25, 3.0], [0.0, 1.5]], np.float32)),
]


def test_token_rows():
    rows = token_rows(TEXT, TOKENS, CODES, PARENTS)
    assert [(r["position"], r["id"], r["text"], r["start"], r["end"]) for r in rows] == [
        (0, 7, "ab", 0, 2), (1, 9, " cd", 2, 5)]
    top, low = rows[0]["levels"]
    assert top == [{"index": 0, "value": 2.0, "parent": None, "parent_active": False},
                   {"index": 1, "value": 0.5, "parent": None, "parent_active": False}]
    assert low == [{"index": 4, "value": 3.0, "parent": 2, "parent_active": False},
                   {"index": 1, "value": 0.25, "parent": 0, "parent_active": True}]
    top, low = rows[1]["levels"]
    assert [f["index"] for f in top] == [2]  # an unused slot (-1) and a zero value are not active
    assert low == [{"index": 3, "value": 1.5, "parent": 1, "parent_active": False}]


def test_summary_tree():
    first, second, third = summary_tree(CODES, PARENTS)
    assert [(n["token_count"], n["max_value"], n["label"]) for n in (first, second, third)] == [
        (1, 2.0, None), (1, 1.0, None), (1, 0.5, None)]
    by_index = {n["index"]: n for n in (first, second, third)}
    assert [n["index"] for n in (first, second, third)] == [0, 2, 1]  # by summed value, strongest first
    assert [c["index"] for c in by_index[0]["children"]] == [1]
    assert [c["index"] for c in by_index[2]["children"]] == [4]
    assert [c["index"] for c in by_index[1]["children"]] == [3]
    assert summary_tree(CODES, PARENTS, top=1)[0]["index"] == 0

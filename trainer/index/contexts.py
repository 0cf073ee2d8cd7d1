"""Where the writer gets the text of the contexts that examples show.

A context is a fixed-length window of token ids cut from one source document. The indexer sees every context
once; only the few that end up as examples are written, so `ContextStore` keeps token ids compactly and can
forget the rest (`retain(accumulator.kept_context_ids())`) to stay bounded on a long corpus.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class ContextRecord:
    tokens: list[str]  # display strings, one per token
    doc_id: str
    start: int  # position of the first token in the document


class ContextProvider(Protocol):
    def get_contexts(self, context_ids: Sequence[int]) -> list[ContextRecord]:
        """The records of these contexts, in the same order; KeyError for an unknown id."""
        ...


class ContextStore:
    """Token ids [C, T] of contexts by id, decoded to strings only when the writer asks for them."""

    def __init__(self, decode_tokens: Callable[[Sequence[int]], list[str]]):
        self._decode = decode_tokens  # e.g. tokenizer.convert_ids_to_tokens
        self._chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._ids = np.empty(0, np.int64)  # sorted
        self._tokens: np.ndarray | None = None
        self._doc_ids = np.empty(0, object)
        self._starts = np.empty(0, np.int64)

    def add(self, context_ids: Any, token_ids_CT: Any, doc_ids: Sequence[str], starts: Any) -> None:
        ids = np.asarray(context_ids, np.int64).reshape(-1)
        tokens = np.asarray(token_ids_CT.cpu() if hasattr(token_ids_CT, "cpu") else token_ids_CT)
        if tokens.ndim != 2 or len(tokens) != len(ids) or len(doc_ids) != len(ids) or len(starts) != len(ids):
            raise ValueError("context_ids [C], token_ids [C, T], doc_ids [C] and starts [C] must agree")
        doc_array = np.empty(len(ids), object)
        doc_array[:] = [str(d) for d in doc_ids]
        self._chunks.append((ids, tokens.astype(np.int32), doc_array, np.asarray(starts, np.int64)))

    def _consolidate(self) -> None:
        if not self._chunks:
            return
        parts = ([self._ids], [], [self._doc_ids], [self._starts])
        if self._tokens is not None:
            parts[1].append(self._tokens)
        for ids, tokens, docs, starts in self._chunks:
            parts[0].append(ids)
            parts[1].append(tokens)
            parts[2].append(docs)
            parts[3].append(starts)
        self._chunks = []
        ids = np.concatenate(parts[0])
        order = np.argsort(ids, kind="stable")
        if np.any(np.diff(ids[order]) == 0):
            raise ValueError("a context id was added twice")
        self._ids = ids[order]
        self._tokens = np.concatenate(parts[1])[order]
        self._doc_ids = np.concatenate(parts[2])[order]
        self._starts = np.concatenate(parts[3])[order]

    def retain(self, context_ids: Any) -> None:
        """Forget every context not in `context_ids`."""
        self._consolidate()
        if self._tokens is None:
            return
        keep = np.isin(self._ids, np.asarray(context_ids, np.int64))
        self._ids, self._tokens = self._ids[keep], self._tokens[keep]
        self._doc_ids, self._starts = self._doc_ids[keep], self._starts[keep]

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(ids [C], token ids [C, T], doc ids [C], starts [C]) of every context held: what another process's
        store takes in `add` (a store itself does not pickle: its decoder is a closure)."""
        self._consolidate()
        tokens = self._tokens if self._tokens is not None else np.empty((0, 0), np.int32)
        return self._ids, tokens, self._doc_ids, self._starts

    def __len__(self) -> int:
        return len(self._ids) + sum(len(chunk[0]) for chunk in self._chunks)

    def get_contexts(self, context_ids: Sequence[int]) -> list[ContextRecord]:
        self._consolidate()
        wanted = np.asarray(context_ids, np.int64)
        at = np.minimum(np.searchsorted(self._ids, wanted), max(len(self._ids) - 1, 0))
        missing = wanted[(self._ids[at] != wanted) if len(self._ids) else slice(None)]
        if missing.size:
            raise KeyError(f"unknown context ids {missing[:5].tolist()}")
        assert self._tokens is not None
        return [
            ContextRecord(self._decode(self._tokens[i].tolist()), str(self._doc_ids[i]), int(self._starts[i]))
            for i in at
        ]

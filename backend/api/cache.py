"""Answers of the GET routes about one run, serialized once and kept, with ETags.

A complete run never changes except for its annotations, and every annotation change bumps
runs.annotation_version in its own transaction (backend/queries.py `write_annotation`). So an answer is
a function of (run id, checkpoint digest, annotation version, path and query): that is its cache key, and a
hash of it its ETag. A request still looks its run up (one indexed row: a replaced run has a new id, an
annotation a new version, so both are seen at once), then answers 304 when If-None-Match holds the ETag, or
the kept bytes, or builds, serializes and keeps the answer. Answers say `Cache-Control: no-cache`: clients
keep them but ask again each time, so an annotation shows on the next request. Each worker process keeps its
own cache, bounded in bytes, least recently used out first; the ETag is the same in every worker.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel
from sqlalchemy import Row

ETAG_SCHEMA = "1"  # bump when an answer's shape changes for the same data, so old ETags stop matching


class AnswerCache:
    """Serialized answers by key, at most `max_bytes` of bodies (0: keep nothing); safe across threads."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            body = self._items.get(key)
            if body is None:
                self.misses += 1
            else:
                self.hits += 1
                self._items.move_to_end(key)
            return body

    def put(self, key: str, body: bytes) -> None:
        if len(body) > self.max_bytes // 8:  # one answer never pushes out most of the others
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.bytes += len(body) - (len(old) if old is not None else 0)
            self._items[key] = body
            while self.bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self.bytes -= len(dropped)


def answer_key(run: Row, request: Request) -> str:
    """The ETag (quoted) of `request`'s answer about `run` (queries.RUN_COLUMNS); also the cache key."""
    raw = "\0".join(
        (
            ETAG_SCHEMA,
            str(run.id),
            run.checkpoint_digest,
            str(run.annotation_version),
            request.url.path,
            request.url.query,
        )
    )
    return f'"{hashlib.sha256(raw.encode()).hexdigest()[:32]}"'


def _matches(if_none_match: str | None, etag: str) -> bool:
    """Whether the client holds `etag`. "*" is not taken: it would answer 304 for a feature that does not
    exist (the tag is known before the answer is), and a reader only ever holds tags it was given."""
    if not if_none_match:
        return False
    return any(tag.strip().removeprefix("W/") == etag for tag in if_none_match.split(","))


def run_answer(request: Request, run: Row, model: type[BaseModel], build: Callable[[], Any]) -> Response:
    """The answer of a GET route about `run`: 304 if the client holds it, else the kept or fresh JSON body.
    `build` returns what the route would return (a dict the response model validates); it runs only on a
    miss, and its errors (404, 422) propagate uncached."""
    etag = answer_key(run, request)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if _matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    cache: AnswerCache = request.app.state.answers
    body = cache.get(etag)
    if body is None:
        body = model.model_validate(build()).model_dump_json().encode()
        cache.put(etag, body)
    return Response(body, media_type="application/json", headers=headers)

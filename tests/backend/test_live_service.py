"""backend/live/service.py without HTTP: one model load per run, the token limit, a full queue, the deadline,
batching and the least recently used model dropped, with a stand-in model (no torch)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from backend.live import (
    LevelCodes,
    LiveBusy,
    LiveRunSpec,
    LiveService,
    LiveTimeout,
    PromptToken,
    PromptTooLong,
)
from backend.settings import Settings


class SlowModel:
    device = "cpu"
    parents = [None, np.arange(8) // 2]

    def __init__(self, delay: float):
        self.delay = delay
        self.batches: list[int] = []

    def tokenize(self, text: str) -> list[PromptToken]:
        tokens, start = [], 0
        for word in text.split(" "):
            tokens.append(PromptToken(len(word), start, start + len(word)))
            start += len(word) + 1
        return tokens

    def encode(self, prompts: list[list[int]]) -> list[list[LevelCodes]]:
        time.sleep(self.delay)
        self.batches.append(len(prompts))
        out = []
        for prompt in prompts:
            T = len(prompt)
            top = LevelCodes(np.tile([[0, -1]], (T, 1)), np.tile([[1.0, 0.0]], (T, 1)).astype(np.float32))
            low = LevelCodes(np.tile([[1, 7]], (T, 1)), np.tile([[0.5, 0.25]], (T, 1)).astype(np.float32))
            out.append([top, low])
        return out


def spec(name: str = "run") -> LiveRunSpec:
    return LiveRunSpec(name, "lm", 3, f"/runs/{name}", "d" * 64)


def service(delay: float = 0.0, loads: list[str] | None = None, **settings) -> tuple[LiveService, SlowModel]:
    model = SlowModel(delay)

    def loader(run: LiveRunSpec, device: str) -> SlowModel:
        if loads is not None:
            loads.append(run.name)
        return model

    return LiveService(Settings(**settings), loader=loader), model


def test_answers_and_loads_each_run_once():
    loads: list[str] = []
    live, _ = service(loads=loads)

    async def main():
        try:
            return await asyncio.gather(*(live.activations(spec(), "a b c") for _ in range(4)))
        finally:
            await live.close()

    results = asyncio.run(main())
    assert loads == ["run"]
    assert [t["text"] for t in results[0].tokens] == ["a", "b", "c"] and results[0].device == "cpu"
    assert [node["index"] for node in results[0].summary] == [0]


def test_queued_prompts_are_encoded_together():
    live, model = service(delay=0.2, live_batch_size=8)

    async def main():
        try:
            await live.activations(spec(), "warm up")  # the model is loaded and the worker started
            return await asyncio.gather(*(live.activations(spec(), "a b") for _ in range(5)))
        finally:
            await live.close()

    asyncio.run(main())
    assert model.batches[0] == 1 and sum(model.batches[1:]) == 5 and len(model.batches) < 6


def test_prompt_limits():
    live, _ = service(max_prompt_tokens=3)

    async def main(text):
        try:
            return await live.activations(spec(), text)
        finally:
            await live.close()

    with pytest.raises(PromptTooLong, match="4 tokens; the limit is 3"):
        asyncio.run(main("a b c d"))
    live, _ = service(max_prompt_tokens=3)
    with pytest.raises(PromptTooLong, match="far more than the limit"):
        asyncio.run(main("x" * 3 * 65))


def test_full_queue_is_busy_with_a_retry_hint():
    live, _ = service(delay=0.5, live_queue_size=1, live_batch_size=1, live_timeout_s=10)

    async def main():
        try:
            await live.activations(spec(), "warm up")
            first = asyncio.ensure_future(live.activations(spec(), "a"))
            await asyncio.sleep(0.1)  # the worker has taken it: the queue is empty again
            second = asyncio.ensure_future(live.activations(spec(), "b"))
            await asyncio.sleep(0.1)  # waiting in the queue, which is now full
            with pytest.raises(LiveBusy) as busy:
                await live.activations(spec(), "c")
            await asyncio.gather(first, second)
            return busy.value
        finally:
            await live.close()

    busy = asyncio.run(main())
    assert int(busy.headers["Retry-After"]) >= 1 and busy.status == 503


def test_deadline_covers_the_whole_request():
    live, _ = service(delay=1.0, live_timeout_s=0.2)

    async def main():
        try:
            return await live.activations(spec(), "a")
        finally:
            await live.close()

    with pytest.raises(LiveTimeout, match="0.2 s"):
        asyncio.run(main())


def test_least_recently_used_model_is_dropped():
    loads: list[str] = []
    live, _ = service(loads=loads, live_cached_runs=1)

    async def main():
        try:
            for name in ("one", "two", "one"):
                await live.activations(spec(name), "a")
        finally:
            await live.close()

    asyncio.run(main())
    assert loads == ["one", "two", "one"]

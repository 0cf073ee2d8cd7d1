"""The live service: requests never touch the model from the event loop.

A prompt is tokenized in a worker thread, checked against the token limit (413), and queued (a full queue
answers 503 with Retry-After). One model thread takes whatever is queued, up to `live_batch_size` prompts,
and encodes them in one padded forward pass (right padding is invisible to real tokens under a causal mask).
Every request has one deadline covering loading, queueing and compute (504 past it). Models stay loaded per
run, the least recently used dropped beyond `live_cached_runs`; `preload` loads and warms them up before the
first request (`live_preload`, which `hsae demo` sets).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from backend.live.answer import summary_tree, token_rows
from backend.live.errors import LiveBusy, LiveTimeout, LiveUnavailable, PromptTooLong
from backend.live.model import (
    LevelCodes,
    LiveModel,
    LiveRunSpec,
    SteerOutput,
    SteerTerm,
    free_device_memory,
    load_model,
)
from backend.settings import Settings

WARMUP_TEXT = "The river flows past the old city, where people gather every morning to trade fish and news."
CHARS_PER_TOKEN_BOUND = (
    64  # no real tokenizer packs more characters into a token: longer texts are refused unread
)


@dataclass
class _Job:
    model: LiveModel
    token_ids: list[int]
    future: asyncio.Future
    cancelled: bool = False
    call: Callable[[], Any] | None = None  # work of its own (steering), run alone; None: encode token_ids


@dataclass
class LiveResult:
    tokens: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    device: str
    elapsed_ms: float


Loader = Callable[[LiveRunSpec, str], LiveModel]
"""(run, device) -> model; the default is model.load_model (the real model) with the settings' CPU threads."""


@dataclass
class _Loop:
    """The queue and worker of one event loop (tests may run the app on several loops in turn)."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    worker: asyncio.Task
    batch_seconds: list[float] = field(default_factory=lambda: [0.1])


class LiveService:
    def __init__(self, settings: Settings, loader: Loader | None = None):
        self.max_tokens = settings.max_prompt_tokens
        self.queue_size = settings.live_queue_size
        self.batch_size = settings.live_batch_size
        self.timeout_s = settings.live_timeout_s
        self.cached_runs = settings.live_cached_runs
        self.device = settings.live_device
        self._loader = loader or partial(load_model, cpu_threads=settings.live_cpu_threads)
        # One thread runs every load and forward pass: the models are never used concurrently.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hsae-live")
        self._lock = threading.Lock()
        self._models: OrderedDict[tuple, LiveModel] = OrderedDict()
        self._loading: dict[tuple, concurrent.futures.Future] = {}
        self._loop: _Loop | None = None

    async def activations(self, spec: LiveRunSpec, text: str) -> LiveResult:
        started = time.perf_counter()
        job: _Job | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                model, tokens = await self._tokenized(spec, text)
                codes: list[LevelCodes] = []
                if tokens:
                    job = self._enqueue(model, [t.id for t in tokens])
                    codes = await job.future
        except TimeoutError:
            if job is not None:
                job.cancelled = True
            raise self._timeout() from None
        # Building the answer is pure Python work proportional to the prompt: off the event loop too.
        rows, summary = await asyncio.to_thread(
            lambda: (token_rows(text, tokens, codes, model.parents), summary_tree(codes, model.parents))
        )
        return LiveResult(rows, summary, model.device, (time.perf_counter() - started) * 1000)

    async def steer(
        self, spec: LiveRunSpec, text: str, terms: list[SteerTerm], max_new_tokens: int
    ) -> tuple[SteerOutput, str, float]:
        """The steered and unsteered continuations of `text`, with the model's device and the elapsed ms.
        The same limits as `activations`: the prompt's token limit (413), the queue (503, where a steering
        request takes one place) and the deadline (504)."""
        started = time.perf_counter()
        job: _Job | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                model, tokens = await self._tokenized(spec, text)
                job = self._enqueue(
                    model, [t.id for t in tokens], call=partial(
                        model.steer, [t.id for t in tokens], terms, max_new_tokens)
                )
                output = await job.future
        except TimeoutError:
            if job is not None:
                job.cancelled = True
            raise self._timeout() from None
        return output, model.device, (time.perf_counter() - started) * 1000

    async def _tokenized(self, spec: LiveRunSpec, text: str) -> tuple[LiveModel, list]:
        if len(text) > self.max_tokens * CHARS_PER_TOKEN_BOUND:
            raise PromptTooLong(
                f"the prompt has {len(text)} characters, far more than the limit of {self.max_tokens} tokens"
            )
        model = await asyncio.wrap_future(self._model_future(spec))
        tokens = await asyncio.to_thread(model.tokenize, text)
        if len(tokens) > self.max_tokens:
            raise PromptTooLong(f"the prompt has {len(tokens)} tokens; the limit is {self.max_tokens}")
        return model, tokens

    def _timeout(self) -> LiveTimeout:
        return LiveTimeout(f"the live model did not answer within {self.timeout_s:g} s; try again later")

    async def preload(self, spec: LiveRunSpec, warmup_text: str = WARMUP_TEXT) -> float:
        """Load the run's model and encode a prompt with it (the first forward passes pay one-time costs:
        kernel selection, allocator growth), so that its first request is as fast as the rest. Returns the
        seconds it took; a run that cannot be loaded raises LiveUnavailable."""
        started = time.perf_counter()
        model = await asyncio.wrap_future(self._model_future(spec))

        def warm_up() -> None:
            ids = [t.id for t in model.tokenize(warmup_text)]
            for batch in ([ids], [ids, ids[: len(ids) // 2]]):
                model.encode(batch)

        await asyncio.get_running_loop().run_in_executor(self._executor, warm_up)
        return time.perf_counter() - started

    def _model_future(self, spec: LiveRunSpec) -> concurrent.futures.Future:
        """A future of the loaded model: done at once when cached; one load per run however many ask."""
        with self._lock:
            if spec.key in self._models:
                self._models.move_to_end(spec.key)
                done: concurrent.futures.Future = concurrent.futures.Future()
                done.set_result(self._models[spec.key])
                return done
            loading = self._loading.get(spec.key)
            if loading is None:
                loading = self._executor.submit(self._load, spec)
                self._loading[spec.key] = loading
            return loading

    def _load(self, spec: LiveRunSpec) -> LiveModel:
        try:
            model = self._loader(spec, self.device)
        finally:
            with self._lock:
                self._loading.pop(spec.key, None)
        with self._lock:
            self._models[spec.key] = model
            while len(self._models) > self.cached_runs:
                self._models.popitem(last=False)
                free_device_memory()
        return model

    def _enqueue(self, model: LiveModel, token_ids: list[int], call: Callable[[], Any] | None = None) -> _Job:
        state = self._state()
        job = _Job(model, token_ids, state.loop.create_future(), call=call)
        try:
            state.queue.put_nowait(job)
        except asyncio.QueueFull:
            per_batch = sum(state.batch_seconds) / len(state.batch_seconds)
            wait = max(1, math.ceil(per_batch * self.queue_size / self.batch_size))
            raise LiveBusy(
                f"the live model is busy ({self.queue_size} prompts waiting); retry in {wait} s",
                headers={"Retry-After": str(wait)},
            ) from None
        return job

    def _state(self) -> _Loop:
        loop = asyncio.get_running_loop()
        if self._loop is None or self._loop.loop is not loop or self._loop.worker.done():
            queue: asyncio.Queue = asyncio.Queue(self.queue_size)
            self._loop = _Loop(loop, queue, loop.create_task(self._work(queue)))
        return self._loop

    async def _work(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs: list[_Job] = [await queue.get()]
            while len(jobs) < self.batch_size and not queue.empty():
                jobs.append(queue.get_nowait())
            jobs = [job for job in jobs if not job.cancelled and not job.future.done()]
            for job in [job for job in jobs if job.call is not None]:
                try:
                    output = await loop.run_in_executor(self._executor, job.call)
                except Exception as err:
                    if not job.future.done():
                        job.future.set_exception(err)
                    continue
                if not job.future.done():
                    job.future.set_result(output)
            by_model: dict[int, list[_Job]] = {}
            for job in jobs:
                if job.call is None:
                    by_model.setdefault(id(job.model), []).append(job)
            for group in by_model.values():
                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(
                        self._executor, group[0].model.encode, [job.token_ids for job in group]
                    )
                except Exception as err:  # the model failed: every waiting request learns why
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(err)
                    continue
                if self._loop is not None:
                    self._loop.batch_seconds = [
                        *self._loop.batch_seconds[-19:],
                        time.perf_counter() - started,
                    ]
                for job, codes in zip(group, results, strict=True):
                    if not job.future.done():
                        job.future.set_result(codes)

    async def close(self) -> None:
        if self._loop is not None and self._loop.loop is asyncio.get_running_loop():
            self._loop.worker.cancel()
            while not self._loop.queue.empty():
                job = self._loop.queue.get_nowait()
                if not job.future.done():
                    job.future.set_exception(LiveUnavailable("the server is shutting down"))
        self._loop = None
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._models.clear()

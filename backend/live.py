"""Live prompt activations: a run's language model and HSAE, loaded once and kept, behind a bounded queue.

Requests never touch the model from the event loop. A prompt is tokenized in a worker thread, checked
against the token limit (413), and queued (a full queue answers 503 with Retry-After). One model thread
takes whatever is queued, up to `live_batch_size` prompts, and encodes them in one padded forward pass
(right padding is invisible to real tokens under a causal mask). Every request has one deadline covering
loading, queueing and compute (504 past it). Models stay loaded per run, the least recently used dropped
beyond `live_cached_runs`.

As in the index, every prompt starts with the tokenizer's BOS token, which takes the attention-sink role and
is not shown; special tokens written in the text are dropped; a latent is active when its value is > 0.
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
from typing import Any, Protocol

import numpy as np
import torch

from trainer.errors import HSAEError
from trainer.outliers import encode_inliers
from backend.settings import Settings

SUMMARY_TOP = 10  # top-level features in the summary, and children shown per feature
CHARS_PER_TOKEN_BOUND = (
    64  # no real tokenizer packs more characters into a token: longer texts are refused unread
)


class LiveError(HSAEError):
    status = 500
    code = "live_error"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = headers or {}


class PromptTooLong(LiveError):
    status, code = 413, "prompt_too_long"


class LiveBusy(LiveError):
    status, code = 503, "busy"


class LiveTimeout(LiveError):
    status, code = 504, "timeout"


class LiveUnavailable(LiveError):
    """The run cannot be encoded live here (no checkpoint path, missing files, model not loadable)."""

    status, code = 409, "live_unavailable"


@dataclass(frozen=True)
class LiveRunSpec:
    """What the service needs to know of a run (a copy, so no database object crosses threads)."""

    name: str
    model_name: str
    layer: int
    checkpoint_path: str | None
    checkpoint_digest: str

    @property
    def key(self) -> tuple[str | None, str, str, int]:
        return (self.checkpoint_path, self.checkpoint_digest, self.model_name, self.layer)


@dataclass(frozen=True)
class PromptToken:
    id: int
    start: int
    end: int


@dataclass(frozen=True)
class LevelCodes:
    indices_TK: np.ndarray  # int64, -1 = unused slot
    values_TK: np.ndarray  # float32


class LiveModel(Protocol):
    device: str
    parents: list[
        np.ndarray | None
    ]  # per level: each latent's parent in the level above (-1: none); None at 0

    def tokenize(self, text: str) -> list[PromptToken]: ...

    def encode(self, prompts: list[list[int]]) -> list[list[LevelCodes]]:
        """Per prompt, per level, the codes of its tokens (BOS excluded)."""
        ...


class TransformerLiveModel:
    """A run's language model (stopped after its layer) and its HSAE, on CUDA when available."""

    def __init__(self, lm: Any, hsae: Any, max_norm: float = math.inf):
        self.lm, self.hsae = lm, hsae
        self.max_norm = max_norm  # massive activations get no features, as in training and indexing
        self.device = str(lm.device)
        tokenizer = lm.tokenizer
        self.bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.special = set(tokenizer.all_special_ids)
        self.parents = [
            None if level == 0 else _as_numpy(hsae.parent_of(level))
            for level in range(len(hsae.level_widths))
        ]

    @classmethod
    def load(cls, spec: LiveRunSpec, device: str, cpu_threads: int | None = None) -> TransformerLiveModel:
        """`cpu_threads`: torch's threads (for the whole process) when the device is the CPU; None leaves
        torch's default. `hsae serve` passes all cores but one: the web server and the database need a core
        too, and torch's threads wait for each other by spinning, so on a busy 2-core machine two of them
        made a forward pass 60 times slower than one."""
        from trainer import checkpoint
        from trainer.lm import load_language_model, resolve_device

        if not spec.checkpoint_path:
            raise LiveUnavailable(
                f"run {spec.name!r} has no checkpoint path: re-index it to enable live prompts"
            )
        try:
            dev = resolve_device(device)
            if dev.type == "cpu" and cpu_threads:
                torch.set_num_threads(cpu_threads)
            ckpt = checkpoint.open(spec.checkpoint_path, device=dev)  # first: it fails fast when missing
            changed = ckpt.digest != spec.checkpoint_digest
            if not changed:
                lm = load_language_model(spec.model_name, spec.layer, str(dev))
        except HSAEError as err:
            raise LiveUnavailable(f"cannot load run {spec.name!r} for live prompts: {err}") from None
        if changed:
            raise LiveUnavailable(
                f"the checkpoint at {spec.checkpoint_path} changed since run {spec.name!r} was indexed "
                "(its weights digest differs): re-index it"
            )
        if ckpt.model.d_in != lm.d_model:
            raise LiveUnavailable(
                f"run {spec.name!r}: the checkpoint expects width {ckpt.model.d_in}, the model gives {lm.d_model}"
            )
        return cls(lm, ckpt.model, ckpt.max_norm)

    def tokenize(self, text: str) -> list[PromptToken]:
        encoded = self.lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [
            PromptToken(int(token), int(start), int(end))
            for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
            if token not in self.special
        ]

    @torch.inference_mode()
    def encode(self, prompts: list[list[int]]) -> list[list[LevelCodes]]:
        T = 1 + max(len(p) for p in prompts)
        ids_BT = torch.zeros(len(prompts), T, dtype=torch.long)
        mask_BT = torch.zeros(len(prompts), T, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids_BT[b, : 1 + len(prompt)] = torch.tensor([self.bos, *prompt])
            mask_BT[b, : 1 + len(prompt)] = 1
        resid_BTD = self.lm.residual(ids_BT, mask_BT)
        data_BT = mask_BT.bool()
        data_BT[:, 0] = False
        codes, _ = encode_inliers(self.hsae, resid_BTD[data_BT.to(resid_BTD.device)].float(), self.max_norm)
        per_level = [(c.indices.cpu().numpy(), c.values.float().cpu().numpy()) for c in codes]
        out, start = [], 0
        for prompt in prompts:
            stop = start + len(prompt)
            out.append([LevelCodes(indices[start:stop], values[start:stop]) for indices, values in per_level])
            start = stop
        return out


def _as_numpy(tensor: torch.Tensor | None) -> np.ndarray | None:
    return None if tensor is None else tensor.detach().cpu().numpy().astype(np.int64)


# ---- the answer ------------------------------------------------------------------------------------------
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


# ---- the service -----------------------------------------------------------------------------------------
@dataclass
class _Job:
    model: LiveModel
    token_ids: list[int]
    future: asyncio.Future
    cancelled: bool = False


@dataclass
class LiveResult:
    tokens: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    device: str
    elapsed_ms: float


Loader = Callable[[LiveRunSpec, str], LiveModel]
"""(run, device) -> model; the default is TransformerLiveModel.load with the settings' CPU threads."""


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
        self._loader = loader or partial(TransformerLiveModel.load, cpu_threads=settings.live_cpu_threads)
        # One thread runs every load and forward pass: the models are never used concurrently.
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hsae-live")
        self._lock = threading.Lock()
        self._models: OrderedDict[tuple, LiveModel] = OrderedDict()
        self._loading: dict[tuple, concurrent.futures.Future] = {}
        self._loop: _Loop | None = None

    async def activations(self, spec: LiveRunSpec, text: str) -> LiveResult:
        started = time.perf_counter()
        if len(text) > self.max_tokens * CHARS_PER_TOKEN_BOUND:
            raise PromptTooLong(
                f"the prompt has {len(text)} characters, far more than the limit of {self.max_tokens} tokens"
            )
        job: _Job | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                model = await asyncio.wrap_future(self._model_future(spec))
                tokens = await asyncio.to_thread(model.tokenize, text)
                if len(tokens) > self.max_tokens:
                    raise PromptTooLong(
                        f"the prompt has {len(tokens)} tokens; the limit is {self.max_tokens}"
                    )
                codes: list[LevelCodes] = []
                if tokens:
                    job = self._enqueue(model, [t.id for t in tokens])
                    codes = await job.future
        except TimeoutError:
            if job is not None:
                job.cancelled = True
            raise LiveTimeout(
                f"the live model did not answer within {self.timeout_s:g} s; try again later"
            ) from None
        # Building the answer is pure Python work proportional to the prompt: off the event loop too.
        rows, summary = await asyncio.to_thread(
            lambda: (token_rows(text, tokens, codes, model.parents), summary_tree(codes, model.parents))
        )
        return LiveResult(rows, summary, model.device, (time.perf_counter() - started) * 1000)

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
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return model

    def _enqueue(self, model: LiveModel, token_ids: list[int]) -> _Job:
        state = self._state()
        job = _Job(model, token_ids, state.loop.create_future())
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
            by_model: dict[int, list[_Job]] = {}
            for job in jobs:
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

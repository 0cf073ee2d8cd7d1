"""The training loop: any model from the registry, any ActivationSource.

Adam, linear warm-up then cosine decay, global-norm clipping, dead-latent tracking over a window of tokens,
a progress bar with tokens/s, loss, explained variance and L0, and atomic checkpoints that carry the full
training state, so that `resume=True` continues a killed run exactly as if it had never stopped.

The loop keeps the device busy: batches are read on a background thread (`Prefetcher`; pinned for CUDA,
or indices into the whole activation matrix when it fits on the GPU), on CUDA checkpoints are snapshotted
to host memory and written by a writer thread (`BackgroundWriter`, atomic as before), and the loop's own
host syncs are one per step (the NaN check) plus one per logged step. Under torchrun the same function
trains one model over several processes (`trainer.distributed`).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from trainer import checkpoint, distributed
from trainer.activations import ShardSource
from trainer.config import ConfigError, TrainConfig
from trainer.data import ActivationSource, TensorSource, batch_stream
from trainer.errors import HSAEError
from trainer.models import HSAE, LevelCode, StepOutput
from trainer.outliers import inliers, norm_threshold

LOG_FILE = "train_log.jsonl"
NORM_SAMPLE_TOKENS = 8192  # tokens used to fit the input normalisation and data-dependent init
_SAMPLE_SEED_OFFSET = 104_729  # the sample is drawn with its own seed so the training order is unchanged


class TrainingError(HSAEError, RuntimeError):
    """Training cannot go on; the message says why in one line."""


class TrainingDiverged(TrainingError):
    """The loss or gradient became NaN/inf; training stopped and the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    logs: dict[str, float]  # the last logged values
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int | None = None


class DeadLatentTracker:
    """Tokens since each latent last fired, per level; dead = silent for at least `window` tokens."""

    def __init__(self, widths: list[int], window: int, device: torch.device):
        self.window = window
        self.since_fired = [torch.zeros(w, dtype=torch.long, device=device) for w in widths]

    def update(self, codes: list[LevelCode]) -> None:
        """Counts firings without a host sync; under data parallelism the counts and the rows are summed over
        ranks (one collective), so every rank tracks the whole batch."""
        fired = [
            torch.zeros(len(since), dtype=torch.int32, device=since.device).index_add_(
                0, code.indices.clamp(min=0).reshape(-1), (code.indices >= 0).reshape(-1).int()
            )
            for since, code in zip(self.since_fired, codes)
        ]
        rows = codes[0].indices.new_full((1,), codes[0].indices.shape[0], dtype=torch.int32)
        if distributed.current().parallel:
            flat = distributed.all_reduce_sum_(torch.cat([*fired, rows]))
            fired, rows = list(flat[:-1].split([len(f) for f in fired])), flat[-1:]
        self.since_fired = [
            torch.where(f > 0, 0, since + rows.to(since.dtype)) for since, f in zip(self.since_fired, fired)
        ]

    def dead_masks(self) -> list[torch.Tensor]:
        return [since >= self.window for since in self.since_fired]

    def state_dict(self) -> dict[str, Any]:
        since = [s.detach().to("cpu", copy=True) for s in self.since_fired]
        return {"window": self.window, "since_fired": since}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.since_fired = [s.to(old.device) for s, old in zip(state["since_fired"], self.since_fired)]


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up from ~0 (the MoE paper starts at 1e-11), then cosine decay to `min_ratio`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def explained_variance(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """1 − Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch."""
    x_BD, x_hat_BD = x_BD.float(), x_hat_BD.float()
    return 1 - (x_BD - x_hat_BD).pow(2).sum() / (x_BD - x_BD.mean(0)).pow(2).sum().clamp_min(1e-12)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}  # the models draw only from torch's generators
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _draw_sample(
    source: ActivationSource, batch_size: int, seed: int, tokens: int = NORM_SAMPLE_TOKENS
) -> torch.Tensor:
    """About `tokens` rows (all of them if there are fewer), in the source's own shuffled order for `seed`."""
    batch_size = min(batch_size, source.num_rows)
    batches = source.batches(batch_size, seed=seed + _SAMPLE_SEED_OFFSET)
    n = max(1, math.ceil(min(tokens, source.num_rows) / batch_size))
    sample = torch.cat([next(batches) for _ in range(n)])
    if not bool(torch.isfinite(sample).all()):
        raise TrainingError("the activations contain NaN or inf values (seen in the normalisation sample)")
    return sample


def _reassign_sample(
    model: HSAE, source: ActivationSource, cfg: TrainConfig, step: int, device: torch.device
) -> torch.Tensor | None:
    """The rows a re-assignment at `step` looks at: a function of (seed, step) only, so a resumed run
    re-assigns exactly as an uninterrupted one; None when the architecture wants no data."""
    tokens = model.reassign_tokens()
    if not tokens:
        return None
    return _draw_sample(source, cfg.batch_size, cfg.seed + step, tokens).to(device)


def make_optimizer(model: HSAE, cfg: TrainConfig, total_steps: int):
    """Adam (betas: the config's, else the architecture's paper values) with warm-up + cosine decay."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.adam_betas or model.default_betas)
    warmup = cfg.resolved_warmup(total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.min_lr_ratio)
    )
    return optimizer, scheduler


def make_autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def train_step(
    model: HSAE,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x_BD: torch.Tensor,
    step: int,
    dead: list[torch.Tensor] | None,
    *,
    autocast: torch.autocast,
    grad_clip: float | None,
    grad_scale: float = 1.0,
) -> tuple[StepOutput, torch.Tensor, torch.Tensor]:
    """One optimizer step; raises TrainingDiverged before touching the weights if the loss or the gradient is
    not finite (one host sync for both). Returns (model output, loss, gradient norm before clipping).

    Under data parallelism (`trainer.distributed`) the gradient of `grad_scale` × this rank's loss is summed
    over ranks before the decoder hooks and clipping, so every rank steps with the whole batch's gradient."""
    with autocast:
        out = model.loss(x_BD, step, dead)
    loss = out.loss.float()
    optimizer.zero_grad(set_to_none=True)
    (loss * grad_scale if grad_scale != 1.0 else loss).backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    distributed.all_reduce_grads(params)
    model.before_optimizer_step()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"loss became {loss.item()} at step {step}")
        raise TrainingDiverged(f"gradient norm became {grad_norm.item()} at step {step}")
    optimizer.step()
    scheduler.step()
    model.after_optimizer_step(step + 1)
    return out, loss, grad_norm


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class Prefetcher:
    """Runs an iterator on a background thread, up to `depth` items ahead of the loop; an exception the
    iterator raises (an interrupt included) is raised by `next` at the item where it happened."""

    def __init__(self, items: Iterator[Any], depth: int = 4):
        self._queue: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items,), name="hsae-prefetch", daemon=True)
        self._thread.start()

    def _run(self, items: Iterator[Any]) -> None:
        try:
            for item in items:
                if not self._put(item):
                    return
        except BaseException as err:  # noqa: BLE001  (handed to the loop, which raises it)
            self._put(_Failed(err))

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Any:
        item = self._queue.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


class BackgroundWriter:
    """One thread that writes the run directory's files (checkpoints, log lines) in the order they were
    submitted, so the loop does not wait for the disk; at most one checkpoint is in flight. `wait` raises
    what a write raised. With `background=False` every write happens at once in the caller: on a CPU the
    writer would take cores from the step and the snapshot copies would cost more than they save (measured
    with bench/bench_loop.py, flat TopK 16k with a checkpoint every 3 steps: 0.53 of the step-only rate
    written in the background, 0.77 in the loop)."""

    def __init__(self, background: bool = True) -> None:
        self.background = background
        self._pool = None
        if background:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hsae-writer")
        self._pending: list[Future] = []
        self._last_save: Future | None = None

    def submit(self, fn, *args, save: bool = False) -> None:
        if self._pool is None:
            fn(*args)
            return
        if save and self._last_save is not None:
            self._last_save.result()  # one snapshot of the model in memory at a time
        future = self._pool.submit(fn, *args)
        if save:
            self._last_save = future
        still = []
        for f in self._pending:
            if f.done():
                f.result()  # a failed write stops training at once
            else:
                still.append(f)
        self._pending = [*still, future]

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)


# checkpoints written on the writer thread; None: on CUDA only (BackgroundWriter); tests set it to cover both
BACKGROUND_WRITES: bool | None = None


def _cpu_copy(obj: Any) -> Any:
    """A deep copy of nested dicts/lists of tensors, every tensor on the CPU, sharing nothing with `obj`."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _snapshot(model: HSAE) -> HSAE:
    """The model as it is now, on the CPU, for a writer thread while training goes on: built on the meta
    device (no initialisation cost) and given copies of the parameters and buffers."""
    state = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
    with torch.device("meta"):
        frozen = type(model)(model.cfg, model.d_in)
    frozen.load_state_dict(state, assign=True)
    return frozen.eval()


def _append_lines(path: Path, lines: list[str]) -> None:
    with open(path, "a") as f:
        f.write("".join(line + "\n" for line in lines))


# the activation cache goes onto the GPU whole when it takes at most this share of the free memory
RESIDENT_FRACTION = 0.25


def _resident_rows(source: ActivationSource, device: torch.device) -> torch.Tensor | None:
    """The whole activation matrix on `device` when it is a CUDA device with room for it, else None."""
    if device.type != "cuda" or type(source) not in (TensorSource, ShardSource):
        return None
    free, _ = torch.cuda.mem_get_info(device)
    if source.num_rows * source.d_in * 4 > RESIDENT_FRACTION * free:
        return None
    rows_ND = torch.empty(source.num_rows, source.d_in, dtype=torch.float32, device=device)
    for lo in range(0, source.num_rows, 65_536):
        hi = min(lo + 65_536, source.num_rows)
        rows_ND[lo:hi] = torch.from_numpy(source.read(lo, hi)).to(device)
    return rows_ND


def _batch_feed(
    source: ActivationSource, cfg: TrainConfig, start: int, world: distributed.World, device: torch.device,
    max_norm: float, resident_ND: torch.Tensor | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(rows, CPU bool inlier mask or None) for this rank, for the prefetch thread: host rows come pinned
    when the device is CUDA; with the matrix resident on the device, the rows are an index (pinned) into it
    and the mask comes from norms computed once."""
    shard = (world.rank, world.size)
    if resident_ND is not None:
        keep_N = None
        if math.isfinite(max_norm):
            keep_N = torch.cat([inliers(block, max_norm).cpu() for block in resident_ND.split(65_536)])
        per_rank = cfg.batch_size // world.size
        for idx in source.batch_indices(cfg.batch_size, seed=cfg.seed, start_step=start):
            idx_B = torch.from_numpy(idx[world.rank * per_rank : (world.rank + 1) * per_rank])
            yield idx_B.pin_memory(), None if keep_N is None else keep_N[idx_B]
        return
    for x_BD in batch_stream(source, cfg.batch_size, seed=cfg.seed, start_step=start, shard=shard):
        keep_B = inliers(x_BD, max_norm) if math.isfinite(max_norm) else None
        yield (x_BD.pin_memory() if device.type == "cuda" else x_BD), keep_B


def train(
    model: HSAE,
    source: ActivationSource,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    model_info: dict[str, Any],
    data_info: dict[str, Any] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Trains `model` (from `build_model(arch_cfg, source.d_in, seed=...)`) and checkpoints it to `run_dir`.

    With `resume=True` and a checkpoint in `run_dir`, the model, optimizer, schedule, RNG and dead-latent
    state are restored and training continues from its step; `cfg.steps` may be raised to train longer.

    Under torchrun (`trainer.distributed`), every rank calls this with the same arguments; rank 0 alone
    writes `run_dir` and shows progress.
    """
    run_dir = Path(run_dir)
    world = distributed.current()
    if source.d_in != model.d_in:
        raise ConfigError(
            f"the activations have width {source.d_in} but the model was built for d_in={model.d_in}"
        )
    if cfg.batch_size > source.num_rows:  # checked before anything is written to run_dir
        raise ConfigError(
            f"batch size {cfg.batch_size} exceeds the {source.num_rows} rows of activations: "
            "lower --batch or give more data"
        )
    if cfg.batch_size % world.size:
        raise ConfigError(
            f"batch size {cfg.batch_size} is not divisible by the {world.size} processes: "
            "each rank reads an equal slice of every batch"
        )
    device = cfg.resolved_device()
    total = cfg.steps or max(1, source.num_rows // cfg.batch_size)
    train_state = None
    if world.is_main:
        checkpoint.recover(run_dir)  # this process writes run_dir: a save killed mid-swap is put right first
    distributed.barrier()
    if checkpoint.is_checkpoint(run_dir):
        if not resume:
            raise ConfigError(f"{run_dir} already holds a checkpoint; resume it or choose another directory")
        train_state = _restore(model, run_dir, cfg)
    max_norm = math.inf
    if world.is_main:  # data-dependent set-up on rank 0; the others receive its result
        # a function of (source, seed) only, so a resumed run skips exactly the rows the first one did
        sample = _draw_sample(source, cfg.batch_size, cfg.seed)
        max_norm = norm_threshold(sample, cfg.max_norm_multiple)
        if train_state is None:
            torch.manual_seed(cfg.seed)
            model.prepare(sample[inliers(sample, max_norm)])
        del sample
    elif train_state is None:
        torch.manual_seed(cfg.seed)
    max_norm = distributed.broadcast_object(max_norm)
    model.to(device).train()
    distributed.broadcast_module(model)
    model.start_training(total)
    optimizer, scheduler = make_optimizer(model, cfg, total)
    tracker = DeadLatentTracker(model.level_widths, cfg.dead_window_tokens, device)
    start = 0
    if train_state is not None:
        optimizer.load_state_dict(train_state["optimizer"])
        scheduler.load_state_dict(train_state["scheduler"])
        tracker.load_state_dict(train_state["dead"])
        _set_rng_state(train_state["rng"])
        start = int(train_state["step"])
        if world.is_main:
            _truncate_log(run_dir / LOG_FILE, start)
    distributed.broadcast_rng()
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    background = device.type == "cuda" if BACKGROUND_WRITES is None else BACKGROUND_WRITES
    writer = BackgroundWriter(background)

    def save(step: int) -> None:
        """Snapshots everything now (the copies are the only pause) and writes it on the writer thread; on a
        CPU, writes it at once from the live tensors."""
        copied = _cpu_copy if writer.background else (lambda state: state)
        state = {
            "step": step,
            "optimizer": copied(optimizer.state_dict()),
            "scheduler": scheduler.state_dict(),
            "dead": copied(tracker.state_dict()),
            "rng": _rng_state(),
        }
        training = {
            **cfg.to_dict(),
            "step": step,
            "total_steps": total,
            "warmup_steps": cfg.resolved_warmup(total),
            "tokens_seen": step * cfg.batch_size,
            "max_norm": max_norm if math.isfinite(max_norm) else None,
            "finished": step >= total,
            "adam_betas": list(cfg.adam_betas or model.default_betas),
            "world_size": world.size,
        }
        frozen = _snapshot(model) if writer.background else model
        writer.submit(
            functools.partial(
                checkpoint.save_checkpoint, run_dir, frozen, model_info=model_info, training=training,
                data_info=data_info, train_state=state,
            ),
            save=True,
        )

    autocast = make_autocast(device, cfg.resolved_dtype())
    peak = peak_flops(device, cfg.resolved_dtype())
    # model FLOPs utilisation per card, as nanoGPT prints it: one rank's step FLOPs × steps/s over its peak
    flops_per_token_per_peak = (
        model.train_flops(cfg.batch_size // world.size) / cfg.batch_size / peak if peak else None
    )
    resident_ND = _resident_rows(source, device)
    feed = Prefetcher(_batch_feed(source, cfg, start, world, device, max_norm, resident_ND))
    history: list[dict[str, float]] = []
    logs: dict[str, float] = {}
    last_saved = start if train_state is not None else None
    bar = tqdm(total=total, initial=start, disable=not (cfg.progress and world.is_main), unit="step",
               dynamic_ncols=True)
    clock, clock_step = time.perf_counter(), start
    per_rank = cfg.batch_size // world.size
    try:
        for step in range(start, total):
            x_BD, keep_B = next(feed)
            if resident_ND is not None:
                x_BD = resident_ND.index_select(0, x_BD.to(device, non_blocking=True))
            else:
                x_BD = x_BD.to(device, non_blocking=True)
            x_BD, grad_scale = _filter_outliers(x_BD, keep_B, per_rank, world, model)
            try:
                out, loss, grad_norm = train_step(
                    model, optimizer, scheduler, x_BD, step, tracker.dead_masks(),
                    autocast=autocast, grad_clip=cfg.grad_clip, grad_scale=grad_scale,
                )
            except TrainingDiverged as err:
                writer.wait()
                kept = "no checkpoint had been written yet"
                if last_saved is not None:
                    kept = f"the last good checkpoint (step {last_saved}) is kept in {run_dir}"
                hint = "(try a lower lr or grad_clip)"
                raise TrainingDiverged(f"{err}; training stopped, {kept} {hint}") from None
            tracker.update(out.codes)
            done = step + 1
            if model.reassign_due(done):
                _reassign(model, optimizer, source, cfg, done, device, world)
            if done % cfg.log_every == 0 or done == total:
                logs = _step_logs(out, loss, grad_norm, tracker, scheduler, done, cfg.batch_size, grad_scale)
                now = time.perf_counter()  # after the logs' one sync: the time the steps really took
                logs["tokens_per_s"] = (done - clock_step) * cfg.batch_size / max(now - clock, 1e-9)
                if flops_per_token_per_peak:
                    logs["mfu"] = flops_per_token_per_peak * logs["tokens_per_s"]
                clock, clock_step = now, done
                history.append(logs)
                if world.is_main:
                    writer.submit(_append_lines, run_dir / LOG_FILE, [json.dumps(logs)])
                bar.set_postfix_str(_progress_line(logs, len(model.level_widths)))
            bar.update(1)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total:
                if world.is_main:
                    save(done)
                last_saved = done
    finally:
        feed.close()
        bar.close()
        writer.close()
    model.data_parallel_rows = None
    resumed_from = start if train_state is not None else None
    return TrainResult(run_dir, total, total * cfg.batch_size, logs, history, resumed_from=resumed_from)


def _filter_outliers(
    x_BD: torch.Tensor, keep_B: torch.Tensor | None, per_rank: int, world: distributed.World, model: HSAE
) -> tuple[torch.Tensor, float]:
    """Leaves out this rank's massive-activation rows (as one process leaves them out of the whole batch: a
    batch of only outliers is kept whole) and returns (rows, this rank's share of the batch's rows, the
    weight of its loss). The mask is on the CPU: no device sync; under data parallelism the ranks' counts are
    gathered (one small collective) and the model learns where its rows lie in the global batch."""
    counts = [per_rank] * world.size
    if keep_B is not None:
        kept = int(keep_B.sum())
        counts = distributed.all_gather_counts(torch.tensor(kept)) if world.parallel else [kept]
        total = sum(counts)
        if 0 < total < per_rank * world.size and min(counts) > 0:
            x_BD = x_BD.index_select(0, torch.nonzero(keep_B).squeeze(1).to(x_BD.device, non_blocking=True))
        else:  # kept whole (under data parallelism also when one rank's slice is all outliers)
            counts = [per_rank] * world.size
    if not world.parallel:
        return x_BD, 1.0
    model.data_parallel_rows = (sum(counts[: world.rank]), sum(counts))
    return x_BD, counts[world.rank] / sum(counts)


def _reassign(
    model: HSAE, optimizer: torch.optim.Optimizer, source: ActivationSource, cfg: TrainConfig, step: int,
    device: torch.device, world: distributed.World,
) -> None:
    """The model's re-assignment at `step`, computed on rank 0 and broadcast (parameters, buffers, RNG, and
    which parameters lost their optimizer state) so that every rank holds the same model."""
    model.data_parallel_rows = None
    names = {id(p): name for name, p in model.named_parameters()}
    reset: list[str] = []
    if world.is_main:
        sample = _reassign_sample(model, source, cfg, step, device)
        reset = [names[id(p)] for p in model.reassign(sample, step)]
    reset = distributed.broadcast_object(reset)
    if world.parallel:
        distributed.broadcast_module(model)
        distributed.broadcast_rng()
    params = dict(model.named_parameters())
    for name in reset:
        optimizer.state.pop(params[name], None)  # stale moments would push fresh weights off at once


def _restore(model: HSAE, run_dir: Path, cfg: TrainConfig) -> dict[str, Any]:
    saved = checkpoint.open(run_dir)
    same_arch = saved.arch == model.arch and dict(saved.arch_config) == model.cfg.to_dict()
    if not same_arch or saved.d_in != model.d_in:
        raise ConfigError(f"cannot resume {run_dir}: it was trained with a different architecture config")
    for name in ("batch_size", "seed"):
        if getattr(saved, name) != getattr(cfg, name):
            raise ConfigError(
                f"cannot resume {run_dir}: it was trained with {name}={getattr(saved, name)}, "
                f"not {getattr(cfg, name)}"
            )
    model.load_state_dict(saved.model.state_dict())
    return checkpoint.load_train_state(run_dir)


def _step_logs(
    out, loss, grad_norm, tracker, scheduler, step: int, batch_size: int, weight: float = 1.0
) -> dict[str, float]:
    """The logged values, read in one host sync; under data parallelism each is the ranks' average weighted
    by their share of the batch (the same value on every rank)."""
    values = {"loss": loss.detach(), "grad_norm": grad_norm.detach()}
    values["explained_variance"] = explained_variance(out.x_BD, out.x_hat_BD)
    for level, (code, dead) in enumerate(zip(out.codes, tracker.dead_masks())):
        values[f"l0_{level}"] = code.l0()
        values[f"dead_{level}"] = dead.float().mean()
    values.update(out.logs)
    stacked = torch.stack([v.float().reshape(()) for v in values.values()])
    if distributed.current().parallel:
        stacked = distributed.all_reduce_sum_(stacked * weight)
    logs: dict[str, float] = {"step": step, "tokens": step * batch_size}
    logs.update(zip(values, stacked.tolist()))
    logs["lr"] = scheduler.get_last_lr()[0]
    return logs


# dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) of the cards MFU is printed for, by name
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The card's peak for half-precision training, None on a CPU, in float32 or on a card not listed."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for card, peak in PEAK_FLOPS.items() if card in name), None)


def _progress_line(logs: dict[str, float], n_levels: int) -> str:
    l0 = "/".join(f"{logs[f'l0_{level}']:.1f}" for level in range(n_levels))
    mfu = f" mfu {logs['mfu']:.1%}" if "mfu" in logs else ""
    return (
        f"{logs['tokens_per_s']:,.0f} tok/s{mfu} loss {logs['loss']:.4g} "
        f"ev {logs['explained_variance']:.3f} L0 {l0}"
    )


def _truncate_log(path: Path, step: int) -> None:
    """Drops log lines past the checkpoint a run resumes from (the killed run wrote them)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))

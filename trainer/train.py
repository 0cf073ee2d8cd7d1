"""The training loop: any model from the registry, any ActivationSource.

Adam, linear warm-up then cosine decay, global-norm clipping, dead-latent tracking over a window of tokens,
a progress bar with tokens/s, loss, explained variance and L0, and atomic checkpoints that carry the full
training state, so that `resume=True` continues a killed run exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from trainer import checkpoint
from trainer.config import ConfigError, TrainConfig
from trainer.data import ActivationSource
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
        for since, code in zip(self.since_fired, codes):
            since += code.indices.shape[0]
            since[code.indices[code.indices >= 0]] = 0

    def dead_masks(self) -> list[torch.Tensor]:
        return [since >= self.window for since in self.since_fired]

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window, "since_fired": [s.cpu() for s in self.since_fired]}

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
) -> tuple[StepOutput, torch.Tensor, torch.Tensor]:
    """One optimizer step; raises TrainingDiverged before touching the weights if the loss or the gradient is
    not finite. Returns (model output, loss, gradient norm before clipping)."""
    with autocast:
        out = model.loss(x_BD, step, dead)
    loss = out.loss.float()
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"loss became {loss.item()} at step {step}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    model.before_optimizer_step()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if not torch.isfinite(grad_norm):
        raise TrainingDiverged(f"gradient norm became {grad_norm.item()} at step {step}")
    optimizer.step()
    scheduler.step()
    model.after_optimizer_step(step + 1)
    return out, loss, grad_norm


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
    """
    run_dir = Path(run_dir)
    if source.d_in != model.d_in:
        raise ConfigError(
            f"the activations have width {source.d_in} but the model was built for d_in={model.d_in}"
        )
    if cfg.batch_size > source.num_rows:  # checked before anything is written to run_dir
        raise ConfigError(
            f"batch size {cfg.batch_size} exceeds the {source.num_rows} rows of activations: "
            "lower --batch or give more data"
        )
    device = cfg.resolved_device()
    total = cfg.steps or max(1, source.num_rows // cfg.batch_size)
    train_state = None
    checkpoint.recover(run_dir)  # this process writes run_dir: a save killed mid-swap is put right first
    if checkpoint.is_checkpoint(run_dir):
        if not resume:
            raise ConfigError(f"{run_dir} already holds a checkpoint; resume it or choose another directory")
        train_state = _restore(model, run_dir, cfg)
    # a function of (source, seed) only, so a resumed run skips exactly the rows the first one did
    sample = _draw_sample(source, cfg.batch_size, cfg.seed)
    max_norm = norm_threshold(sample, cfg.max_norm_multiple)
    if train_state is None:
        torch.manual_seed(cfg.seed)
        model.prepare(sample[inliers(sample, max_norm)])
    del sample
    model.to(device).train()
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
        _truncate_log(run_dir / LOG_FILE, start)
    run_dir.mkdir(parents=True, exist_ok=True)

    def save(step: int) -> None:
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "dead": tracker.state_dict(),
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
        }
        checkpoint.save_checkpoint(
            run_dir, model, model_info=model_info, training=training, data_info=data_info, train_state=state
        )

    autocast = make_autocast(device, cfg.resolved_dtype())
    batches = source.batches(cfg.batch_size, seed=cfg.seed, start_step=start)
    history: list[dict[str, float]] = []
    logs: dict[str, float] = {}
    last_saved = start if train_state is not None else None
    bar = tqdm(total=total, initial=start, disable=not cfg.progress, unit="step", dynamic_ncols=True)
    clock, clock_step = time.perf_counter(), start
    try:
        for step in range(start, total):
            x_BD = next(batches).to(device, non_blocking=True)
            if math.isfinite(max_norm):
                keep_B = inliers(x_BD, max_norm)
                if 0 < int(keep_B.sum()) < len(keep_B):  # one sync; a batch of only outliers is kept whole
                    x_BD = x_BD[keep_B]
            try:
                out, loss, grad_norm = train_step(
                    model, optimizer, scheduler, x_BD, step, tracker.dead_masks(),
                    autocast=autocast, grad_clip=cfg.grad_clip,
                )
            except TrainingDiverged as err:
                kept = "no checkpoint had been written yet"
                if last_saved is not None:
                    kept = f"the last good checkpoint (step {last_saved}) is kept in {run_dir}"
                hint = "(try a lower lr or grad_clip)"
                raise TrainingDiverged(f"{err}; training stopped, {kept} {hint}") from None
            tracker.update(out.codes)
            done = step + 1
            if model.reassign_due(done):
                for param in model.reassign(_reassign_sample(model, source, cfg, done, device), done):
                    optimizer.state.pop(param, None)  # stale moments would push fresh weights off at once
            if done % cfg.log_every == 0 or done == total:
                now = time.perf_counter()
                logs = _step_logs(out, loss, grad_norm, tracker, scheduler, done, cfg.batch_size)
                logs["tokens_per_s"] = (done - clock_step) * cfg.batch_size / max(now - clock, 1e-9)
                clock, clock_step = now, done
                history.append(logs)
                with open(run_dir / LOG_FILE, "a") as f:
                    f.write(json.dumps(logs) + "\n")
                bar.set_postfix_str(_progress_line(logs, len(model.level_widths)))
            bar.update(1)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total:
                save(done)
                last_saved = done
    finally:
        bar.close()
    resumed_from = start if train_state is not None else None
    return TrainResult(run_dir, total, total * cfg.batch_size, logs, history, resumed_from=resumed_from)


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


def _step_logs(out, loss, grad_norm, tracker, scheduler, step: int, batch_size: int) -> dict[str, float]:
    logs = {"step": step, "tokens": step * batch_size, "loss": loss.item(), "grad_norm": grad_norm.item()}
    logs["lr"] = scheduler.get_last_lr()[0]
    logs["explained_variance"] = explained_variance(out.x_BD, out.x_hat_BD).item()
    for level, (code, dead) in enumerate(zip(out.codes, tracker.dead_masks())):
        logs[f"l0_{level}"] = code.l0().item()
        logs[f"dead_{level}"] = dead.float().mean().item()
    logs.update({name: value.item() for name, value in out.logs.items()})
    return logs


def _progress_line(logs: dict[str, float], n_levels: int) -> str:
    l0 = "/".join(f"{logs[f'l0_{level}']:.1f}" for level in range(n_levels))
    return (
        f"{logs['tokens_per_s']:,.0f} tok/s loss {logs['loss']:.4g} "
        f"ev {logs['explained_variance']:.3f} L0 {l0}"
    )


def _truncate_log(path: Path, step: int) -> None:
    """Drops log lines past the checkpoint a run resumes from (the killed run wrote them)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))

"""Is the training loop the bottleneck? The `hsae train` loop's tokens/s as a share of the step-only tokens/s,
in one process, on the device named in the output.

step only: the project's `train_step` (forward, backward, decoder hooks, clip, Adam) and the dead-latent
update on batches already on the device, nothing else. loop: `trainer.train.train`, what `hsae train` runs,
on the same model config over a memory-mapped .npy file (the real data path: memmap rows, inlier filter,
transfer, logging and checkpoints every
`--checkpoint-every` steps; the models' scheduled data re-initialisations only with `--reinits`: at a
few dozen steps they, not the loop, would decide the rate, while a real run does them 2-3 times in
thousands of steps), timed over its logged intervals after the first (set-up and warm-up left out;
the checkpoints inside are in). The step-only rate is measured before and after the loop and averaged,
so that load from other processes on a shared machine hits both alike.

    .venv/bin/python bench/bench_loop.py [--arch moe] [--steps 60] [--batch 1024] [--device auto]
                                         [--threads 1]

Run it with PYTHONPATH pointing at another checkout to measure that checkout's loop with the same script.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_train import D_MODEL, synthetic_rows
from trainer.activations import load_activation_file
from trainer.config import ArchConfig, TrainConfig
from trainer.models import build_model
from trainer.train import DeadLatentTracker, make_autocast, make_optimizer, train, train_step

ARCHES = {
    "moe": dict(arch="moe", width=1024, k=32, children=16, subspace=4),
    "topk": dict(arch="topk", width=16384, k=32),
    "tree": dict(arch="tree", levels=[1024, 4096, 16384], level_k=[16, 16, 32]),
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch thread(s)"


def step_only(
    arch_cfg: ArchConfig, cfg: TrainConfig, rows: np.ndarray, device: torch.device, steps: int
) -> float:
    """Median seconds per step of `train_step` on batches already on the device."""
    torch.manual_seed(0)
    model = build_model(arch_cfg, rows.shape[1], seed=0)
    model.prepare(torch.from_numpy(np.asarray(rows[:8192])))
    model.to(device).train()
    model.start_training(steps)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    tracker = DeadLatentTracker(model.level_widths, cfg.dead_window_tokens, device)
    autocast = make_autocast(device, cfg.resolved_dtype())
    n = len(rows) // cfg.batch_size
    batches = [torch.from_numpy(np.asarray(rows[i * cfg.batch_size : (i + 1) * cfg.batch_size])).to(device)
               for i in range(min(n, 8))]
    times = []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out, _, _ = train_step(model, optimizer, scheduler, batches[step % len(batches)], step,
                               tracker.dead_masks(), autocast=autocast, grad_clip=cfg.grad_clip)
        tracker.update(out.codes)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHES), default="moe")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (see bench_train.py)")
    parser.add_argument("--reinits", action="store_true",
                        help="keep the MoE expert inits / tree child inits and re-assignments in the loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    fields = dict(ARCHES[args.arch])
    if not args.reinits:
        fields.update({"moe": {"expert_init_at": []}, "topk": {},
                       "tree": {"child_init_at": [], "reassign_every": 10**9}}[args.arch])
    arch_cfg = ArchConfig(**fields)
    cfg = TrainConfig(batch_size=args.batch, lr=1e-3, steps=args.steps, warmup_steps=max(1, args.steps // 10),
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every, progress=False,
                      device=args.device)
    device = cfg.resolved_device()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "acts.npy"
        np.save(path, synthetic_rows(args.steps * args.batch, D_MODEL))
        source = load_activation_file(path)  # memory-mapped, as `hsae train --activations` reads it
        before = step_only(arch_cfg, cfg, source.rows_ND, device, min(args.steps, 30))
        torch.manual_seed(0)
        model = build_model(arch_cfg, source.d_in, seed=0)
        wall = time.perf_counter()
        result = train(model, source, cfg, Path(tmp) / "run", model_info={"name": None, "layer": None,
                                                                          "hook": None})
        wall = time.perf_counter() - wall
        after = step_only(arch_cfg, cfg, source.rows_ND, device, min(args.steps, 30))
    intervals = result.history[1:]
    seconds = sum(args.log_every * args.batch / logs["tokens_per_s"] for logs in intervals)
    loop_rate = len(intervals) * args.log_every * args.batch / seconds
    step_rate = args.batch / ((before + after) / 2)
    print(f"device: {device_name(device)}; {fields}, d={D_MODEL}, "
          f"batch {args.batch}, {args.steps} steps, checkpoint every {args.checkpoint_every}, "
          f"dtype {cfg.resolved_dtype()}")
    print(f"step only: {args.batch / before:,.0f} tokens/s before the loop, {args.batch / after:,.0f} after")
    print(f"hsae train loop: {loop_rate:,.0f} tokens/s over steps {args.log_every}-{args.steps} "
          f"({args.steps * args.batch / wall:,.0f} tokens/s with set-up and the last checkpoint)")
    print(f"loop / step only: {loop_rate / step_rate:.2f} (goal on a GPU: >= 0.90)")


if __name__ == "__main__":
    main()

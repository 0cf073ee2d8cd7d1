"""Training speed of the MoE H-SAE against a flat TopK SAE with the same number of latents, in one process.

Sizes (`--size`): `demo` (default) moe 1024 parents × 16 children (subspace 8, the
default for 16 children) against topk 16,384, d=576;
`16k_16` moe 16,384 × 16 (s=4, the paper's) and `4k_64` moe 4096 × 64 (s=8), both against topk 262,144
at d=2304 (synthetic rows, or activations of that width). k=32 everywhere. Both train in lockstep on the
same batches with the project's own `train_step` (forward, backward, decoder hooks, clip, Adam), one step of
each in turn so that load from other processes on this shared machine hits both alike. Prints the device,
the median seconds per step of each, their ratio, MFU on a GPU (trainer/train.py's peak table), and the
explained variance of each on held-out rows after the same number of training tokens.

    .venv/bin/python bench/bench_train.py [--activations FILE.npy] [--steps 80] [--batch 1024] [--threads 1]
        [--size demo|16k_16|4k_64] [--device cpu|cuda] [--dtype auto|float32|bfloat16]
        [--expert-matmul auto|buckets|grouped_mm] [--subspace S]

The MoE's expert pass is one grouped GEMM without host syncs wherever torch runs one (`--expert-matmul
auto`); `buckets` measures the fallback for comparison.

One torch thread by default: on this shared 2-core machine a second OpenMP thread makes every op wait for a
core that another process holds, which hurts the MoE's many small ops far more than the flat SAE's few large
matrix products (measured under load: moe 0.25 s/step at one thread, 3.8 s/step at two); pass --threads to
measure otherwise.

Without --activations the rows are synthetic (sparse sums of random directions plus noise): the speeds are
valid, the explained variances only say that both models learn.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from trainer.config import ArchConfig, TrainConfig
from trainer.evaluate import evaluate
from trainer.models import build_model
from trainer.outliers import inliers, norm_threshold
from trainer.train import DeadLatentTracker, make_autocast, make_optimizer, peak_flops, train_step

# --size: (d, moe parents, children, subspace, topk latents)
SIZES = {"demo": (576, 1024, 16, 8, 16384), "16k_16": (2304, 16384, 16, 4, 262144),
         "4k_64": (2304, 4096, 64, 8, 262144)}


def synthetic_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((8192, d)).astype(np.float32)
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    rows = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 4096):
        m = min(4096, n - lo)
        idx = rng.integers(0, len(atoms), (m, 24))
        mags = rng.exponential(1.0, (m, 24, 1)).astype(np.float32)
        rows[lo : lo + m] = (atoms[idx] * mags).sum(1) + 0.1 * rng.standard_normal((m, d)).astype(np.float32)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--activations", help="a float [N, d] .npy file (real activations)")
    parser.add_argument("--steps", type=int, default=80, help="training steps of each model")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--eval-rows", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 autocast on a GPU, float32 on the CPU")
    parser.add_argument("--expert-matmul", choices=["auto", "buckets", "grouped_mm"], default="auto")
    parser.add_argument("--subspace", type=int, help="the MoE's expert subspace (default: the size's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    d_model, parents, children, subspace, flat = SIZES[args.size]
    subspace = args.subspace or subspace

    if args.activations:
        rows = np.load(args.activations, mmap_mode="r")
        data = f"real activations from {args.activations}"
    else:
        rows = synthetic_rows(args.steps * args.batch + args.eval_rows, d_model)
        data = "SYNTHETIC rows (speed is meaningful; explained variance only shows that both learn)"
    n_train = min(len(rows) - args.eval_rows, args.steps * args.batch)
    if n_train < args.batch:
        raise SystemExit(f"need at least {args.batch + args.eval_rows} rows, got {len(rows)}")
    train_rows = torch.from_numpy(np.array(rows[:n_train], dtype=np.float32))
    eval_rows = torch.from_numpy(np.array(rows[-args.eval_rows :], dtype=np.float32))
    d_in = train_rows.shape[1]

    cfg = TrainConfig(batch_size=args.batch, lr=1e-3, steps=args.steps, warmup_steps=max(1, args.steps // 10),
                      progress=False, device=args.device, dtype=args.dtype)
    device, dtype = cfg.resolved_device(), cfg.resolved_dtype()
    # massive activations are left out as `hsae train` and `hsae eval` leave them out
    max_norm = norm_threshold(train_rows[:8192], cfg.max_norm_multiple)
    train_rows, eval_rows = train_rows[inliers(train_rows, max_norm)], eval_rows[inliers(eval_rows, max_norm)]
    n_train = len(train_rows)
    arches = {
        "moe": ArchConfig(arch="moe", width=parents, k=32, children=children, subspace=subspace,
                          coef_warmup_steps=args.steps // 2),
        "topk": ArchConfig(arch="topk", width=flat, k=32),
    }
    models, optims, trackers, times = {}, {}, {}, {}
    for name, arch_cfg in arches.items():
        torch.manual_seed(0)
        model = build_model(arch_cfg, d_in, seed=0).to(device)
        model.prepare(train_rows[:8192].to(device))
        if name == "moe":
            model.expert_matmul = args.expert_matmul
        models[name] = model.train()
        optims[name] = make_optimizer(model, cfg, args.steps)
        trackers[name] = DeadLatentTracker(model.level_widths, cfg.dead_window_tokens, device)
        times[name] = []
    autocast = make_autocast(device, dtype)
    threads = torch.get_num_threads()
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {threads} torch threads"
    print(f"device: {card}; {str(dtype).removeprefix('torch.')}; moe expert pass: {args.expert_matmul}")
    print(f"data: {data}; d={d_in}, batch {args.batch}, {args.steps} steps each")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    batches_per_pass = n_train // args.batch
    for step in range(args.steps):
        lo = (step % batches_per_pass) * args.batch
        x_BD = train_rows[lo : lo + args.batch].to(device)
        for name, model in models.items():
            optimizer, scheduler = optims[name]
            sync()
            start = time.perf_counter()
            out, _, _ = train_step(model, optimizer, scheduler, x_BD, step, trackers[name].dead_masks(),
                                   autocast=autocast, grad_clip=cfg.grad_clip)
            sync()
            times[name].append(time.perf_counter() - start)
            trackers[name].update(out.codes)
    warm = min(2, args.steps - 1)  # the first steps pay one-time costs (lazy imports, allocator)
    per_step = {name: statistics.median(t[warm:]) for name, t in times.items()}
    peak = peak_flops(device, dtype)
    print(f"{'model':<6}{'latents':>9}{'s/step':>9}{'steps/s':>9}{'tokens/s':>10}{'MFU':>7}"
          f"{'EV (held out)':>15}")
    for name, model in models.items():
        ev = evaluate(model, eval_rows.split(1024), device=device)["explained_variance"]
        latents = sum(model.level_widths) if name == "topk" else model.level_widths[1]
        mfu = f"{model.train_flops(args.batch) / per_step[name] / peak:.1%}" if peak else "-"
        print(f"{name:<6}{latents:>9,}{per_step[name]:>9.4f}{1 / per_step[name]:>9.2f}"
              f"{args.batch / per_step[name]:>10,.0f}{mfu:>7}{ev:>15.4f}")
    goal = ">= 4x at d=2304" if d_model > 1000 else ">= 1x"
    speedup = per_step["topk"] / per_step["moe"]
    print(f"moe is {speedup:.2f}x faster per step than topk on {card} (goal: {goal})")


if __name__ == "__main__":
    main()

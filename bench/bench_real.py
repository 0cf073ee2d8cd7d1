"""The MoE H-SAE against a flat TopK SAE of the same number of latents on real activations (issue 11, item 4).

Both train as `hsae train` does (project preset, only sizes given) on the same tokens of the demo corpus
(SmolLM2-135M, the demo's layer), for the same steps, batch and seed; both are judged by `hsae eval` on the
same held-out tokens. Prints explained variance, CE loss score, L0 and dead fractions side by side, and the
training-batch explained variance against tokens seen for each (from train_log.jsonl), so that where the
curves cross shows when the flat SAE does better.

    .venv/bin/python bench/bench_real.py [--tokens 150000] [--steps 1000] [--width 1024] [--children 16]
        [--subspace S] [--k 32] [--batch 1024] [--eval-tokens 10000] [--moe-arch '{"merge_cos": 1.0}'] ...

Each `--moe-arch JSON` adds a MoE variant with those ArchConfig fields overridden (an ablation row). Runs
live in the data folder under runs/bench-real-*; a run whose cfg.json matches is reused, not retrained. One
torch thread: on this shared 2-core machine a second one waits for a core another process holds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from trainer import checkpoint
from trainer.config import RunConfig
from trainer.settings import get_settings
from trainer.sources import DataSpec
from trainer.workflows import _eval_data, run_eval, run_training


def _train(name: str, arch: dict, args: argparse.Namespace) -> Path:
    run_cfg = RunConfig.compose(
        arch, {"batch_size": args.batch, "steps": args.steps, "seed": args.seed, "checkpoint_every": 0}
    )
    run_dir = _run_dir(name)
    if checkpoint.is_checkpoint(run_dir):
        saved, wanted = checkpoint.read_info(run_dir), run_cfg.arch.to_dict()
        common = saved.arch_config.keys() & wanted.keys()  # fields added since keep their old behaviour
        same = all(saved.arch_config[key] == wanted[key] for key in common)
        if same and saved.finished and saved.step == args.steps:
            print(f"   reusing {run_dir}", flush=True)
            return run_dir
        shutil.rmtree(run_dir)  # a run of other settings: this row trains anew
    t = time.perf_counter()
    run_training(DataSpec(corpus="demo", tokens=args.tokens), run_cfg, run_dir, resume=False)
    print(f"   trained {name} in {time.perf_counter() - t:.0f} s", flush=True)
    return run_dir


def _densest_root(run_dir: Path, tokens: int) -> float:
    """The largest share of the held-out tokens on which one top-level latent fires."""
    ckpt = checkpoint.open(run_dir, device=torch.device("cpu"))
    opened, skip = _eval_data(ckpt, None, None, tokens, "cpu")
    n = min(tokens, opened.source.num_rows - skip)
    x = torch.from_numpy(opened.source.read(skip, skip + n)).float()
    x = x[x.norm(dim=-1) <= ckpt.max_norm]  # massive activations are left out, as eval does
    with torch.no_grad():
        top = ckpt.model.encode(x)[0].indices
    counts = torch.bincount(top[top >= 0], minlength=ckpt.model.level_widths[0])
    return float(counts.max()) / len(x)


def _run_dir(name: str) -> Path:
    return get_settings().subdir("runs") / f"bench-real-{name}"


def _curve(run_dir: Path, batch: int) -> dict[int, float]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return {json.loads(s)["step"] * batch: json.loads(s)["explained_variance"] for s in lines if s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=150_000)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--children", type=int, default=16)
    parser.add_argument("--subspace", type=int, default=None, help="default: the preset's")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=10_000)
    parser.add_argument("--moe-arch", action="append", default=[], help="JSON of ArchConfig overrides")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", action="append", default=[],
                        help="train only these rows (topk, moe, moe-1, ...); the others are shown if trained")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    moe = {"arch": "moe", "width": args.width, "k": args.k, "children": args.children}
    if args.subspace is not None:
        moe["subspace"] = args.subspace
    rows = [("topk", {"arch": "topk", "width": args.width * args.children, "k": args.k}), ("moe", moe)]
    for i, extra in enumerate(args.moe_arch):
        rows.append((f"moe-{i + 1}", {**moe, **json.loads(extra)}))
    print(f"device: cpu ({torch.get_num_threads()} thread), {args.tokens:,} tokens of the demo corpus, "
          f"{args.steps} steps of {args.batch}, {args.width * args.children:,} latents each", flush=True)
    results = {}
    for name, arch in rows:
        if args.only and name not in args.only and not checkpoint.is_checkpoint(_run_dir(name)):
            continue
        print(f"== {name}: {json.dumps(arch)}", flush=True)
        run_dir = _train(name, arch, args)
        metrics, _ = run_eval(run_dir, None, None, args.eval_tokens, "cpu", None)
        metrics["densest_root"] = _densest_root(run_dir, args.eval_tokens)
        results[name] = (metrics, _curve(run_dir, args.batch))

    spans = {tuple(m["data"]["eval_rows"]) + (m["data"]["held_out"],) for m, _ in results.values()}
    for lo, hi, held_out in sorted(spans):  # one span when every row trained on the same tokens
        where = "held out: after the training tokens" if held_out else "NOT held out: the training tokens"
        print(f"\nevaluated on rows {lo:,}-{hi:,} of the demo corpus ({where})")
    print(f"{args.eval_tokens:,} tokens (`hsae eval`):")
    print(f"{'model':<8} {'EV':>6} {'CE score':>9} {'L0 (per level)':>16} {'dead (per level)':>18} "
          f"{'densest root':>13}  EV vs topk")
    base_ev = results["topk"][0]["explained_variance"] if "topk" in results else float("nan")
    for name, (m, _) in results.items():
        l0 = " / ".join(f"{lv['l0']:.1f}" for lv in m["levels"])
        dead = " / ".join(f"{lv['dead_fraction']:.1%}" for lv in m["levels"])
        ce = m.get("ce", {}).get("ce_loss_score", float("nan"))
        print(f"{name:<8} {m['explained_variance']:6.3f} {ce:9.3f} {l0:>16} {dead:>18} "
              f"{m['densest_root']:13.1%}  {m['explained_variance'] / base_ev:.3f}x")
    print("\ntraining-batch explained variance against tokens seen:")
    names = list(results)
    print(f"{'tokens':>10} " + " ".join(f"{n:>8}" for n in names))
    for tokens in sorted(next(iter(results.values()))[1]):
        print(f"{tokens:>10,} " + " ".join(f"{results[n][1].get(tokens, float('nan')):8.3f}" for n in names))


if __name__ == "__main__":
    main()

"""Which training ingredients recover a true hierarchy, over the family of synthetic generators.

For each member of `trainer.synthetic.FAMILY` and each seed, trains the MoE H-SAE with the project preset, the
paper preset, and the project preset with one ingredient switched back to the paper's, then prints the
fraction of true parents and children found (a learned latent whose firing rows have IoU ≥ 0.5 with the
true feature's) and the edge precision. The tree is shown with both presets. Sizes are those a user would
give (`HierarchySpec.model_sizes`); everything else is the preset's default.

    .venv/bin/python bench/bench_family.py [--seeds 3] [--steps 3000] [--rows 60000] [--only NAME,...]

About 30-60 s per model on one CPU thread; the full table (5 generators x 3 seeds x 6 models) takes ~1 h
on the 2-core development machine, so --only and --seeds pick a part.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import RunConfig  # noqa: E402
from trainer.data import TensorSource  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.synthetic import FAMILY, Hierarchy, Recovery, make, recovery  # noqa: E402
from trainer.train import train  # noqa: E402

# name -> (arch, preset, fields switched back to the paper's)
VARIANTS: dict[str, tuple[str, str, dict, dict]] = {
    "moe project": ("moe", "project", {}, {}),
    "moe paper": ("moe", "paper", {}, {}),
    "  - data init of experts": ("moe", "project", {"expert_init_at": []}, {}),
    "  - lr 2e-3 (paper 5e-4)": ("moe", "project", {}, {"lr": 5e-4}),
    "  - centring": ("moe", "project", {"center": False}, {}),
    "  - L1 on kept children": ("moe", "project", {"child_l1": "all"}, {}),
    "tree project": ("tree", "project", {}, {}),
    "tree paper": ("tree", "paper", {}, {}),
}


def fit(truth: Hierarchy, arch: str, preset: str, arch_over: dict, train_over: dict, seed: int,
        steps: int, batch: int) -> Recovery:
    sizes = truth.spec.model_sizes()[arch]
    run_cfg = RunConfig.compose(
        {**sizes, **arch_over},
        {"batch_size": batch, "steps": steps, "seed": seed, "checkpoint_every": 0, "log_every": steps,
         "progress": False, "device": "cpu", **train_over},
        preset,
    )
    model = build_model(run_cfg.arch, truth.spec.d, seed=seed)
    with tempfile.TemporaryDirectory() as run_dir:
        train(model, TensorSource(truth.x_ND), run_cfg.train, run_dir, model_info={"name": "synthetic"})
    model.eval()
    with torch.no_grad():
        codes = model.encode(torch.from_numpy(truth.x_ND))
    return recovery(codes[0].indices, codes[1].indices, tuple(model.level_widths[:2]), model.edges(), truth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--only", default="", help="comma-separated generator names")
    parser.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    gens = [s for s in FAMILY if not args.only or s.name in args.only.split(",")]
    variants = {k: v for k, v in VARIANTS.items() if not args.variants or k.strip() in args.variants.split(",")}
    print(f"device: cpu ({torch.get_num_threads()} thread), {args.steps} steps of {args.batch}, "
          f"{args.rows} rows, seeds 0..{args.seeds - 1}")
    print("cells: parents found / children found / edge precision, mean over seeds (min children)")
    header = f"{'variant':28s}" + "".join(f"{g.name:>24s}" for g in gens)
    print(header)
    truths = {(g.name, s): make(g, args.rows, seed=s) for g in gens for s in range(args.seeds)}
    for name, (arch, preset, arch_over, train_over) in variants.items():
        cells, start = [], time.perf_counter()
        for g in gens:
            runs = [
                fit(truths[g.name, s], arch, preset, arch_over, train_over, s, args.steps, args.batch)
                for s in range(args.seeds)
            ]
            mean = [sum(getattr(r, f) for r in runs) / len(runs)
                    for f in ("parents_found", "children_found", "edge_precision")]
            low = min(r.children_found for r in runs)
            cells.append(f"{mean[0]:.2f}/{mean[1]:.2f}/{mean[2]:.2f} ({low:.2f})")
        print(f"{name:28s}" + "".join(f"{c:>24s}" for c in cells) + f"   [{time.perf_counter() - start:.0f}s]",
              flush=True)


if __name__ == "__main__":
    main()

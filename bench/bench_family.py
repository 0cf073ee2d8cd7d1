"""Which training ingredients recover a true hierarchy, over the family of synthetic generators.

For each member of `trainer.synthetic.FAMILY` and each seed, trains the MoE H-SAE with the project preset, the
paper preset, the project preset with one ingredient switched back to the paper's, and with the options the
project leaves off (they cost explained variance on real activations), then prints the
fraction of true parents and children found (a learned latent whose firing rows have IoU ≥ 0.5 with the
true feature's) and the edge precision. The same for the Tree HSAE, whose project preset differs from the
paper's by the data initialisation of children, the co-activation re-assignment, the merge of split top
latents (also after the last child round), a floor under its TopK codes and every parent's children redone
at the later child round. The
models' CPU kernels are pinned (`trainer.synthetic.PINNED_KERNELS`). Sizes are those a user
would give (`HierarchySpec.model_sizes`); everything else is the preset's default.

    .venv/bin/python bench/bench_family.py [--seeds 3] [--steps 1500] [--rows 60000] [--only NAME,...]

About 10-30 s per model on one CPU thread at the default steps (those of the family quality test), one
process per core; the full table (6 generators x 3 seeds x 24 models) takes ~60 min on the 2-core
development machine, so --only, --variants and --seeds pick a part.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.synthetic import FAMILY, FAMILY_STEPS, Job, judge_in_parallel  # noqa: E402

# the MoE options that found more children on the family but cost explained variance on SmolLM2 (README)
CLUSTERED = {
    "expert_init_at": [0.1, 0.3, 0.5, 0.8], "expert_reinit": "all", "expert_blind_to_parent": True,
    "child_separation": 2.0,
}
# name -> (arch, preset, fields switched back to the paper's, or options added)
VARIANTS: dict[str, tuple[str, str, dict, dict]] = {
    "moe project": ("moe", "project", {}, {}),
    "moe paper": ("moe", "paper", {}, {}),
    "  - subspace 4 (the paper's)": ("moe", "project", {"subspace": 4}, {}),
    "  - data init of experts": ("moe", "project", {"expert_init_at": []}, {}),
    "  - lr 2e-3 (paper 5e-4)": ("moe", "project", {}, {"lr": 5e-4}),
    "  - centring": ("moe", "project", {"center": False}, {}),
    "  - shared offset (the mean)": ("moe", "project", {"center_quantile": None, "fold_density": 1.0}, {}),
    "  - L1 on kept children": ("moe", "project", {"child_l1": "all"}, {}),
    "  - merge of split parents": ("moe", "project", {"merge_cos": 1.0}, {}),
    "  - refit of parents": ("moe", "project", {"refit_parents": False}, {}),
    "  - revival of starved children": ("moe", "project", {"revive_children_at": []}, {}),
    "  - every expert redone (starved only)": ("moe", "project", {"expert_reinit": "starved"}, {}),
    "  - split children merged": ("moe", "project", {"child_separation": 0.0}, {}),
    "  - polish round": ("moe", "project", {"polish_at": []}, {}),
    "  - dead parents re-seeded": ("moe", "project", {"reseed_dead_parents": False}, {}),
    "  - mixed parents split": ("moe", "project", {"split_mixed_parents": False}, {}),
    "  - fragments below chance merged": ("moe", "project", {"merge_lift": 0.0}, {}),
    "  - polish-round merges of top fragments": ("moe", "project", {"late_merge_cos": 1.0}, {}),
    "  + late round, all experts, blind P↓, split children merged": ("moe", "project", CLUSTERED, {}),
    "  + the same and promoted children freed": ("moe", "project", {**CLUSTERED, "promoted_share": 0.5}, {}),
    "tree project": ("tree", "project", {}, {}),
    "tree paper": ("tree", "paper", {}, {}),
    "  - data init of children": ("tree", "project", {"child_init_at": []}, {}),
    "  - merge of split top latents": ("tree", "project", {"merge_cos": 1.0}, {}),
    "  - shared offset (b_dec from the mean)": ("tree", "project", {"center_quantile": None}, {}),
    "  - TopK floor (plain TopK)": ("tree", "project", {"min_activation": 0.0}, {}),
    "  - every parent's children redone (starved only)": ("tree", "project", {"child_reinit": "starved"}, {}),
    "  - late merges of top fragments": ("tree", "project", {"late_merge_cos": 1.0}, {}),
    "  - dead top latents re-seeded": ("tree", "project", {"reseed_dead_parents": False}, {}),
    "  + merge from cosine 0.4 (not adopted)": ("tree", "project", {"merge_cos": 0.4}, {}),
    "  + fragments below chance merged (not adopted)": ("tree", "project", {"merge_lift": 0.5}, {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=FAMILY_STEPS)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--only", default="", help="comma-separated generator names")
    parser.add_argument("--variants", default="", help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    gens = [s for s in FAMILY if not args.only or s.name in args.only.split(",")]
    wanted = args.variants.split(",") if args.variants else None
    variants = {k: v for k, v in VARIANTS.items() if wanted is None or k.strip() in wanted}
    print(f"device: cpu (1 thread per model, {os.cpu_count()} processes), {args.steps} steps of "
          f"{args.batch}, {args.rows} rows, seeds 0..{args.seeds - 1}")
    print("cells: parents found / children found / edge precision, mean over seeds (min children)")
    header = f"{'variant':28s}" + "".join(f"{g.name:>24s}" for g in gens)
    print(header)
    for name, (arch, preset, arch_over, train_over) in variants.items():
        start = time.perf_counter()
        jobs = [Job(g.name, arch, s, preset, arch_over, train_over, args.steps, args.batch, args.rows)
                for g in gens for s in range(args.seeds)]
        results = iter(judge_in_parallel(jobs))
        cells = []
        for _ in gens:  # the jobs were made generator by generator, seeds inside
            runs = [next(results) for _ in range(args.seeds)]
            mean = [sum(getattr(r, f) for r in runs) / len(runs)
                    for f in ("parents_found", "children_found", "edge_precision")]
            low = min(r.children_found for r in runs)
            cells.append(f"{mean[0]:.2f}/{mean[1]:.2f}/{mean[2]:.2f} ({low:.2f})")
        took = f"   [{time.perf_counter() - start:.0f}s]"
        print(f"{name:28s}" + "".join(f"{c:>24s}" for c in cells) + took, flush=True)


if __name__ == "__main__":
    main()

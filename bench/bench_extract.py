"""Activation extraction: the full pipeline (tokenize, forward to layer L, select rows, write shards) versus a
bare forward of the same contexts through a model truncated after layer L, in one process, as a ratio.

Rounds alternate baseline and pipeline so that load from other processes on this shared machine hits both
alike.
    .venv/bin/python bench/bench_extract.py [--tokens 12000] [--layer 15] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trainer.activations import PAD, ActivationCache
from trainer.lm import load_language_model


def bare_forward(lm, tokens_CT: np.ndarray, batch: int) -> int:
    """Bare `model(...)` calls with the blocks after the hooked layer removed; returns tokens processed."""
    inner = lm.model.model
    full_layers = inner.layers
    inner.layers = full_layers[: lm.layer + 1]
    try:
        n = 0
        with torch.inference_mode():
            for lo in range(0, len(tokens_CT), batch):
                chunk = tokens_CT[lo : lo + batch]
                present = chunk != PAD
                ids = torch.from_numpy(np.where(present, chunk, 0).astype(np.int64))
                mask = torch.from_numpy(present.astype(np.int64))
                inner(input_ids=ids, attention_mask=mask, use_cache=False)
                n += int(present[:, 1:].sum())
        return n
    finally:
        inner.layers = full_layers


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=12_000)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-contexts", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_language_model(layer=args.layer, device="auto")
    print(
        f"device {lm.device}, threads {torch.get_num_threads()}, layer {args.layer}, "
        f"{args.tokens} tokens/round"
    )
    with tempfile.TemporaryDirectory() as tmp:
        warm = ActivationCache(lm, "demo", root=Path(tmp) / "warm")
        tokens_CT = warm.contexts(args.tokens).token_ids_CT
        bare_forward(lm, tokens_CT[:32], args.batch_contexts)  # warm-up
        base_rates, pipe_rates = [], []
        for r in range(args.rounds):
            t = time.perf_counter()
            n = bare_forward(lm, tokens_CT, args.batch_contexts)
            base_rates.append(n / (time.perf_counter() - t))
            cache = ActivationCache(lm, "demo", root=Path(tmp) / f"round{r}")
            t = time.perf_counter()
            # Tokenizes + writes shards.
            source = cache.ensure(args.tokens, batch_contexts=args.batch_contexts)
            pipe_rates.append(source.num_rows / (time.perf_counter() - t))
    base, pipe = statistics.median(base_rates), statistics.median(pipe_rates)
    base_rounds = ", ".join(f"{x:.0f}" for x in base_rates)
    pipe_rounds = ", ".join(f"{x:.0f}" for x in pipe_rates)
    print(f"bare forward to layer {args.layer}: {base:8.0f} tok/s  (rounds: {base_rounds})")
    print(f"extraction pipeline:        {pipe:8.0f} tok/s  (rounds: {pipe_rounds})")
    print(f"pipeline / bare = {pipe / base:.3f}  (overhead {100 * (1 - pipe / base):.1f}%; goal <= 10%)")


if __name__ == "__main__":
    main()

"""Indexing throughput without a language model: accumulate synthetic codes (tokens/s), merge two shards,
then write the run to SQLite and, when it answers, to PostgreSQL (rows/s), with this tree's writer and, in
the same run, the baseline writer (backend/index/writer.py at BASELINE_COMMIT, read from git): write rows/s
and the share of the (accumulate + merge + write) time spent writing, each as a ratio.

    python bench/bench_index_db.py [--tokens 200000] [--widths 1024,8192] [--k 32]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import types
import uuid
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError

from backend.db.session import upgrade
from backend.index.writer import write_run
from trainer.index import ContextRecord, IndexAccumulator, IndexConfig, RunInfo

CONTEXT_LEN = 128
BASELINE_COMMIT = "c57e3e2"  # before the bulk writes (JSON once, plain tuples, zero-skipping values)
REPO = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def synthetic_chunk(rng, first_context: int, n_contexts: int, widths: list[int], k: int):
    """Bursty codes: each context draws a small topic set of features, and its tokens mostly reuse it."""
    n = n_contexts * CONTEXT_LEN
    codes = []
    for level, width in enumerate(widths):
        topics = rng.integers(0, width, (n_contexts, 4 * k))
        pick = rng.integers(0, 4 * k, (n, k))
        indices = np.take_along_axis(np.repeat(topics, CONTEXT_LEN, axis=0), pick, axis=1)
        fresh = rng.random((n, k)) < 0.2
        indices[fresh] = rng.integers(0, width, fresh.sum())
        values = rng.gamma(2.0, 0.5 / (level + 1), (n, k)).astype(np.float32)
        codes.append((indices, values))
    context = np.repeat(np.arange(first_context, first_context + n_contexts), CONTEXT_LEN)
    return codes, context, np.tile(np.arange(CONTEXT_LEN), n_contexts)


class Contexts:
    def get_contexts(self, ids):
        return [ContextRecord([f" tok{p}" for p in range(CONTEXT_LEN)], f"doc{c}", 0) for c in ids]


def accumulate(widths, k, tokens, chunk_tokens, seed) -> tuple[IndexAccumulator, float]:
    rng = np.random.default_rng(seed)
    ratio = widths[1] // widths[0] if len(widths) > 1 else 1
    edges = [((0, c // ratio), (1, c)) for c in range(widths[1])] if len(widths) > 1 else []
    acc = IndexAccumulator(widths, edges, IndexConfig())
    per_chunk = chunk_tokens // CONTEXT_LEN
    start, elapsed = seed * 10**9, 0.0
    for first in range(0, tokens // CONTEXT_LEN, per_chunk):
        codes, context, position = synthetic_chunk(rng, start + first, per_chunk, widths, k)
        t = time.perf_counter()
        acc.add(codes, context, position)
        elapsed += time.perf_counter() - t
    return acc, elapsed


def baseline_write_run():
    """write_run of the writer at BASELINE_COMMIT, or None when git cannot show it."""
    try:
        source = subprocess.run(
            ["git", "-C", str(REPO), "show", f"{BASELINE_COMMIT}:backend/index/writer.py"],
            capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    module = types.ModuleType("baseline_writer")
    exec(compile(source, f"writer.py@{BASELINE_COMMIT}", "exec"), module.__dict__)
    return module.write_run


def bench_write(url: str, result, label: str, write) -> tuple[float, int]:
    """(seconds of the first write, rows written)."""
    upgrade(url)
    rows = {"features": 0, "examples": 0}

    def progress(stage: str, done: int, total: int) -> None:
        rows[stage] = total

    info = RunInfo(name="bench", model_name="synthetic", layer=0, hook="none", arch="tree",
                   checkpoint_digest="0" * 64, config={}, corpus={"synthetic": True})
    t = time.perf_counter()
    write(url, result, info, Contexts(), progress=progress)
    first = time.perf_counter() - t
    t = time.perf_counter()
    write(url, result, info, Contexts(), replace=True)
    again = time.perf_counter() - t
    total_rows = sum(rows.values())
    print(f"{label:>20}: write {first:.1f} s ({total_rows / first:,.0f} rows/s, {rows['examples']:,} "
          f"examples); replace (write + delete old) {again:.1f} s", flush=True)
    return first, total_rows


def postgres_database():
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    try:
        with admin.connect() as conn:
            name = f"hsae_bench_{uuid.uuid4().hex[:10]}"
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError:
        return None

    def drop() -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    return POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}", drop


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=50_000)
    parser.add_argument("--widths", default="1024,8192")
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]

    half = args.tokens // 2
    shard_a, time_a = accumulate(widths, args.k, half, args.chunk, seed=1)
    shard_b, time_b = accumulate(widths, args.k, half, args.chunk, seed=2)
    active = 2 * half * args.k * len(widths)
    print(f"accumulate: {2 * half:,} tokens × {len(widths)} levels × k={args.k} in {time_a + time_b:.1f} s: "
          f"{2 * half / (time_a + time_b):,.0f} tokens/s ({active / (time_a + time_b) / 1e6:.1f} M active/s)")
    t = time.perf_counter()
    result = shard_a.merge(shard_b).result()
    merge_s = time.perf_counter() - t
    print(f"merge + result: {merge_s:.1f} s")
    compute_s = time_a + time_b + merge_s

    writers = {"tuned": write_run}
    baseline = baseline_write_run()
    if baseline is None:
        print(f"baseline writer: git cannot show {BASELINE_COMMIT}; no ratios")
    else:
        writers = {"baseline": baseline, **writers}
    figures: dict[tuple[str, str], tuple[float, int]] = {}
    for name, write in writers.items():
        with tempfile.TemporaryDirectory() as tmp:
            figures["sqlite", name] = bench_write(f"sqlite:///{Path(tmp) / 'bench.db'}", result,
                                                  f"sqlite, {name}", write)
        pg = postgres_database()
        if pg is None:
            print("postgresql: not answering at 127.0.0.1:5432, skipped")
            continue
        url, drop = pg
        try:
            figures["postgresql", name] = bench_write(url, result, f"postgresql, {name}", write)
        finally:
            drop()

    print(f"\n{2 * half:,} tokens; accumulate + merge {compute_s:.1f} s; {os.cpu_count()}-core CPU")
    for backend in ("sqlite", "postgresql"):
        for name in writers:
            if (backend, name) not in figures:
                continue
            seconds, rows = figures[backend, name]
            total = compute_s + seconds
            print(f"{backend:>10} {name:>8}: {rows / seconds:9,.0f} rows/s, index {2 * half / total:8,.0f} "
                  f"tokens/s, writes {100 * seconds / total:4.1f}% of the time")
        if (backend, "baseline") in figures and (backend, "tuned") in figures:
            (b_s, _), (t_s, _) = figures[backend, "baseline"], figures[backend, "tuned"]
            share_b, share_t = b_s / (compute_s + b_s), t_s / (compute_s + t_s)
            print(f"{backend:>10} tuned vs baseline: writes {b_s / t_s:.2f}x faster, index tokens/s "
                  f"{(compute_s + b_s) / (compute_s + t_s):.2f}x, share of time in writes "
                  f"{100 * share_b:.0f}% -> {100 * share_t:.0f}%")


if __name__ == "__main__":
    main()

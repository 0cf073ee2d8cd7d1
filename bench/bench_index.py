"""`hsae index` against bare activation extraction of the same tokens, peak memory at two corpus sizes 4x
apart, and database size per million tokens indexed (SQLite and PostgreSQL).

Each measurement runs in a fresh child process with its own data folder (nothing cached), so peak RSS belongs
to one index run. The ratio compares, inside one child, extracting N tokens of activations with indexing N
tokens (which extracts them too, then encodes, accumulates and writes): the overhead is everything indexing
adds.

Indexing with this tree's database writer is compared, in the same run and on the same tokens, with the
baseline writer (bench_index_db.BASELINE_COMMIT): tokens/s and the share of the index time spent writing.

    .venv/bin/python bench/bench_index.py [--tokens 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def child(args: argparse.Namespace) -> None:
    from backend.index.pipeline import index_checkpoint
    from trainer.activations import ActivationCache
    from trainer.lm import load_language_model

    out: dict = {"tokens": args.tokens}
    if args.with_baseline:
        lm = load_language_model(layer=15)
        t = time.perf_counter()
        root = Path(os.environ["HSAE_DATA_DIR"]) / "baseline"
        source = ActivationCache(lm, "demo", root=root).ensure(args.tokens)
        out["extract_tok_s"] = source.num_rows / (time.perf_counter() - t)
        del lm
    if args.baseline_writer:
        import backend.index.pipeline as pipeline
        from bench.bench_index_db import baseline_write_run

        pipeline.write_run = baseline_write_run()
    t = time.perf_counter()
    summary = index_checkpoint(Path(args.run), db_url=args.db, default_db_url=args.db, corpus="demo",
                               tokens=args.tokens, name=f"bench-{uuid.uuid4().hex[:6]}", device="cpu")
    out["index_s"] = time.perf_counter() - t
    out["index_tok_s"] = summary.tokens / out["index_s"]
    out["indexed_tokens"] = summary.tokens
    out["write_share"] = summary.write_seconds / summary.seconds
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def run_child(run_dir: Path, tokens: int, db: str, with_baseline: bool, data: Path,
              baseline_writer: bool = False) -> dict:
    data.mkdir(parents=True)
    for shared in ("models", "corpora"):  # conversion and corpus assembly are not what is measured
        (data / shared).symlink_to(REPO / "data" / shared)
    cmd = [sys.executable, __file__, "--child", "--run", str(run_dir), "--tokens", str(tokens), "--db", db]
    if with_baseline:
        cmd.append("--with-baseline")
    if baseline_writer:
        cmd.append("--baseline-writer")
    env = {**os.environ, "HSAE_DATA_DIR": str(data), "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])


def postgres_database() -> tuple[str, object] | None:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            name = f"hsae_bench_{uuid.uuid4().hex[:8]}"
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except OperationalError:
        return None
    return POSTGRES_ADMIN.rsplit("/", 1)[0] + f"/{name}", admin


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=10_000)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--with-baseline", action="store_true")
    parser.add_argument("--baseline-writer", action="store_true")
    parser.add_argument("--run")
    parser.add_argument("--db")
    args = parser.parse_args()
    if args.child:
        return child(args)

    from backend.db.session import db_upgrade
    from trainer.config import ArchConfig, RunConfig, TrainConfig
    from trainer.sources import DataSpec
    from trainer.workflows import run_training

    n = args.tokens
    with tempfile.TemporaryDirectory(prefix="hsae-bench-index-") as tmp:
        tmp = Path(tmp)
        os.environ["HSAE_DATA_DIR"] = str(tmp / "train-data")
        (tmp / "train-data").mkdir()
        for shared in ("models", "corpora"):
            (tmp / "train-data" / shared).symlink_to(REPO / "data" / shared)
        run_dir = tmp / "moe"  # the demo's size: 1024 parents x 16 children, k=32 (weights need not be good)
        cfg = RunConfig(ArchConfig(arch="moe", width=1024, k=32, children=16, subspace=4),
                        TrainConfig(batch_size=512, steps=5, progress=False, device="cpu"))
        run_training(DataSpec(corpus="demo", tokens=4_096, device="cpu"), cfg, run_dir)

        sqlite = f"sqlite:///{tmp / 'ratio.db'}"
        db_upgrade(sqlite)
        ratio = run_child(run_dir, n, sqlite, True, tmp / "d1")
        old_sqlite = f"sqlite:///{tmp / 'old-writer.db'}"
        db_upgrade(old_sqlite)
        old_writer = run_child(run_dir, n, old_sqlite, False, tmp / "d0", baseline_writer=True)
        small_db, large_db = f"sqlite:///{tmp / 'small.db'}", f"sqlite:///{tmp / 'large.db'}"
        small = run_child(run_dir, n, small_db, False, tmp / "d2")
        large = run_child(run_dir, 4 * n, large_db, False, tmp / "d3")
        sizes = {"SQLite": (tmp / "large.db").stat().st_size / large["indexed_tokens"] * 1e6}
        pg = postgres_database()
        if pg is not None:
            url, admin = pg
            db_upgrade(url)
            pg_run = run_child(run_dir, 4 * n, url, False, tmp / "d4")
            with admin.connect() as conn:
                name = url.rsplit("/", 1)[1]
                size = conn.exec_driver_sql(f"SELECT pg_database_size('{name}')").scalar()
                empty = conn.exec_driver_sql("SELECT pg_database_size('template1')").scalar()
                conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
            sizes["PostgreSQL"] = (size - empty) / pg_run["indexed_tokens"] * 1e6

    print(f"moe 1024 parents x 16 children, k=32, layer 15 of SmolLM2-135M, CPU threads {os.cpu_count()}")
    print(f"bare extraction: {ratio['extract_tok_s']:8.0f} tok/s")
    print(f"hsae index:      {ratio['index_tok_s']:8.0f} tok/s  (extract + encode + accumulate + write)")
    print(f"  of which SQLite writes {100 * ratio['write_share']:.0f}% of the index time; with the baseline "
          f"writer {old_writer['index_tok_s']:.0f} tok/s, writes {100 * old_writer['write_share']:.0f}%: "
          f"tokens/s {ratio['index_tok_s'] / old_writer['index_tok_s']:.2f}x the baseline's")
    print(f"index / extraction = {ratio['index_tok_s'] / ratio['extract_tok_s']:.3f} "
          f"(overhead {100 * (1 - ratio['index_tok_s'] / ratio['extract_tok_s']):.1f}%; goal < 15%)")
    marginal = (large["indexed_tokens"] - small["indexed_tokens"]) / (large["index_s"] - small["index_s"])
    print(f"marginal rate between {small['indexed_tokens']:,} and {large['indexed_tokens']:,} tokens: "
          f"{marginal:.0f} tok/s = {marginal / ratio['extract_tok_s']:.3f} of extraction (fixed per-run "
          f"costs such as top output tokens of every feature through the unembedding excluded)")
    print(f"peak RSS: {small['peak_rss_mb']:.0f} MB at {small['indexed_tokens']:,} tokens, "
          f"{large['peak_rss_mb']:.0f} MB at {large['indexed_tokens']:,} tokens "
          f"(ratio {large['peak_rss_mb'] / small['peak_rss_mb']:.2f} for 4x the tokens; goal: flat)")
    for name, per_million in sizes.items():
        print(f"database size / tokens indexed, {name}: {per_million / 1e6:.0f} MB per million at "
              f"{large['indexed_tokens']:,} tokens "
              f"(mostly per feature: examples and contexts, not per token)")


if __name__ == "__main__":
    main()

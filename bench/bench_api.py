"""API latency under load, against real uvicorn servers on loopback and a generated PostgreSQL database,
each figure measured in the same run on a baseline server and on tuned ones, printed as ratios.

1. Generates a run of 100k features (MoE-shaped: parents with 15 children each) and 1M examples with their
   contexts, by COPY, into a fresh database on the local server (`--scale 0.1` for a tenth).
2. Per server configuration, starts `uvicorn backend.app:create_app` in its own processes and drives:
   - the browse endpoints (forest, children, feature, search) with `--clients` closed-loop keep-alive
     connections for `--seconds` each, then a "hot" set of 200 features (what many readers of the same
     pages ask), plain and revalidating (If-None-Match with the ETag the client last got for that page);
     then feature, search and hot features with one client;
   - live activations of a 40-token prompt with the bundled SmolLM2 at `--layer` and a freshly initialised
     MoE H-SAE of the default size: the first prompt after the server answers /healthz, p50 / p95 with one
     client, and throughput and p95 with 8 concurrent clients (batched by the live queue).
   All configurations serve at once, and each workload runs on each in turn (other load on the machine
   drifts; so it falls on all alike). Configurations:
   - `baseline`: uvicorn's own h11 protocol, no answer cache (HSAE_API_CACHE_BYTES=0), the live model
     loaded on the first prompt;
   - `nodelay`: backend.http_protocol (TCP_NODELAY on every connection) alone, browse only;
   - `tuned`: that, the answer cache with ETags, and the live model preloaded (HSAE_LIVE_PRELOAD).

    .venv/bin/python bench/bench_api.py [--scale 1] [--clients 50] [--seconds 10] [--workers 1]
                                        [--no-live] [--no-browse] [--keep]

The load generator is a minimal asyncio HTTP/1.1 client (httpx spent more CPU per request than the server)
but still shares the machine with the server and the database; the load average is printed before and
after, since other work on the machine moves the figures. The database is dropped unless --keep is given.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from backend.db.session import upgrade  # noqa: E402
from backend.http_protocol import IMPORT_STRING as NODELAY_HTTP  # noqa: E402

RUN = "bench"
HOT_FEATURES = 200
PROMPT_TOKENS = 40
LIVE_RUN = "bench-live"
CHILDREN = 15
EXAMPLES_PER_FEATURE = 10  # 6 top + 4 quantile buckets
CONTEXT_LEN = 64
VOCAB = [
    f"{stem}{suffix}"
    for stem in (
        "river",
        "city",
        "number",
        "verb",
        "code",
        "law",
        "music",
        "food",
        "sport",
        "war",
        "king",
        "star",
        "tree",
        "bank",
        "time",
        "word",
        "name",
        "data",
    )
    for suffix in ("", "s", "ed", "ing", "er", "ly", "ion", "al", "ic", "ist")
]


# ---- the database ----------------------------------------------------------------------------------------
def admin_connection(url: str) -> psycopg.Connection:
    return psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True)


def create_database(admin_url: str) -> str:
    name = f"hsae_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        with admin_connection(admin_url) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as err:
        reason = " ".join(str(err).split())
        raise SystemExit(
            f"PostgreSQL does not answer at {admin_url} ({reason}); `make postgres` starts it"
        ) from None
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_database(admin_url: str, url: str) -> None:
    with admin_connection(admin_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def copy_rows(conn: psycopg.Connection, table: str, columns: list[str], rows, chunk: int = 20_000) -> int:
    """COPY rows (tuples; None = NULL) in CSV chunks."""
    n = 0
    with conn.cursor().copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)") as copy:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        for row in rows:
            writer.writerow(row)
            n += 1
            if n % chunk == 0:
                copy.write(buffer.getvalue())
                buffer.seek(0)
                buffer.truncate()
        copy.write(buffer.getvalue())
    return n


@dataclass
class Sizes:
    parents: int
    features: int
    contexts: int


def generate(url: str, scale: float, seed: int = 0) -> Sizes:
    rng = np.random.default_rng(seed)
    parents = max(1, round(100_000 * scale / (1 + CHILDREN)))
    widths = [parents, parents * CHILDREN]
    n_contexts = max(10, 2 * sum(widths))
    started = time.perf_counter()
    with admin_connection(url) as conn:
        run_id = conn.execute(
            "INSERT INTO runs (name, model_name, layer, hook, arch, checkpoint_digest, config, corpus, "
            "index_settings, level_widths, n_tokens, created_at, complete) VALUES (%s, 'bench-lm', 15, "
            "'blocks.15.hook_resid_post', 'moe', %s, '{}', '{}', '{}', %s, 10000000, now(), true) "
            "RETURNING id",
            (RUN, "0" * 64, json.dumps(widths)),
        ).fetchone()[0]

        def features():
            for level, width in enumerate(widths):
                fire = rng.integers(0, 50_000, width)
                max_act = rng.gamma(2.0, 2.0, width)
                words = rng.integers(0, len(VOCAB), (width, 10))
                labelled = rng.random(width) < 0.3
                for i in range(width):
                    tokens = [VOCAB[w] + ("" if k else f"{i % 97}") for k, w in enumerate(words[i])]
                    positive = [[t, round(5.0 - 0.3 * k, 3)] for k, t in enumerate(tokens)]
                    negative = [
                        [f"neg{VOCAB[w]}", round(-1.0 - 0.2 * k, 3)] for k, w in enumerate(words[i][:5])
                    ]
                    parent = i // CHILDREN if level else None
                    yield (
                        run_id,
                        level,
                        i,
                        0 if level else None,
                        parent,
                        CHILDREN if level == 0 else 0,
                        int(fire[i]),
                        float(fire[i]) / 1e7,
                        float(max_act[i]),
                        float(max_act[i]) / 3,
                        json.dumps(positive),
                        json.dumps(negative),
                        "\n".join(tokens),
                        json.dumps(
                            {
                                "edges": [round(0.1 * 1.3**b, 4) for b in range(21)],
                                "counts": [int(c) for c in rng.integers(0, 500, 20)],
                            }
                        ),
                        f"{VOCAB[words[i][0]]} concept {level}/{i}" if labelled[i] else None,
                        "a note about " + VOCAB[words[i][1]] if i % 20 == 0 else None,
                        "[]",
                    )

        n_features = copy_rows(
            conn,
            "features",
            [
                "run_id",
                "level",
                "idx",
                "parent_level",
                "parent_idx",
                "child_count",
                "fire_count",
                "density",
                "max_act",
                "mean_act",
                "top_positive",
                "top_negative",
                "top_tokens_text",
                "histogram",
                "label",
                "note",
                "tags",
            ],
            features(),
        )
        copy_rows(
            conn,
            "feature_edges",
            [
                "run_id",
                "child_level",
                "child_idx",
                "parent_level",
                "parent_idx",
                "coactive_count",
                "p_parent_given_child",
                "p_child_given_parent",
                "decoder_cosine",
            ],
            ((run_id, 1, i, 0, i // CHILDREN, 100, 0.8, 0.1, 0.4) for i in range(widths[1])),
        )
        token_rows = [
            json.dumps([VOCAB[w] for w in rng.integers(0, len(VOCAB), CONTEXT_LEN)]) for _ in range(997)
        ]
        copy_rows(
            conn,
            "contexts",
            ["run_id", "context_id", "tokens", "doc_id", "start"],
            (
                (run_id, c, token_rows[c % 997], f"doc{c // 50}", (c % 50) * CONTEXT_LEN)
                for c in range(n_contexts)
            ),
        )
        value_rows = []
        for _ in range(1009):
            values = np.zeros(CONTEXT_LEN)
            hot = rng.integers(0, CONTEXT_LEN, 3)
            values[hot] = np.round(rng.gamma(2.0, 1.0, 3), 3)
            value_rows.append(
                (
                    json.dumps(values.tolist()).replace(".0,", ",").replace(".0]", "]"),
                    float(values.max()),
                    int(values.argmax()),
                )
            )

        def examples():
            context_ids = rng.integers(0, n_contexts, n_features * EXAMPLES_PER_FEATURE)
            n = 0
            for level, width in enumerate(widths):
                for i in range(width):
                    for e in range(EXAMPLES_PER_FEATURE):
                        kind, bucket, rank = ("top", 0, e) if e < 6 else ("quantile", e - 6, 0)
                        values, top, position = value_rows[(n * 7919) % 1009]
                        yield run_id, level, i, kind, bucket, rank, int(context_ids[n]), values, top, position
                        n += 1

        n_examples = copy_rows(
            conn,
            "examples",
            [
                "run_id",
                "level",
                "idx",
                "kind",
                "bucket",
                "rank",
                "context_id",
                "token_values",
                "max_value",
                "max_position",
            ],
            examples(),
        )
        conn.execute("VACUUM ANALYZE")
    print(
        f"generated {n_features:,} features, {n_examples:,} examples, {n_contexts:,} contexts "
        f"in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return Sizes(parents, n_features, n_contexts)


def add_live_run(url: str, layer: int) -> Path:
    """A freshly initialised MoE H-SAE of the default size, saved as a checkpoint, and a run row for it."""
    import torch

    from trainer.checkpoint import read_info, save_checkpoint
    from trainer.config import ArchConfig
    from trainer.lm import DEFAULT_MODEL
    from trainer.models import build_model

    cfg = ArchConfig(arch="moe")
    model = build_model(cfg, 576, seed=0)
    model.prepare(torch.randn(1024, 576))
    run_dir = Path(tempfile.mkdtemp(prefix="hsae-bench-")) / "run"
    save_checkpoint(
        run_dir,
        model,
        model_info={"name": DEFAULT_MODEL, "layer": layer, "hook": f"blocks.{layer}.hook_resid_post"},
        training={"step": 0},
    )
    with admin_connection(url) as conn:
        conn.execute(
            "INSERT INTO runs (name, model_name, layer, hook, arch, checkpoint_digest, checkpoint_path, "
            "config, corpus, index_settings, level_widths, n_tokens, created_at, complete) "
            "VALUES (%s, %s, %s, %s, 'moe', %s, %s, '{}', '{}', '{}', %s, 0, now(), true)",
            (
                LIVE_RUN,
                DEFAULT_MODEL,
                layer,
                f"blocks.{layer}.hook_resid_post",
                read_info(run_dir).digest,
                str(run_dir),
                json.dumps(model.level_widths),
            ),
        )
    return run_dir


# ---- the server and the load ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Config:
    name: str
    http: str  # uvicorn --http
    cache_bytes: int
    preload: str


CONFIGS = (
    Config("baseline", "h11", 0, ""),
    Config("nodelay", NODELAY_HTTP, 0, ""),  # browse only: what TCP_NODELAY alone changes
    Config("tuned", NODELAY_HTTP, 64 << 20, LIVE_RUN),
)


def start_server(url: str, port: int, workers: int, config: Config, live: bool) -> subprocess.Popen:
    env = {
        **os.environ,
        "HSAE_DATABASE_URL": url,
        "HSAE_API_CACHE_BYTES": str(config.cache_bytes),
        "HSAE_LIVE_PRELOAD": config.preload if live else "",
        "HSAE_LIVE_QUEUE_SIZE": "64",
        "HSAE_LIVE_TIMEOUT_S": "600",  # a first prompt that loads the model must finish, to be measured
        "HSAE_LIVE_CPU_THREADS": str(max(1, (os.cpu_count() or 2) - 1)),  # as `hsae serve` does
        "TOKENIZERS_PARALLELISM": "false",
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "backend.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--http",
            config.http,
            "--no-access-log",
            "--log-level",
            "warning",
        ],
        cwd=REPO,
        env=env,
    )
    deadline = time.monotonic() + 300  # a preloaded live model loads first
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if server.poll() is not None:
            raise SystemExit("the server exited at start")
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not start within 300 s")


@dataclass
class Result:
    name: str
    latencies_ms: list[float]
    seconds: float
    errors: int

    def p(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    @property
    def rps(self) -> float:
        return len(self.latencies_ms) / self.seconds

    def line(self) -> str:
        if not self.latencies_ms:
            return f"{self.name:<28} no successful requests ({self.errors} errors)"
        lat = sorted(self.latencies_ms)
        p50, p95 = np.percentile(lat, 50), np.percentile(lat, 95)
        rps = len(lat) / self.seconds
        return (
            f"{self.name:<28} {len(lat):>7,} req  p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  {rps:8.1f} req/s"
            + (f"  ({self.errors} errors)" if self.errors else "")
        )


class Connection:
    """One keep-alive HTTP/1.1 connection that sends GETs and reads the answers, and nothing more: at 50
    connections httpx spends about 4 ms of CPU per request (more than the server), which on a small machine
    would measure the load generator instead of the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def get(self, path: str, etag: bytes | None = None) -> tuple[int, bytes, bytes | None]:
        """(status, body, ETag or None); `etag`: sent as If-None-Match."""
        condition = b"If-None-Match: " + etag + b"\r\n" if etag else b""
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\n".encode() + condition + b"\r\n")
        head = await self.reader.readuntil(b"\r\n\r\n")
        length, tag = 0, None
        for line in head.split(b"\r\n"):
            name = line[:15].lower()
            if name == b"content-length:":
                length = int(line[15:])
            elif name[:5] == b"etag:":
                tag = line[5:].strip()
        return int(head[9:12]), await self.reader.readexactly(length), tag

    def close(self) -> None:
        self.writer.close()


async def closed_loop(
    port: int, name: str, make_path, clients: int, seconds: float, warmup: float = 1.0,
    revalidate: bool = False,
) -> Result:
    """`clients` connections, each sending its next request as soon as the last answer arrived;
    `revalidate`: each client sends the ETag it last got for the path (as a browser does), and 304 counts
    as success."""
    latencies: list[float] = []
    errors = 0
    measure_from = time.perf_counter() + warmup
    stop = measure_from + seconds

    async def one_client(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        connection = await Connection.open(port)
        held: dict[str, bytes] = {}
        try:
            while (now := time.perf_counter()) < stop:
                path = make_path(rng)
                status, body, etag = await connection.get(path, held.get(path) if revalidate else None)
                done = time.perf_counter()
                if etag:
                    held[path] = etag
                if status not in (200, 304):
                    errors += 1
                    if errors == 1:
                        print(f"  first error: GET {path} -> {status} {body[:200]!r}")
                elif now >= measure_from:
                    latencies.append((done - now) * 1000)
        finally:
            connection.close()

    await asyncio.gather(*(one_client(seed) for seed in range(clients)))
    return Result(name, latencies, seconds, errors)


def browse_paths(sizes: Sizes) -> dict:
    """Per endpoint, a function drawing the path of a random request."""
    run = f"/api/v1/runs/{RUN}"
    n_children = sizes.parents * CHILDREN

    def forest(rng: random.Random) -> str:
        sort = rng.choice(["index", "density", "max_act"])
        return f"{run}/forest?level=0&sort={sort}&offset={rng.randrange(0, sizes.parents, 50)}"

    def children(rng: random.Random) -> str:
        return f"{run}/features/0/{rng.randrange(sizes.parents)}/children"

    def feature(rng: random.Random) -> str:
        level = int(rng.random() < 0.5)
        return f"{run}/features/{level}/{rng.randrange(n_children if level else sizes.parents)}"

    def search(rng: random.Random) -> str:
        return f"{run}/search?q={rng.choice(VOCAB)}{rng.randrange(97)}&limit=20"

    hot = random.Random(1).sample(range(sizes.features), min(HOT_FEATURES, sizes.features))

    def feature_hot(rng: random.Random) -> str:
        key = rng.choice(hot)
        level = int(key >= sizes.parents)
        return f"{run}/features/{level}/{key - sizes.parents if level else key}"

    return {"forest (roots page)": forest, "children": children, "feature": feature, "search": search,
            "feature (hot 200)": feature_hot}


def prompt_of(tokens: int) -> str:
    from transformers import AutoTokenizer

    from trainer.lm import converted_default_model

    tokenizer = AutoTokenizer.from_pretrained(converted_default_model())
    text = (
        "The river flows past the old city, where people gather every morning to trade fish, bread and news "
        "from the distant mountains; "
    ) * 4
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    prompt = tokenizer.decode(ids)
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == tokens
    return prompt


async def live_bench(base: str, prompt: str, requests: int) -> tuple[float, Result, Result]:
    """(first prompt's ms, one client, 8 concurrent clients)."""
    path = f"/api/v1/runs/{LIVE_RUN}/activations"
    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        t = time.perf_counter()
        first = await client.post(path, json={"text": prompt})  # loads the models unless preloaded
        first_ms = (time.perf_counter() - t) * 1000
        if first.status_code != 200:
            raise SystemExit(f"live warm-up failed: {first.status_code} {first.text[:300]}")
        device = first.json()["device"]
        for _ in range(3):
            await client.post(path, json={"text": prompt})
        single = []
        started = time.perf_counter()
        for _ in range(requests):
            t = time.perf_counter()
            response = await client.post(path, json={"text": prompt})
            assert response.status_code == 200, response.text
            single.append((time.perf_counter() - t) * 1000)
        name = f"live {PROMPT_TOKENS} tok"
        one = Result(f"{name}, 1 client ({device})", single, time.perf_counter() - started, 0)

        concurrent: list[float] = []

        async def worker(n: int) -> None:
            for _ in range(n):
                t = time.perf_counter()
                response = await client.post(path, json={"text": prompt})
                assert response.status_code == 200, response.text
                concurrent.append((time.perf_counter() - t) * 1000)

        started = time.perf_counter()
        await asyncio.gather(*(worker(max(1, requests // 4)) for _ in range(8)))
        eight = Result(f"{name}, 8 clients ({device})", concurrent, time.perf_counter() - started, 0)
    return first_ms, one, eight


def measure(args, url: str, sizes: Sizes, prompt: str | None) -> dict[str, dict[str, float]]:
    """Start a server per configuration (all at once, each on its own port), then run every workload on
    each in turn, so that other load on the machine, which drifts, falls on all of them alike; per
    configuration, the figures by name."""
    configs = [c for c in CONFIGS if not (args.no_browse and c.name == "nodelay")]
    live = {c.name: prompt is not None and c.name != "nodelay" for c in configs}
    figures: dict[str, dict[str, float]] = {c.name: {} for c in configs}
    servers: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        for config in configs:
            port = free_port()
            servers[config.name] = start_server(url, port, args.workers, config, live[config.name]), port
            print(
                f"[{config.name}] uvicorn --http {config.http}, {args.workers} worker(s), answer cache "
                f"{config.cache_bytes >> 20} MiB, "
                f"live preload {(live[config.name] and config.preload) or 'off'}",
                flush=True,
            )
        print(f"{os.cpu_count()} CPUs shared by the servers, the database and the load generator "
              f"(load average {os.getloadavg()[0]:.1f})", flush=True)
        for config in configs:
            if not live[config.name]:
                continue
            port = servers[config.name][1]
            first_ms, one, eight = asyncio.run(
                live_bench(f"http://127.0.0.1:{port}", prompt, args.live_requests)
            )
            print(f"[{config.name}] {'live first prompt':<28} {first_ms:9.1f} ms", flush=True)
            print(f"[{config.name}] {one.line()}", flush=True)
            print(f"[{config.name}] {eight.line()}", flush=True)
            figures[config.name] |= {
                "live first prompt, ms": first_ms,
                "live 1 client p50, ms": one.p(50),
                "live 1 client p95, ms": one.p(95),
                "live 8 clients, req/s": eight.rps,
                "live 8 clients p95, ms": eight.p(95),
            }
        if not args.no_browse:
            paths = browse_paths(sizes)
            runs = [(name, make_path, args.clients, False) for name, make_path in paths.items()]
            runs.append(("feature (hot 200), revalidate", paths["feature (hot 200)"], args.clients, True))
            runs += [(f"{name}, 1 client", paths[name], 1, False)
                     for name in ("feature", "search", "feature (hot 200)")]
            for name, make_path, clients, revalidate in runs:
                for config in configs:
                    seconds = args.seconds if clients > 1 else args.seconds / 2
                    port = servers[config.name][1]
                    result = asyncio.run(
                        closed_loop(port, name, make_path, clients, seconds, revalidate=revalidate)
                    )
                    print(f"[{config.name:>8}] {result.line()}", flush=True)
                    label = name if clients == 1 else f"{name}, {clients} clients"
                    figures[config.name] |= {
                        f"{label} p50, ms": result.p(50),
                        f"{label} p95, ms": result.p(95),
                        f"{label}, req/s": result.rps,
                    }
    finally:
        for server, _ in servers.values():
            server.terminate()
        for server, _ in servers.values():
            server.wait(30)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="1 = 100k features, 1M examples")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per endpoint")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--layer", type=int, default=15, help="hooked layer of the live model")
    parser.add_argument("--live-requests", type=int, default=40)
    parser.add_argument("--no-live", action="store_true")
    parser.add_argument("--no-browse", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the generated database")
    args = parser.parse_args()

    url = create_database(args.admin_url).replace("postgresql://", "postgresql+psycopg://")
    try:
        upgrade(url)
        sizes = generate(url, args.scale)
        prompt = None
        if not args.no_live:
            add_live_run(url, args.layer)
            prompt = prompt_of(PROMPT_TOKENS)
        results = measure(args, url, sizes, prompt)
        names = list(results)
        print(f"\n{'figure':<48}" + "".join(f"{n:>10}" for n in names)
              + "".join(f"{n + '/base':>14}" for n in names[1:]) + "   (ratios: >1 is better)")
        for figure, before in results["baseline"].items():
            values = [results[n].get(figure, float("nan")) for n in names]
            ratios = [v / before if figure.endswith("req/s") else before / v for v in values[1:]]
            print(f"{figure:<48}" + "".join(f"{v:10.1f}" for v in values)
                  + "".join(f"{r:13.2f}x" for r in ratios))
        print(f"load average after: {os.getloadavg()[0]:.1f}; device: {os.cpu_count()}-core CPU")
    finally:
        if args.keep:
            print(f"kept {url}")
        else:
            drop_database(args.admin_url, url)


if __name__ == "__main__":
    main()

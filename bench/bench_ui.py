"""The forest UI over a run with many roots, as seen in headless chromium: time to the first rows, node
expand (children fetched and rendered), and the jump to the last root, against the bare API calls behind them.

    .venv/bin/python bench/bench_ui.py [--roots 10000] [--rounds 3]

Each round opens a fresh browser context (no cache). Needs Debian's chromium (`make browser`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the test helpers build the run

from backend.app import create_app  # noqa: E402
from backend.db.session import make_engine, upgrade  # noqa: E402
from backend.settings import Settings  # noqa: E402
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, Server  # noqa: E402
from tests.browser.runs import wide_run  # noqa: E402
from tests.browser.timings import measure_forest  # noqa: E402


def api_ms(client: httpx.Client, path: str, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        client.get(path).raise_for_status()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--roots", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} not found: run `make browser`")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/hsae.db"
        upgrade(url)
        engine = make_engine(url)
        started = time.perf_counter()
        wide_run(engine, "wide", roots=args.roots)
        engine.dispose()
        print(f"run with {args.roots:,} roots and {4 * args.roots:,} children written in "
              f"{time.perf_counter() - started:.1f} s")
        app = create_app(Settings(database_url=url, data_dir=Path(tmp)), local=True)
        with Server(app) as server, httpx.Client(base_url=server.url) as client:
            first_page = api_ms(client, "/api/v1/runs/wide/forest?level=0&sort=density&offset=0&limit=200")
            last_page = api_ms(
                client, f"/api/v1/runs/wide/forest?level=0&sort=density&offset={args.roots - 200}&limit=200"
            )
            children = api_ms(client, "/api/v1/runs/wide/features/0/1/children?limit=500&sort=density")
            print(f"API (median of 5): first page of 200 roots {first_page:.1f} ms, "
                  f"last page {last_page:.1f} ms, children {children:.1f} ms")
            rounds = []
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                for _ in range(args.rounds):
                    context = browser.new_context(viewport={"width": 1440, "height": 900})
                    rounds.append(measure_forest(context.new_page(), server.url, "wide"))
                    context.close()
                browser.close()
    print(f"browser (median of {args.rounds} rounds, fresh context each):")
    for key in rounds[0]:
        print(f"  {key:28s} {statistics.median(r[key] for r in rounds):8.1f}")


if __name__ == "__main__":
    main()

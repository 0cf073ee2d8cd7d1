"""Browser tests: a real uvicorn server over an indexed SQLite run, driven through Debian's chromium by
Playwright (never `playwright install`). Screenshots land in test-artifacts/browser/ (git-ignored).

Two servers share one database: `local` (writes without a token, like `hsae serve --local`) and `token`
(writes need HSAE_WRITE_TOKEN). The prompt view's server (test_prompt.py) runs the real SmolLM2 with a real
checkpoint indexed by the real pipeline.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from backend.app import create_app
from backend.db.session import make_engine, upgrade
from backend.settings import Settings
from tests.browser.runs import DEMO_LABELS, sae_lens_run, small_run, wide_run

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
WRITE_TOKEN = "browser-test-token"
RUN = "demo-run"
LABELLED_RUN = "forest-demo"
WIDE_RUN = "wide"
SAE_RUN = "my-saes"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `app` on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite database with the small three-level run, the same forest with labels, a run with 10,000
    roots, and a run as `hsae index-sae` writes it."""
    url = f"sqlite:///{tmp_path_factory.mktemp('browser-db') / 'hsae.db'}"
    upgrade(url)
    engine = make_engine(url)
    try:
        small_run(engine, RUN)
        small_run(engine, LABELLED_RUN, labels=DEMO_LABELS)
        wide_run(engine, WIDE_RUN, roots=10_000)
        sae_lens_run(engine, SAE_RUN)
    finally:
        engine.dispose()
    return url


def _serve(database_url: str, tmp: Path, *, local: bool) -> Iterator[Server]:
    settings = Settings(database_url=database_url, data_dir=tmp, write_token=WRITE_TOKEN)
    with Server(create_app(settings, local=local)) as server:
        yield server


@pytest.fixture(scope="session")
def server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Local mode: annotation writes need no token."""
    yield from _serve(database_url, tmp_path_factory.mktemp("local-data"), local=True)


@pytest.fixture(scope="session")
def token_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Writes need `Authorization: Bearer WRITE_TOKEN`."""
    yield from _serve(database_url, tmp_path_factory.mktemp("token-data"), local=False)


@pytest.fixture(scope="session")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (make browser)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@dataclass
class PageErrors:
    """Uncaught exceptions, console errors and dialogs of a page: none is expected in any test."""

    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)  # substrings of errors a test provokes on purpose

    def unexpected(self) -> list[str]:
        return [e for e in self.errors if not any(a in e for a in self.allowed)]


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(15_000)
    seen = PageErrors()
    page.on("pageerror", lambda err: seen.errors.append(f"pageerror: {err}"))
    page.on(
        "console", lambda msg: seen.errors.append(f"console: {msg.text}") if msg.type == "error" else None
    )

    def on_dialog(dialog) -> None:
        seen.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    page.seen = seen
    yield page
    context.close()
    assert not seen.unexpected(), seen.unexpected()
    assert not seen.dialogs, f"a dialog opened: {seen.dialogs}"


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


def publish_screenshot(path: Path) -> None:
    """docs/screenshot.png (committed, shown by the README) is refreshed only on request."""
    if os.environ.get("HSAE_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(path, REPO / "docs" / "screenshot.png")

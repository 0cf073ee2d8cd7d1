"""The forest page is split into ES modules under frontend/js/forest/: the page must fetch every one of them
from the static mount, with no failed request and no console error (the `page` fixture fails on those)."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import RUN

pytestmark = pytest.mark.browser

FRONTEND_JS = Path(__file__).resolve().parents[2] / "frontend" / "js"


def test_forest_page_loads_each_of_its_modules(page, server):
    modules = sorted(p.relative_to(FRONTEND_JS).as_posix() for p in (FRONTEND_JS / "forest").glob("*.js"))
    assert modules, "frontend/js/forest/ holds the forest page's modules"
    scripts: dict[str, int] = {}
    failed: list[str] = []
    page.on("response", lambda r: scripts.__setitem__(r.url.split("/static/js/", 1)[1], r.status)
            if "/static/js/" in r.url else None)
    page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))

    page.goto(f"{server.url}/runs/{RUN}")
    # The page works: rows from tree.js, the preview from preview.js.
    expect(page.locator("#tree .tree-row[data-level]").first).to_be_visible()
    expect(page.locator("#preview h1")).to_be_visible()
    page.wait_for_load_state("networkidle")

    assert not failed, failed
    assert {path: status for path, status in scripts.items() if status >= 400} == {}
    assert [m for m in ["forest.js", *modules] if scripts.get(m) != 200] == [], scripts

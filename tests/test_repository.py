"""Checks on the repository itself rather than on what it runs: module sizes, and that the contracts the code
cites are documented inside the repository."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FRONTEND_JS = REPO / "frontend" / "js"

# A module past this many lines holds several concerns; split it the way frontend/js/forest/ is split.
MAX_JS_LINES = 400


def test_no_frontend_module_exceeds_the_size_budget():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in FRONTEND_JS.rglob("*.js")}
    assert sizes, "frontend/js holds the UI's modules"
    assert {path: n for path, n in sizes.items() if n > MAX_JS_LINES} == {}

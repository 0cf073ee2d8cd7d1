"""How fast the forest is over 10,000 roots, as seen in the browser (the figures go to
test-artifacts/browser/ui_timings.json; bench/bench_ui.py prints the same). Bounds are loose: this guards
against the forest loading every root, not against a slow shared machine."""

from __future__ import annotations

import json

import pytest

from tests.browser.conftest import ARTIFACTS, WIDE_RUN
from tests.browser.timings import measure_forest

pytestmark = pytest.mark.browser


def test_forest_over_ten_thousand_roots_is_fast(page, server):
    timings = measure_forest(page, server.url, WIDE_RUN)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "ui_timings.json").write_text(json.dumps(timings, indent=2))
    print("forest over 10k roots:", timings)
    assert timings["first_rows_ms"] < 5000
    assert timings["expand_median_ms"] < 1500
    assert timings["jump_to_last_root_ms"] < 3000

"""Forest timings as the browser sees them, shared by tests/browser/test_ui_timings.py and
bench/bench_ui.py."""

from __future__ import annotations

import statistics

# Click a root's twisty, wait for its children to be in the DOM and one frame to be painted, collapse again.
_EXPAND_JS = """async (i) => {
  const roots = [...document.querySelectorAll('#tree .tree-row[aria-level="1"][data-level]')];
  const id = roots[i].id;
  const frame = () => new Promise((r) => requestAnimationFrame(() => setTimeout(r, 0)));
  const t0 = performance.now();
  roots[i].querySelector('.twisty').click();
  while (document.getElementById(id)?.getAttribute('aria-expanded') !== 'true') await frame();
  const ms = performance.now() - t0;
  document.getElementById(id).querySelector('.twisty').click();
  while (document.getElementById(id)?.getAttribute('aria-expanded') !== 'false') await frame();
  return ms;
}"""

# From the tree's focus, End: the last root's page is fetched and its row rendered.
_END_JS = """async () => {
  const tree = document.getElementById('tree');
  const total = Number(document.getElementById('forest-count').textContent.replace(/[^0-9]/g, ''));
  tree.focus();
  const t0 = performance.now();
  tree.dispatchEvent(new KeyboardEvent('keydown', { key: 'End', bubbles: true }));
  const selector = `#tree .tree-row[aria-posinset="${total}"][data-level][aria-level="1"]`;
  while (!document.querySelector(selector)) await new Promise((r) => requestAnimationFrame(r));
  return performance.now() - t0;
}"""


def measure_forest(page, base_url: str, run: str, expands: int = 5) -> dict[str, float]:
    """Milliseconds: navigation to the first real rows in the DOM, first contentful paint, the median and
    worst expand (children fetched and rendered), and the jump to the last root."""
    page.goto(f"{base_url}/runs/{run}")
    page.wait_for_function("performance.getEntriesByName('forest:first-rows').length > 0", timeout=30_000)
    first_rows = page.evaluate("performance.getEntriesByName('forest:first-rows')[0].startTime")
    fcp = page.evaluate(
        "(performance.getEntriesByName('first-contentful-paint')[0] || {startTime: NaN}).startTime"
    )
    expand = [page.evaluate(_EXPAND_JS, i) for i in range(expands)]
    end = page.evaluate(_END_JS)
    return {
        "first_contentful_paint_ms": round(fcp, 1),
        "first_rows_ms": round(first_rows, 1),
        "expand_median_ms": round(statistics.median(expand), 1),
        "expand_max_ms": round(max(expand), 1),
        "jump_to_last_root_ms": round(end, 1),
    }

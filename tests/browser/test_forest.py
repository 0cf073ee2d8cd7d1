"""The runs list and the forest: lazy expand and collapse, keyboard navigation, search, focus links."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import LABELLED_RUN, RUN, WIDE_RUN, publish_screenshot, screenshot
from tests.browser.runs import LEVEL_WIDTHS, WIDE_DEAD_EVERY

pytestmark = pytest.mark.browser

ROW = "#tree .tree-row"


def row(page, level: int, index: int):
    return page.locator(f'{ROW}[data-level="{level}"][data-index="{index}"]')


def test_runs_page_lists_runs_and_links_to_the_forest(page, server):
    page.goto(server.url + "/")
    expect(page.locator("tr[data-run]")).to_have_count(4)
    screenshot(page, "runs")
    page.get_by_role("link", name=RUN, exact=True).click()
    expect(page).to_have_url(re.compile(rf"/runs/{RUN}$"))
    expect(page.locator("#forest-count")).to_have_text(f"{LEVEL_WIDTHS[0]} roots")


def test_expand_shows_children_and_collapse_hides_them(page, server):
    page.goto(f"{server.url}/runs/{RUN}")
    roots = page.locator(f'{ROW}[aria-level="1"][data-level="0"]')
    expect(roots).to_have_count(LEVEL_WIDTHS[0])
    expect(page.locator("#tree")).to_have_attribute("role", "tree")

    index = 0  # its children have children of their own (the last root's do not)
    first = row(page, 0, index)
    expect(first).to_have_attribute("aria-expanded", "false")
    first.locator(".twisty").click()
    children = page.locator(f'{ROW}[aria-level="2"]')
    expect(children).to_have_count(3)  # the small forest gives every root three children
    expect(row(page, 0, index)).to_have_attribute("aria-expanded", "true")
    for i in range(3):
        assert children.nth(i).get_attribute("data-level") == "1"
    # A child row shows its label or top tokens, a density bar and its child count.
    expect(children.first.locator(".tok-chip").first).to_be_visible()
    expect(children.first.locator(".density-bar")).to_be_visible()
    expect(children.first.locator(".kids")).to_have_text("2 ▸")
    screenshot(page, "forest-expanded")

    row(page, 0, index).locator(".twisty").click()
    expect(children).to_have_count(0)
    expect(row(page, 0, index)).to_have_attribute("aria-expanded", "false")


def test_keyboard_navigation(page, server):
    page.goto(f"{server.url}/runs/{RUN}")
    expect(page.locator(f"{ROW}[data-level]")).to_have_count(LEVEL_WIDTHS[0])
    tree = page.locator("#tree")
    tree.focus()
    active = page.locator(f"{ROW}.active")
    expect(active).to_have_attribute("aria-posinset", "1")
    first_index = active.get_attribute("data-index")
    assert tree.get_attribute("aria-activedescendant") == active.get_attribute("id")

    page.keyboard.press("ArrowDown")
    expect(active).to_have_attribute("aria-posinset", "2")
    page.keyboard.press("ArrowUp")
    expect(active).to_have_attribute("data-index", first_index)

    page.keyboard.press("ArrowRight")  # expand
    expect(active).to_have_attribute("aria-expanded", "true")
    expect(page.locator(f'{ROW}[aria-level="2"]')).to_have_count(3)
    page.keyboard.press("ArrowRight")  # into the first child
    expect(active).to_have_attribute("aria-level", "2")
    page.keyboard.press("ArrowLeft")  # back to the parent
    expect(active).to_have_attribute("data-index", first_index)
    page.keyboard.press("ArrowLeft")  # collapse
    expect(page.locator(f'{ROW}[aria-level="2"]')).to_have_count(0)

    page.keyboard.press("End")
    expect(active).to_have_attribute("aria-posinset", str(LEVEL_WIDTHS[0]))
    page.keyboard.press("Home")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(rf"/runs/{RUN}/features/0/{first_index}$"))


def test_sort_and_level_switch(page, server):
    page.goto(f"{server.url}/runs/{RUN}")
    page.select_option("#sort", "index")
    expect(page.locator(f"{ROW}[data-level]").first).to_have_attribute("data-index", "0")
    expect(page).to_have_url(re.compile(r"sort=index"))
    page.select_option("#level", "2")
    expect(page.locator("#forest-count")).to_have_text(f"{LEVEL_WIDTHS[2]} features at level 2")
    expect(page.locator(f'{ROW}[data-level="2"]').first).to_be_visible()


def test_focus_link_expands_ancestors_and_highlights_the_node(page, server):
    page.goto(f"{server.url}/runs/{RUN}?focus=2:30")  # 2:30 → parent 1:15 → root 0:5
    target = row(page, 2, 30)
    expect(target).to_have_class(re.compile(r"\bfocused\b"))
    expect(target).to_have_class(re.compile(r"\bactive\b"))
    expect(row(page, 0, 5)).to_have_attribute("aria-expanded", "true")
    expect(row(page, 1, 15)).to_have_attribute("aria-expanded", "true")
    expect(page.locator("#preview h1")).to_be_visible()
    expect(page.locator("#preview")).to_contain_text("L2 #30")
    screenshot(page, "forest-focus")


@pytest.mark.parametrize("sort, index", [("child_count", 5), ("density", 3 * WIDE_DEAD_EVERY)])
def test_focus_on_a_tied_or_dead_root_fetches_only_its_page(page, server, sort, index):
    """All 10,000 roots of the wide run tie on child count, and its dead roots tie at zero density: the page
    asks the server where the root is listed and fetches only that page (not every page up to it)."""
    forest = f"/api/v1/runs/{WIDE_RUN}/forest"
    forest_requests = []
    page.on("request", lambda r: forest_requests.append(r.url) if forest in r.url else None)
    page.goto(f"{server.url}/runs/{WIDE_RUN}?focus=0:{index}&sort={sort}")
    target = row(page, 0, index)
    expect(target).to_have_class(re.compile(r"\bfocused\b"))
    expect(target).to_have_class(re.compile(r"\bactive\b"))
    expect(page.locator("#preview")).to_contain_text(f"L0 #{index}")
    page.wait_for_load_state("networkidle")
    assert len(forest_requests) <= 3, forest_requests  # the first page, the root's page (and one in view)


def test_search_finds_by_top_token_and_focuses_the_hit(page, server):
    page.goto(f"{server.url}/runs/{RUN}")
    page.fill("#search", "Berlin")
    hits = page.locator("#search-results li[data-i]")
    expect(hits.first).to_be_visible()
    expect(page.locator("#search")).to_have_attribute("aria-expanded", "true")
    first_hit = hits.first.locator(".fid").inner_text()  # "L2 #7"
    level, index = re.fullmatch(r"L(\d+) #(\d+)", first_hit).groups()
    page.keyboard.press("Enter")
    expect(row(page, int(level), int(index))).to_have_class(re.compile(r"\bfocused\b"))
    expect(page).to_have_url(re.compile(rf"focus={level}:{index}"))


def test_ten_thousand_roots_page_in_as_they_scroll_into_view(page, server):
    page.goto(f"{server.url}/runs/{WIDE_RUN}")
    expect(page.locator("#forest-count")).to_have_text("10,000 roots")
    # Only the rows in view (plus a margin) are in the DOM.
    expect(page.locator(f"{ROW}[data-level]").first).to_be_visible()
    assert page.locator(ROW).count() < 100
    tree = page.locator("#tree")
    tree.focus()
    page.keyboard.press("End")
    last = page.locator(f'{ROW}[aria-posinset="10000"][data-level="0"]')
    expect(last).to_be_visible()
    expect(last).to_have_class(re.compile(r"\bactive\b"))
    assert page.locator(ROW).count() < 100
    screenshot(page, "forest-10k-end")


def test_labelled_forest(page, server):
    page.goto(f"{server.url}/runs/{LABELLED_RUN}?focus=2:0")
    expect(row(page, 2, 0)).to_have_class(re.compile(r"\bfocused\b"))
    expect(row(page, 0, 0).locator(".label")).to_have_text("capital cities")
    expect(row(page, 1, 0).locator(".label")).to_have_text("Paris, Berlin")
    expect(page.locator("#preview h1")).to_have_text("Paris")
    expect(page.locator("#preview .ctx").first).to_be_visible()
    publish_screenshot(screenshot(page, "forest-labelled"))


def test_rows_show_automatic_labels_until_a_person_labels_the_feature(page, server):
    """In the themed forest a level-2 feature fires on one token only: that token is its automatic label."""
    page.goto(f"{server.url}/runs/{RUN}?focus=2:1")
    expect(row(page, 2, 1).locator(".auto-label")).to_have_text("Berlin")
    expect(page.locator("#preview .auto-label-line")).to_have_text("fires most on: Berlin")
    either = re.compile(r"^(Paris|Berlin)( · (Paris|Berlin))?$")  # level 1 fires on two tokens
    expect(row(page, 1, 0).locator(".auto-label")).to_have_text(either)
    expect(row(page, 0, 0).locator(".auto-label")).not_to_be_empty()
    # The markup theme's tokens show as text.
    expect(row(page, 0, 9).locator(".auto-label")).to_contain_text("<")
    assert page.locator("#tree .auto-label img, #tree .auto-label b").count() == 0
    screenshot(page, "forest-auto-labels")

    response = page.request.put(f"{server.url}/api/v1/runs/{RUN}/features/2/1/annotation",
                                data={"label": "the German capital"})
    assert response.ok, response.text()
    page.reload()
    expect(row(page, 2, 1).locator(".label")).to_have_text("the German capital")
    expect(row(page, 2, 1).locator(".auto-label")).to_have_count(0)
    expect(row(page, 2, 0).locator(".auto-label")).to_have_text("Paris")

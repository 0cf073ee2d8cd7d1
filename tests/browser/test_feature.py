"""Feature pages: ancestors, children with edge statistics, shaded contexts, plotly charts, annotations
(local mode and bearer token), export, and that user and corpus text always shows as text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
from playwright.sync_api import expect

from tests.browser.conftest import LABELLED_RUN, RUN, SAE_RUN, WRITE_TOKEN, screenshot

pytestmark = pytest.mark.browser

SCHEMA = Path(__file__).resolve().parents[2] / "backend" / "schemas" / "hsae-subtree.schema.json"
XSS_LABEL = '<img src=x onerror="window.__xss = 1">'
XSS_NOTE = "<script>window.__xss = 2</script> & <b>not bold</b>"
XSS_TAG = "<svg onload=window.__xss=3>"


def feature_url(server, level: int, index: int) -> str:
    return f"{server.url}/runs/{RUN}/features/{level}/{index}"


def test_feature_page_shows_hierarchy_contexts_and_charts(page, server):
    page.goto(feature_url(server, 1, 4))
    # Breadcrumb: runs / run / every ancestor / this feature.
    crumb = page.locator("#breadcrumb")
    expect(crumb.get_by_role("link", name=re.compile(r"^L0 #1\b"))).to_have_attribute(
        "href", f"/runs/{RUN}/features/0/1")
    expect(crumb.locator('[aria-current="page"]')).to_have_text("L1 #4")

    # Parent edge and children with both conditional probabilities.
    expect(page.locator("#parent tbody tr")).to_have_count(1)
    children = page.locator("#children tbody tr")
    expect(children).to_have_count(2)
    probs = children.first.locator(".prob")
    expect(probs).to_have_count(2)
    for i in range(2):
        assert 0 <= float(probs.nth(i).inner_text().split()[0]) <= 1

    # Top-activating contexts: tokens shaded by activation, each value in its title.
    contexts = page.locator("#top-contexts .ctx")
    expect(contexts.first).to_be_visible()
    assert contexts.count() >= 3
    hot = contexts.first.locator(".tok.hot")
    expect(hot).to_have_count(1)
    assert re.search(r"activation \d", hot.get_attribute("title"))
    assert "rgba" in hot.evaluate("el => el.style.background")
    cold_titles = contexts.first.locator(".tok").evaluate_all("els => els.map(e => e.title)")
    assert all(re.search(r"activation -?[\d.e+-]+$", t) for t in cold_titles)
    # A click opens the whole context (the strip is windowed around its strongest token).
    contexts.first.locator(".strip").click()
    expect(contexts.first).to_have_class(re.compile(r"\bexpanded\b"))
    expect(page.locator("#quantile-contexts .ctx").first).to_be_visible()

    # Both charts rendered by plotly, with data.
    for chart in ("#top-tokens-chart", "#histogram-chart"):
        expect(page.locator(f"{chart}.js-plotly-plot")).to_be_visible()
        traces = page.locator(chart).evaluate("el => el.data.map(t => t.x.length)")
        assert traces and all(n > 0 for n in traces)
    expect(page.locator("#top-tokens-chart .bars path").first).to_be_attached()
    screenshot(page, "feature")


def test_corpus_markup_in_contexts_and_charts_is_text(page, server):
    # The synthetic corpus holds "<img src=x onerror=alert(1)>" and "<b>bold</b>" as tokens of theme 9.
    page.goto(feature_url(server, 0, 9))
    expect(page.locator("#top-contexts .ctx").first).to_be_visible()
    expect(page.locator("#top-tokens-chart.js-plotly-plot")).to_be_visible()
    for root in ("#top-contexts", "#quantile-contexts", "#children", "#top-tokens-chart"):
        assert page.locator(f"{root} img, {root} b").count() == 0
    tokens = page.locator(".strip .tok").evaluate_all("els => els.map(e => e.textContent)")
    assert any("<img src=x onerror=alert(1)>" in t for t in tokens)
    chart_text = page.locator("#top-tokens-chart").inner_text()
    assert "<b>bold</b>" in chart_text or "<img src=x onerror=alert(1)>" in chart_text


def test_annotation_is_saved_shown_after_reload_and_never_executed(page, server):
    page.goto(feature_url(server, 0, 3))
    page.fill("#annot-label", XSS_LABEL)
    page.fill("#annot-note", XSS_NOTE)
    page.fill("#annot-tags", f"syntax, {XSS_TAG}, syntax")
    page.click("#annot-save")
    expect(page.locator("#annot-status")).to_have_text("Saved")
    expect(page.locator("#feature-title")).to_have_text(XSS_LABEL)

    page.reload()
    expect(page.locator("#feature-title")).to_have_text(XSS_LABEL)
    expect(page.locator("#feature-note")).to_have_text(XSS_NOTE)
    expect(page.locator("#feature-tags .tag")).to_have_text(["syntax", XSS_TAG])
    expect(page.locator("#annot-label")).to_have_value(XSS_LABEL)
    expect(page.locator("#annot-tags")).to_have_value(f"syntax, {XSS_TAG}")
    assert page.locator(".titles img, .titles script, .titles svg").count() == 0
    assert page.evaluate("window.__xss") is None
    screenshot(page, "feature-annotated")

    # The same text everywhere else it shows: the forest row, the preview, search results, the prompt view.
    page.goto(f"{server.url}/runs/{RUN}?focus=0:3")
    expect(page.locator('.tree-row[data-level="0"][data-index="3"] .label')).to_have_text(XSS_LABEL)
    expect(page.locator("#preview h1")).to_have_text(XSS_LABEL)
    page.fill("#search", "onerror")
    expect(page.locator("#search-results .label").first).to_have_text(XSS_LABEL)
    assert page.locator("#tree img, #preview img, #search-results img").count() == 0
    assert page.evaluate("window.__xss") is None
    page.goto(feature_url(server, 1, 9))  # a child of 0:3: the label shows in its breadcrumb
    expect(page.locator("#breadcrumb")).to_contain_text(XSS_LABEL)

    assert page.locator("#breadcrumb img, #breadcrumb script").count() == 0
    assert page.evaluate("window.__xss") is None

    # History lists the change.
    page.goto(feature_url(server, 0, 3))
    page.locator("details.history summary").click()
    expect(page.locator("details.history li").first).to_contain_text("label")


def test_token_mode_needs_the_pasted_token(page, token_server):
    page.seen.allowed.append("status of 401")  # the wrong token is refused, as it should be
    page.goto(f"{token_server.url}/runs/{RUN}/features/0/4")
    expect(page.locator("#annot-save")).to_be_disabled()
    expect(page.locator(".readonly-hint")).to_be_visible()

    page.get_by_role("button", name="Paste write token").click()
    page.get_by_role("textbox", name="Write token").fill("wrong-token")
    page.get_by_role("dialog").get_by_role("button", name="Save").click()
    expect(page.locator("#annot-save")).to_be_enabled()
    page.fill("#annot-label", "refused")
    page.click("#annot-save")
    expect(page.locator("#annot-status")).to_have_text("The server refused the write token.")

    page.get_by_role("button", name="Change token").click()
    page.get_by_role("textbox", name="Write token").fill(WRITE_TOKEN)
    page.get_by_role("textbox", name="Write token").press("Enter")
    page.fill("#annot-label", "accepted with a token")
    page.click("#annot-save")
    expect(page.locator("#annot-status")).to_have_text("Saved")
    assert page.evaluate("localStorage.getItem('hsae.writeToken')") == WRITE_TOKEN
    page.reload()
    expect(page.locator("#feature-title")).to_have_text("accepted with a token")
    expect(page.locator("#annot-save")).to_be_enabled()  # the token stays in this browser


def test_export_downloads_a_valid_subtree_document(page, server):
    page.goto(feature_url(server, 0, 1))
    expect(page.locator("#export")).to_be_enabled()
    with page.expect_download() as info:
        page.click("#export")
    download = info.value
    assert download.suggested_filename == f"{RUN}-L0-1.hsae-subtree.json"
    document = json.loads(Path(download.path()).read_text())
    jsonschema.validate(document, json.loads(SCHEMA.read_text()))
    assert document["format"] == "hsae-subtree"
    assert (document["root"]["level"], document["root"]["index"]) == (0, 1)
    assert len(document["root"]["children"]) == 3
    assert all(len(child["children"]) == 2 for child in document["root"]["children"])

    page.select_option("#export-depth", "0")
    with page.expect_download() as info:
        page.click("#export")
    shallow = json.loads(Path(info.value.path()).read_text())
    jsonschema.validate(shallow, json.loads(SCHEMA.read_text()))
    assert shallow["root"]["children"] == []


def test_unknown_feature_says_so(page, server):
    page.seen.allowed.append("status of 404")
    page.goto(feature_url(server, 0, 999))
    expect(page.locator(".error-box")).to_contain_text("no feature")


def test_labelled_feature_page(page, server):
    page.goto(f"{server.url}/runs/{LABELLED_RUN}/features/1/0")
    expect(page.locator("#feature-title")).to_have_text("Paris, Berlin")
    expect(page.locator("#breadcrumb")).to_contain_text("capital cities")
    expect(page.locator("#children tbody tr")).to_have_count(2)
    expect(page.locator("#children")).to_contain_text("Berlin")
    hot = page.locator("#top-contexts .ctx .tok.hot")
    expect(hot.first).to_be_visible()
    assert set(hot.all_text_contents()) <= {" Paris", " Berlin"}
    expect(page.locator("#histogram-chart.js-plotly-plot")).to_be_visible()
    screenshot(page, "feature-labelled")


def test_pages_of_unknown_runs_answer_404(page, server):
    page.seen.allowed.append("status of 404")
    for path in ("/runs/nope", "/runs/nope/prompt", "/runs/nope/features/0/0"):
        response = page.goto(server.url + path)
        assert response.status == 404
        expect(page.locator(".error-box")).to_have_text("No run named “nope”.")


def test_cross_width_relatives_of_an_index_sae_run_and_an_hsae_run(page, server):
    # The runs page and the level picker say which SAEs the run came from.
    page.goto(server.url + "/")
    expect(page.locator(f'[data-sources="{SAE_RUN}"]')).to_have_text(
        "from SAEs: res-36 (topk, 36) · res-72 (topk, 72)")
    page.goto(f"{server.url}/runs/{SAE_RUN}")
    expect(page.locator("#level option")).to_have_text(["0 · roots (36) · res-36", "1 (72) · res-72"])

    # A wide feature's relatives: the narrow features it co-fires with most, as the API serves them.
    detail = page.request.get(f"{server.url}/api/v1/runs/{SAE_RUN}/features/1/5").json()
    relatives = detail["relatives"]
    assert relatives and {r["feature"]["level"] for r in relatives} == {0}
    assert relatives[0]["feature"]["index"] == detail["parent"]["index"] == 2  # token 5's sub-theme
    page.goto(f"{server.url}/runs/{SAE_RUN}/features/1/5")
    rows = page.locator("#relatives tbody tr[data-level]")
    expect(rows).to_have_count(len(relatives))
    first = rows.first
    expect(first.locator("td").first).to_have_text("L0 #2")
    expect(first.locator(".prob").first).to_have_text(f"{relatives[0]['p_relative_given_feature']:.2f}")
    expect(first.locator(".prob").nth(1)).to_have_text(f"{relatives[0]['p_feature_given_relative']:.2f}")
    expect(page.locator("#relatives .group")).to_have_text(["Level 0 · coarser"])
    screenshot(page, "relatives-sae")
    first.get_by_role("link").click()
    expect(page).to_have_url(re.compile(rf"/runs/{SAE_RUN}/features/0/2$"))
    back = page.locator("#relatives tbody tr[data-level]")
    expect(back.filter(has=page.get_by_role("link", name="L1 #5", exact=True))).to_have_count(1)

    # An HSAE run's feature shows its relatives in both other levels.
    page.goto(feature_url(server, 1, 4))
    expect(page.locator("#relatives .group")).to_have_text(["Level 0 · coarser", "Level 2 · finer"])
    expect(page.locator('#relatives tbody tr[data-level="2"]').first).to_be_visible()

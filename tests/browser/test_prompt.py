"""The live prompt view on the real SmolLM2 (layer 6) and a small MoE H-SAE trained on its activations and
indexed by the real pipeline: shaded token strip, a token's active parents with their active children, links
to feature pages and to the node's place in the forest."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from backend.app import create_app
from backend.settings import Settings
from tests.browser.conftest import LABELLED_RUN, Server, screenshot

pytestmark = pytest.mark.browser

PROMPT = "The capital of France is Paris, and <b>Berlin</b> is not."
REAL_RUN = "live-smollm2"
WIDTH, CHILDREN, K = 32, 4, 4


@pytest.fixture(scope="module")
def real_server(lm, database_url, tmp_path_factory):
    """A server whose live endpoint loads the real model and a real checkpoint (trained a few steps here and
    indexed into the browser tests' database by `hsae index`'s own code)."""
    from backend.index.pipeline import index_checkpoint
    from trainer.config import ArchConfig, RunConfig, TrainConfig
    from trainer.index.accumulate import IndexConfig
    from trainer.sources import DataSpec
    from trainer.workflows import run_training

    root = tmp_path_factory.mktemp("real-live")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("The cat sat on the mat and looked at the dog. " * 20)
    (corpus / "b.txt").write_text("Paris is the capital of France; Berlin is the capital of Germany. " * 15)
    run_dir = root / "run"
    cfg = RunConfig(ArchConfig(arch="moe", width=WIDTH, k=K, children=CHILDREN, subspace=4),
                    TrainConfig(batch_size=128, steps=20, progress=False, device="cpu", log_every=10))
    run_training(DataSpec(layer=lm.layer, corpus=str(corpus), tokens=10_000, context_len=32, device="cpu"),
                 cfg, run_dir)
    index_checkpoint(run_dir, db_url=database_url, default_db_url=database_url, corpus=str(corpus),
                     name=REAL_RUN, device="cpu", config=IndexConfig(top_k=5))
    settings = Settings(database_url=database_url, data_dir=root, live_device="cpu")
    with Server(create_app(settings, local=True)) as server:
        yield server


def run_prompt(page, url: str, text: str = PROMPT) -> None:
    page.goto(url)
    page.fill("#prompt-text", text)
    page.click("#prompt-run")
    expect(page.locator("#token-strip .tok").first).to_be_visible(timeout=120_000)


def test_prompt_tokens_are_shaded_and_a_token_shows_its_feature_tree(page, real_server):
    run_prompt(page, f"{real_server.url}/runs/{REAL_RUN}/prompt")
    expect(page.locator("#live-info")).to_contain_text("layer 6")
    tokens = page.locator("#token-strip .tok")
    assert tokens.count() >= len(PROMPT.split())
    # The prompt shows as text: its <b> is characters of tokens, not markup, and nothing is lost or added.
    assert page.locator("#token-strip b").count() == 0
    assert page.locator("#token-strip").inner_text().replace("\n", "") == PROMPT
    backgrounds = tokens.evaluate_all("els => els.map(e => e.style.background)")
    assert all("rgba" in b for b in backgrounds)

    texts = tokens.evaluate_all("els => els.map(e => e.textContent)")
    france = texts.index(" France")
    tokens.nth(france).click()
    expect(tokens.nth(france)).to_have_class(re.compile(r"\bselected\b"))
    assert page.locator("#selected-token").text_content() == " France"
    parents = page.locator('#token-features ul.ftree > li[aria-level="1"]')
    expect(parents.first).to_be_visible()
    assert 1 <= parents.count() <= K
    # MoE: each active parent has at most one active child, and it is its own (child // CHILDREN == parent).
    with_child = None
    for i in range(parents.count()):
        parent = parents.nth(i).locator(":scope > .fnode")
        children = parents.nth(i).locator(':scope > ul > li[aria-level="2"] > .fnode')
        assert children.count() <= 1
        if children.count():
            child_index = int(children.first.get_attribute("data-index"))
            assert child_index // CHILDREN == int(parent.get_attribute("data-index"))
            with_child = with_child or children.first
    assert with_child is not None, "no active parent had an active child on ' France'"

    # Each node links to its feature page and to its path in the forest.
    index = with_child.get_attribute("data-index")
    expect(with_child.locator("a.fid")).to_have_attribute("href", f"/runs/{REAL_RUN}/features/1/{index}")
    expect(with_child.get_by_role("link", name="in forest")).to_have_attribute(
        "href", f"/runs/{REAL_RUN}?focus=1:{index}")

    # Shading by one feature: the selected token keeps its colour; the legend names the feature.
    with_child.get_by_role("button", name="shade").click()
    expect(page.locator(".shade-legend")).to_contain_text(f"L1 #{index}")
    values = tokens.evaluate_all("els => els.map(e => Number(e.dataset.value))")
    assert values[france] > 0
    screenshot(page, "prompt")

    with_child.get_by_role("link", name="in forest").click()
    expect(page).to_have_url(re.compile(rf"/runs/{REAL_RUN}\?focus=1:{index}"))
    expect(page.locator(f'.tree-row[data-level="1"][data-index="{index}"]')).to_have_class(
        re.compile(r"\bfocused\b"))


def test_arrow_keys_move_along_the_tokens(page, real_server):
    run_prompt(page, f"{real_server.url}/runs/{REAL_RUN}/prompt", "one two three")
    page.locator("#tok-0").click()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tok-1")).to_have_class(re.compile(r"\bselected\b"))
    page.keyboard.press("End")
    last = page.locator("#token-strip .tok").count() - 1
    expect(page.locator(f"#tok-{last}")).to_have_class(re.compile(r"\bselected\b"))


def test_a_run_without_checkpoint_says_live_prompts_are_unavailable(page, server):
    page.goto(f"{server.url}/runs/{LABELLED_RUN}/prompt")
    expect(page.locator("#prompt-status")).to_contain_text("live prompts are unavailable")
    expect(page.locator("#prompt-run")).to_be_disabled()
    expect(page.locator("#steer-run")).to_be_disabled()


def test_steering_panel_shows_steered_and_unsteered_continuations(page, real_server):
    prompt = "The capital of France is"
    run_prompt(page, f"{real_server.url}/runs/{REAL_RUN}/prompt", prompt)
    # A token's active feature picks itself for steering.
    node = page.locator("#token-features .fnode").first
    level, index = node.get_attribute("data-level"), node.get_attribute("data-index")
    node.get_by_role("button", name="steer").click()
    expect(page.locator("#steer-level")).to_have_value(level)
    expect(page.locator("#steer-index")).to_have_value(index)
    page.fill("#steer-tokens", "8")

    def generate(strength: str) -> tuple[str, str]:
        page.fill("#steer-strength", strength)
        page.click("#steer-run")
        expect(page.locator("#steer-steered-title")).to_contain_text(f"L{level} #{index}", timeout=60_000)
        expect(page.locator("#steer-steered-title")).to_contain_text(f"× {strength} ", timeout=60_000)
        expect(page.locator("#steer-result")).to_be_visible()
        # Each continuation shows after the prompt, as text.
        for side in ("#steer-steered", "#steer-unsteered"):
            assert page.locator(f"{side} .prompt-part").text_content() == prompt
        return (page.locator("#steer-unsteered .generated").text_content(),
                page.locator("#steer-steered .generated").text_content())

    plain, same = generate("0")
    assert plain and same == plain
    unsteered, steered = generate("40")
    assert unsteered == plain and steered != plain
    screenshot(page, "steer")

    page.seen.allowed.append("status of 404")  # the unknown feature is refused, as it should be
    page.fill("#steer-index", "99999")
    page.click("#steer-run")
    expect(page.locator("#steer-status")).to_contain_text("no feature 99999")
    expect(page.locator("#steer-status")).to_have_class(re.compile(r"\berror\b"))


def test_a_feature_page_opens_the_prompt_view_ready_to_steer_with_it(page, real_server):
    page.goto(f"{real_server.url}/runs/{REAL_RUN}/features/1/5")
    page.get_by_role("link", name="Steer with it").click()
    expect(page).to_have_url(re.compile(rf"/runs/{REAL_RUN}/prompt\?steer=1:5$"))
    expect(page.locator("#steer-level")).to_have_value("1")
    expect(page.locator("#steer-index")).to_have_value("5")

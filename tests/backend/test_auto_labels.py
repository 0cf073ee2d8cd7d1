"""Automatic labels: from the tokens a feature fires on most, written by the index writer, derived by
migration 0005 for runs indexed before it, and answered by the API next to a person's label."""

from __future__ import annotations

import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from backend.app import create_app
from backend.db.models import Feature
from backend.db.session import downgrade, make_engine, upgrade
from backend.index.labels import auto_label, display_token
from tests.backend.api_fixtures import app_settings, auth
from tests.browser.runs import LEVEL_WIDTHS, VOCAB, small_run


def test_auto_label_names_the_most_frequent_tokens_strongest_first():
    tokens = [" Paris", "Paris", " Berlin", " Rome", " Berlin", " Madrid"]
    assert auto_label(tokens) == "Paris · Berlin · Rome"
    assert auto_label([" dog", " cat"]) == "dog · cat"  # a tie: the stronger example's token first
    assert auto_label(["\n", "\n", " ", "\t"]) == "↵ · ␣ · ⇥"
    assert auto_label(["a\x00b\x07"]) == "ab"  # PostgreSQL text cannot hold NUL
    assert auto_label(["x" * 100]) == "x" * 23 + "…"
    assert len(auto_label([f"{i}" * 24 for i in range(9)])) <= 80
    assert auto_label([]) is None and auto_label(["\x00"]) is None


def _labels(engine, run_id: int, fired: bool = False) -> dict[tuple[int, int], str | None]:
    """Automatic labels by (level, index); `fired`: of the features that fired only."""
    query = select(Feature.level, Feature.idx, Feature.auto_label).where(Feature.run_id == run_id)
    if fired:
        query = query.where(Feature.fire_count > 0)
    with engine.connect() as conn:
        return {(level, idx): label for level, idx, label in conn.execute(query)}


def test_index_labels_each_feature_by_the_tokens_it_fires_on(db_url):
    """The small themed forest: a level-2 feature fires on its one token only, a level-1 feature on two."""
    engine = make_engine(db_url)
    name = f"auto-{uuid.uuid4().hex[:6]}"
    try:
        run_id = small_run(engine, name)
        labels, fired = _labels(engine, run_id), _labels(engine, run_id, fired=True)
    finally:
        engine.dispose()
    assert len(fired) > 0.8 * sum(LEVEL_WIDTHS)
    for (level, i), label in labels.items():  # a feature that never fired has no examples, and no label
        assert (label is not None) == ((level, i) in fired), (level, i)
    for level, i in fired:
        tokens = set(labels[(level, i)].split(" · "))
        if level == 2:
            assert labels[(2, i)] == display_token(VOCAB[i])
        elif level == 1:
            assert tokens <= {display_token(VOCAB[t]) for t in (2 * i, 2 * i + 1)}
        else:
            assert len(tokens) >= 2  # a root fires on its theme's six tokens

    # The API answers it next to the label, which a person's annotation fills; the automatic one stays.
    with TestClient(create_app(app_settings(db_url), local=True)) as client:
        forest = client.get(f"/api/v1/runs/{name}/forest", params={"level": 2, "limit": 3}).json()
        assert [(f["auto_label"], f["label"]) for f in forest["items"]] == [
            ("Paris", None), ("Berlin", None), ("Rome", None)]
        put = client.put(f"/api/v1/runs/{name}/features/2/1/annotation", json={"label": "German capital"},
                         headers=auth())
        assert put.status_code == 200, put.text
        feature = client.get(f"/api/v1/runs/{name}/features/2/1").json()
        assert (feature["label"], feature["auto_label"]) == ("German capital", "Berlin")


@pytest.mark.parametrize("db_backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_migration_derives_the_same_labels_for_runs_indexed_before(empty_db_url):
    upgrade(empty_db_url)
    engine = make_engine(empty_db_url)
    try:
        run_id = small_run(engine, "before-0005", n_contexts=120)
        written = _labels(engine, run_id)
        assert sum(label is not None for label in written.values()) > 100
        downgrade(empty_db_url, "0004")  # the column goes; upgrading derives it from the stored examples
        upgrade(empty_db_url)
        assert _labels(engine, run_id) == written
    finally:
        engine.dispose()

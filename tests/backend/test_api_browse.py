"""Reading endpoints, success and failure, on SQLite and PostgreSQL: runs, forest, feature, children,
examples, search, health, and the JSON error body of every 4xx."""

from __future__ import annotations

import pytest

from tests.backend.api_fixtures import RUN_NAME, WORDS, SynthRun, api_db_url, client, new_database  # noqa: F401

API = "/api/v1"
RUN = f"{API}/runs/{RUN_NAME}"
SYNTH = SynthRun()


def assert_error(response, status: int, error: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) >= {"error", "detail"} and isinstance(body["detail"], str) and body["detail"]
    if error is not None:
        assert body["error"] == error
    return body


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}


def test_runs(client):
    body = client.get(f"{API}/runs").json()
    assert body["total"] == 1 and body["offset"] == 0
    (run,) = body["items"]
    assert run["name"] == RUN_NAME and run["level_widths"] == SYNTH.level_widths and run["live"] is False
    detail = client.get(RUN).json()
    assert detail["metrics"] == {"explained_variance": 0.8} and detail["config"]["arch"] == "moe"
    assert_error(client.get(f"{API}/runs/nope"), 404, "not_found")


def test_incomplete_runs_are_invisible(client, api_db_url):
    from backend.db.models import Run
    from tests.backend.api_fixtures import make_run, session_scope

    with session_scope(api_db_url) as session:
        make_run(session, SynthRun(name="half-written"), complete=False)
    assert [r["name"] for r in client.get(f"{API}/runs").json()["items"]] == [RUN_NAME]
    assert_error(client.get(f"{API}/runs/half-written/forest"), 404)
    with session_scope(api_db_url) as session:
        session.query(Run).filter(Run.name == "half-written").delete()


def test_forest_roots_and_levels(client):
    body = client.get(f"{RUN}/forest").json()
    assert body["level"] == 0 and body["total"] == SYNTH.roots and body["sort"] == "index"
    assert [f["index"] for f in body["items"]] == list(range(SYNTH.roots))
    first = body["items"][0]
    assert (
        first["child_count"] == SYNTH.children
        and first["parent"] is None
        and first["top_tokens"][0] == WORDS[0]
    )
    assert first["label"] == "root 0" and first["tags"] == ["seed"]
    level1 = client.get(f"{RUN}/forest", params={"level": 1, "limit": 5}).json()
    assert level1["total"] == SYNTH.roots * SYNTH.children and len(level1["items"]) == 5
    assert level1["items"][1]["parent"] == {"level": 0, "index": 0, "label": "root 0"}


@pytest.mark.parametrize("sort", ["index", "density", "max_act", "child_count", "label"])
def test_forest_pages_are_stable_and_complete(client, sort):
    """Paging through any sort visits every feature exactly once (ties broken by index)."""
    seen = []
    for offset in range(0, SYNTH.roots * SYNTH.children, 7):
        page = client.get(
            f"{RUN}/forest", params={"level": 1, "sort": sort, "offset": offset, "limit": 7}
        ).json()
        seen += [f["index"] for f in page["items"]]
    assert sorted(seen) == list(range(SYNTH.roots * SYNTH.children))
    if sort == "density":
        densities = [
            f["density"]
            for f in client.get(f"{RUN}/forest", params={"level": 1, "sort": sort, "limit": 500}).json()[
                "items"
            ]
        ]
        assert densities == sorted(densities, reverse=True)


def test_sort_ties_follow_the_key_direction(client):
    roots = client.get(f"{RUN}/forest", params={"sort": "child_count"}).json()["items"]  # every root has 4
    assert [f["index"] for f in roots] == list(range(SYNTH.roots))[::-1]


def test_forest_label_sort_puts_unlabelled_last(client):
    items = client.get(f"{RUN}/forest", params={"sort": "label"}).json()["items"]
    labels = [f["label"] for f in items]
    assert labels[:6] == [f"root {i}" for i in (0, 10, 2, 4, 6, 8)] and labels[6:] == [None] * (
        SYNTH.roots - 6
    )


def test_forest_filter(client):
    body = client.get(f"{RUN}/forest", params={"q": "RIVER"}).json()  # note of root 2, top token of root 3
    assert [f["index"] for f in body["items"]] == [2, 3] and body["total"] == 2 and body["q"] == "RIVER"


@pytest.mark.parametrize(
    "params",
    [
        {"level": -1},
        {"level": "x"},
        {"limit": 0},
        {"limit": 501},
        {"offset": -1},
        {"sort": "nope"},
        {"q": "x" * 201},
        {"q": "a\x00b"},
        {"level": 10**12},
    ],
)
def test_forest_invalid_parameters(client, params):
    body = assert_error(client.get(f"{RUN}/forest", params=params), 422, "invalid_request")
    assert body["errors"] and body["errors"][0]["loc"][0] == "query"


def test_forest_unknown_level(client):
    assert "levels 0..1" in assert_error(client.get(f"{RUN}/forest", params={"level": 2}), 404)["detail"]


def test_feature_page(client):
    body = client.get(f"{RUN}/features/0/2").json()
    assert body["label"] == "root 2" and body["note"] == "a note about rivers"
    assert body["stats"]["fire_count"] == 114 and body["child_count"] == SYNTH.children
    assert [c["index"] for c in body["children"]] == [8, 9, 10, 11]
    assert body["children"][0]["edge"]["p_parent_given_child"] == 0.9
    assert body["top_positive"][0] == {"token": WORDS[2], "logit": 5.0}
    assert body["top_negative"] == [{"token": "neg0_2", "logit": -2.0}]
    assert body["histogram"] == {"edges": [0.0, 1.0, 2.0], "counts": [57, 57]}
    child = client.get(f"{RUN}/features/1/9").json()
    assert child["parent"] == {"level": 0, "index": 2, "label": "root 2"}
    assert child["parent_edge"]["decoder_cosine"] == 0.5 and child["children"] == []


@pytest.mark.parametrize("path", ["features/0/99", "features/5/0", "features/0/2147483647"])
def test_unknown_feature(client, path):
    assert_error(client.get(f"{RUN}/{path}"), 404, "not_found")
    assert_error(client.get(f"{RUN}/{path}/children"), 404)
    assert_error(client.get(f"{RUN}/{path}/examples"), 404)
    assert_error(client.get(f"{RUN}/{path}/export"), 404)
    assert_error(client.get(f"{RUN}/{path}/position"), 404)


@pytest.mark.parametrize("path", ["features/-1/0", "features/0/2147483648", "features/x/0", "features/0/1.5"])
def test_invalid_feature_address(client, path):
    assert_error(client.get(f"{RUN}/{path}"), 422, "invalid_request")


def test_children(client):
    body = client.get(f"{RUN}/features/0/1/children", params={"sort": "density", "limit": 2}).json()
    assert body["parent"] == {"level": 0, "index": 1, "label": None}
    assert body["total"] == SYNTH.children and [c["index"] for c in body["items"]] == [7, 6]
    leaf = client.get(f"{RUN}/features/1/3/children").json()
    assert leaf["total"] == 0 and leaf["items"] == [] and leaf["parent"]["index"] == 3
    past_end = client.get(f"{RUN}/features/0/1/children", params={"offset": 100}).json()
    assert past_end["items"] == [] and past_end["total"] == SYNTH.children


@pytest.mark.parametrize("sort", ["index", "density", "max_act", "child_count", "label"])
@pytest.mark.parametrize("level", [0, 1])
def test_position_is_the_offset_in_the_listings(client, level, sort):
    """Every feature's position is where the forest and its parent's children list it: ties (every root has
    four children; max_act repeats) and the dead root (all its numbers zero) included."""
    forest = client.get(f"{RUN}/forest", params={"level": level, "sort": sort, "limit": 500}).json()["items"]
    listed = [f["index"] for f in forest]
    assert len(listed) == SYNTH.level_widths[level]
    for f in forest:
        body = client.get(f"{RUN}/features/{level}/{f['index']}/position", params={"sort": sort}).json()
        assert body["feature"] == {"level": level, "index": f["index"], "label": f["label"]}
        assert body["sort"] == sort and body["forest_offset"] == listed.index(f["index"])
        if level == 0:
            assert body["children_offset"] is None
            continue
        parent = f["parent"]["index"]
        siblings = client.get(f"{RUN}/features/0/{parent}/children", params={"sort": sort}).json()["items"]
        assert body["children_offset"] == [c["index"] for c in siblings].index(f["index"])


def test_position_of_tied_and_dead_roots(client):
    dead = SYNTH.roots - 1
    for sort in ("density", "max_act"):
        body = client.get(f"{RUN}/features/0/{dead}/position", params={"sort": sort}).json()
        assert body["forest_offset"] == SYNTH.roots - 1  # zero sorts last
    tied = client.get(f"{RUN}/features/0/0/position", params={"sort": "child_count"}).json()
    assert tied["forest_offset"] == SYNTH.roots - 1  # ties go by index, descending like the key
    assert client.get(f"{RUN}/features/0/0/position").json()["forest_offset"] == 0  # default sort: index
    assert_error(client.get(f"{RUN}/features/0/0/position", params={"sort": "nope"}), 422, "invalid_request")


def test_examples(client):
    body = client.get(f"{RUN}/features/0/1/examples").json()
    kinds = [(e["kind"], e["bucket"], e["rank"]) for e in body["items"]]
    assert kinds == [("top", 0, 0), ("top", 0, 1), ("top", 0, 2), ("quantile", 1, 0), ("quantile", 0, 0)]
    first = body["items"][0]
    assert len(first["tokens"]) == len(first["values"]) == 8 and first["values"][first["max_position"]] == 2.0
    assert first["doc_id"] == "doc1" and first["tokens"][0] == "w1_0"
    only = client.get(f"{RUN}/features/0/1/examples", params={"kind": "quantile", "limit": 1}).json()
    assert only["total"] == 2 and len(only["items"]) == 1 and only["items"][0]["bucket"] == 1
    dead = client.get(f"{RUN}/features/0/{SYNTH.roots - 1}/examples").json()
    assert dead["total"] == 0 and dead["items"] == []
    assert_error(client.get(f"{RUN}/features/0/1/examples", params={"kind": "best"}), 422)


def test_search(client):
    body = client.get(f"{RUN}/search", params={"q": "river"}).json()
    assert [(f["index"], f["matched"]) for f in body["items"]] == [(2, ["note"]), (3, ["top_tokens"])]
    labels = client.get(f"{RUN}/search", params={"q": "ROOT"}).json()
    assert [f["index"] for f in labels["items"]] == [0, 2, 4, 6, 8, 10] and labels["items"][0]["matched"] == [
        "label"
    ]
    level1 = client.get(f"{RUN}/search", params={"q": "tok1_", "level": 1, "limit": 3}).json()
    assert level1["total"] == SYNTH.roots * SYNTH.children and len(level1["items"]) == 3
    assert client.get(f"{RUN}/search", params={"q": "nothing like this"}).json()["total"] == 0


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("%", [4]),
        ("_", [5]),
        ("O'Brien", [6]),
        ("' OR 1=1 --", []),
        ("DROP", [10]),
        ("'; DROP TABLE features; --", []),
        ("\\", []),
        ("naïve", [8]),
        ("日本", [9]),
        ("<b>", [7]),
        ("[a-z]*", []),
    ],
)
def test_search_metacharacters_are_text(client, q, expected):
    body = client.get(f"{RUN}/search", params={"q": q, "level": 0}).json()
    assert [f["index"] for f in body["items"]] == expected
    assert client.get(f"{RUN}/forest").json()["total"] == SYNTH.roots  # the table is still there


@pytest.mark.parametrize("params", [{}, {"q": ""}, {"q": "x" * 201}, {"q": "a", "level": -1}])
def test_search_invalid(client, params):
    assert_error(client.get(f"{RUN}/search", params=params), 422, "invalid_request")


def test_unknown_routes_and_methods_answer_json(client):
    assert_error(client.get(f"{API}/nothing"), 404, "not_found")
    assert_error(client.delete(f"{RUN}/features/0/1"), 405, "method_not_allowed")
    assert_error(client.get(f"{API}/runs/a%00b"), 422)

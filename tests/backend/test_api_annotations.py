"""Annotation writes: who may write (no token configured, wrong token, right token, local mode), what is
stored (verbatim, including markup), the history every change leaves, and request body limits."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from backend.app import create_app
from backend.db.models import AnnotationEvent
from tests.backend.api_fixtures import (  # noqa: F401
    RUN_NAME,
    WRITE_TOKEN,
    api_db_url,
    app_settings,
    auth,
    client,
    new_database,
    session_scope,
)
from tests.backend.test_api_browse import assert_error

RUN = f"/api/v1/runs/{RUN_NAME}"
XSS = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def annotation_url(level: int, index: int) -> str:
    return f"{RUN}/features/{level}/{index}/annotation"


def events(url: str, level: int, index: int) -> list[AnnotationEvent]:
    with session_scope(url) as session:
        return list(
            session.scalars(
                select(AnnotationEvent)
                .where(
                    AnnotationEvent.run_name == RUN_NAME,
                    AnnotationEvent.level == level,
                    AnnotationEvent.idx == index,
                )
                .order_by(AnnotationEvent.id)
            )
        )


def test_right_token_writes_and_records_history(client, api_db_url):
    body = {"label": "rivers", "note": "fires on river names", "tags": ["geo", "water", "geo"]}
    response = client.put(annotation_url(1, 0), json=body, headers=auth())
    assert response.status_code == 200, response.text
    saved = response.json()
    assert saved["label"] == "rivers" and saved["tags"] == ["geo", "water"] and saved["changed"] is True
    assert saved["annotated_at"] is not None
    page = client.get(f"{RUN}/features/1/0").json()
    assert (page["label"], page["note"], page["tags"]) == ("rivers", "fires on river names", ["geo", "water"])
    again = client.put(annotation_url(1, 0), json=body, headers=auth()).json()
    assert again["changed"] is False
    cleared = client.put(annotation_url(1, 0), json={}, headers=auth()).json()
    assert (cleared["label"], cleared["note"], cleared["tags"], cleared["changed"]) == (None, None, [], True)
    history = events(api_db_url, 1, 0)
    assert [(e.old_label, e.new_label) for e in history] == [(None, "rivers"), ("rivers", None)]
    assert (
        history[0].author == "token" and history[1].old_tags == ["geo", "water"] and history[1].new_tags == []
    )
    listed = client.get(f"{annotation_url(1, 0)}/history").json()
    assert listed["total"] == 2 and [e["new_label"] for e in listed["items"]] == [None, "rivers"]


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "Authorization: Bearer"),
        (auth("wrong"), "wrong write token"),
        ({"Authorization": f"Basic {WRITE_TOKEN}"}, "Authorization: Bearer"),
        ({"Authorization": "Bearer"}, "Bearer"),
    ],
)
def test_missing_or_wrong_token_is_401(client, api_db_url, headers, reason):
    response = client.put(annotation_url(1, 1), json={"label": "nope"}, headers=headers)
    body = assert_error(response, 401, "unauthorized")
    assert reason in body["detail"] and response.headers["www-authenticate"] == "Bearer"
    assert client.get(f"{RUN}/features/1/1").json()["label"] is None and events(api_db_url, 1, 1) == []


def test_auth_is_checked_before_anything_else(client):
    assert_error(client.put("/api/v1/runs/nope/features/0/0/annotation", json={}), 401)
    assert_error(client.put(annotation_url(0, 10**6), json={"label": 5}), 401)


def test_no_token_configured_refuses_writes(api_db_url):
    with TestClient(create_app(app_settings(api_db_url, write_token=None))) as client:
        body = assert_error(
            client.put(annotation_url(1, 2), json={"label": "x"}, headers=auth()), 403, "forbidden"
        )
        assert "HSAE_WRITE_TOKEN" in body["detail"] and "--local" in body["detail"]
        assert_error(client.post(f"{RUN}/import", json={}), 403)


def test_local_mode_writes_without_token(api_db_url):
    with TestClient(create_app(app_settings(api_db_url, write_token=None), local=True)) as client:
        response = client.put(annotation_url(1, 3), json={"label": "local label"})
        assert response.status_code == 200 and response.json()["label"] == "local label"
    assert [e.author for e in events(api_db_url, 1, 3)] == ["local"]


def test_script_payload_comes_back_verbatim_as_data(client):
    body = {"label": XSS, "note": f"note {XSS} & \"quotes\" 'single'", "tags": [XSS[:100]]}
    assert client.put(annotation_url(1, 4), json=body, headers=auth()).status_code == 200
    response = client.get(f"{RUN}/features/1/4")
    assert response.headers["content-type"] == "application/json"
    page = response.json()
    assert (page["label"], page["note"], page["tags"]) == (body["label"], body["note"], body["tags"])
    hits = client.get(f"{RUN}/search", params={"q": "<script>"}).json()["items"]
    assert [(h["level"], h["index"], h["label"]) for h in hits] == [(1, 4, XSS)]
    exported = client.get(f"{RUN}/features/1/4/export").json()
    assert exported["root"]["label"] == XSS


def test_unknown_feature_or_run_with_token(client):
    assert_error(client.put(annotation_url(0, 999), json={"label": "x"}, headers=auth()), 404, "not_found")
    assert_error(client.put(annotation_url(7, 0), json={"label": "x"}, headers=auth()), 404)
    assert_error(client.put("/api/v1/runs/nope/features/0/0/annotation", json={}, headers=auth()), 404)
    assert_error(client.get("/api/v1/runs/nope/features/0/0/annotation/history"), 404)
    assert_error(client.get(f"{annotation_url(0, 999)}/history"), 404)


@pytest.mark.parametrize(
    "body",
    [
        {"label": "x" * 501},
        {"note": "n" * 20_001},
        {"tags": ["t"] * 51},
        {"tags": ["x" * 101]},
        {"tags": [""]},
        {"label": "a\x00b"},
        {"tags": "geo"},
        {"label": 5},
        {"colour": "red"},
        [],
        "text",
        None,
    ],
)
def test_invalid_annotation_is_422(client, body):
    response = client.put(annotation_url(1, 5), json=body, headers=auth())
    assert_error(response, 422, "invalid_request")


def test_malformed_json_is_422(client):
    for content in (b"{", b'{"label": "\\ud800"}', b"\xff\xfe", b"{" * 100_000):
        response = client.put(
            annotation_url(1, 5), content=content, headers={**auth(), "Content-Type": "application/json"}
        )
        assert response.status_code in (400, 422), response.text
        assert set(response.json()) >= {"error", "detail"}


def test_oversized_bodies_are_refused_before_reading(client):
    big = b'{"label": "' + b"x" * (2 << 20) + b'"}'
    response = client.put(
        annotation_url(1, 5), content=big, headers={**auth(), "Content-Type": "application/json"}
    )
    assert_error(response, 413, "too_large")

    def streamed():  # no Content-Length: the limit applies to what arrives
        yield b'{"label": "'
        for _ in range(64):
            yield b"x" * 65536
        yield b'"}'

    response = client.put(
        annotation_url(1, 5), content=streamed(), headers={**auth(), "Content-Type": "application/json"}
    )
    assert_error(response, 413, "too_large")
    assert client.get(f"{RUN}/features/1/5").json()["label"] is None


def test_oversized_prompt_body_is_refused(client):
    response = client.post(f"{RUN}/activations", json={"text": "x" * (2 << 20)})
    assert_error(response, 413, "too_large")

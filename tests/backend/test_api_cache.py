"""Answers about a run are cached and carry ETags: a client holding the current one gets 304; an annotation
change (through this app, another worker, or the import) shows on the very next request; and the server
turns Nagle's algorithm off on every connection, also on sockets that uvicorn's workers bind themselves."""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvicorn
from fastapi.testclient import TestClient
from uvicorn.protocols.http.h11_impl import H11Protocol

from backend.api.cache import AnswerCache
from backend.app import create_app
from backend.http_protocol import NoDelayH11Protocol
from tests.backend.api_fixtures import (  # noqa: F401
    RUN_NAME,
    WRITE_TOKEN,
    api_db_url,
    app_settings,
    auth,
    client,
    new_database,
)

RUN = f"/api/v1/runs/{RUN_NAME}"
CACHED = [
    RUN,
    f"{RUN}/forest?level=1&sort=label",
    f"{RUN}/features/0/2",
    f"{RUN}/features/0/2/children",
    f"{RUN}/features/1/9/examples?limit=2",
    f"{RUN}/features/1/9/position",
    f"{RUN}/search?q=tok1_9",
]


@pytest.mark.parametrize("path", CACHED)
def test_an_etag_answers_304_until_the_answer_changes(client, path):
    first = client.get(path)
    assert first.status_code == 200, first.text
    etag = first.headers["etag"]
    assert etag.startswith('"') and first.headers["cache-control"] == "no-cache"
    again = client.get(path)  # from the cache: the same bytes, the same tag
    assert (again.status_code, again.content, again.headers["etag"]) == (200, first.content, etag)
    for held in (etag, f"W/{etag}", f'"other", {etag}'):
        not_modified = client.get(path, headers={"If-None-Match": held})
        assert not_modified.status_code == 304 and not_modified.content == b""
        assert not_modified.headers["etag"] == etag
    for other in ('"stale"', "*"):
        assert client.get(path, headers={"If-None-Match": other}).status_code == 200


def test_answers_differ_by_query_and_errors_are_not_tagged(client):
    tags = {client.get(f"{RUN}/forest?level=1&offset={o}").headers["etag"] for o in (0, 1, 2)}
    assert len(tags) == 3
    missing = client.get(f"{RUN}/features/0/999", headers={"If-None-Match": "*"})
    assert missing.status_code == 404 and "etag" not in missing.headers
    assert client.get("/api/v1/runs/nope/features/0/1").status_code == 404


def test_an_annotation_shows_at_once_in_every_cached_answer(api_db_url):
    """Two apps on one database stand for two server processes, each with its own cache: B's cached pages
    change on the request right after A's write, and a client's old ETag no longer matches."""
    pages = {
        "feature": f"{RUN}/features/1/21",
        "parent": f"{RUN}/features/0/5",
        "children": f"{RUN}/features/0/5/children",
        "forest": f"{RUN}/forest?level=1&offset=20&limit=2",
        "search": f"{RUN}/search?q=ziggurat",
    }
    settings = app_settings(api_db_url, write_token=WRITE_TOKEN)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        before = {name: b.get(path) for name, path in pages.items()}
        assert before["search"].json()["total"] == 0
        assert b.app.state.answers.get(before["feature"].headers["etag"]) is not None  # kept
        put = a.put(f"{pages['feature']}/annotation", json={"label": "ziggurat"}, headers=auth())
        assert put.status_code == 200 and put.json()["changed"] is True
        after = {
            name: b.get(path, headers={"If-None-Match": before[name].headers["etag"]})
            for name, path in pages.items()
        }
        assert all(r.status_code == 200 for r in after.values()), {n: r.status_code for n, r in after.items()}
        assert after["feature"].json()["label"] == "ziggurat"
        assert [c["label"] for c in after["children"].json()["items"] if c["index"] == 21] == ["ziggurat"]
        assert [f["label"] for f in after["forest"].json()["items"] if f["index"] == 21] == ["ziggurat"]
        assert [(f["level"], f["index"]) for f in after["search"].json()["items"]] == [(1, 21)]
        # The same write again changes nothing: the tags stay valid.
        a.put(f"{pages['feature']}/annotation", json={"label": "ziggurat"}, headers=auth())
        etag = after["feature"].headers["etag"]
        assert b.get(pages["feature"], headers={"If-None-Match": etag}).status_code == 304
        a.put(f"{pages['feature']}/annotation", json={}, headers=auth())  # leave the shared run as it was


def test_the_cache_is_bounded_least_recently_used_out_first():
    cache = AnswerCache(max_bytes=800)
    for key in "abcdefgh":
        cache.put(key, b"x" * 100)
    assert cache.bytes == 800
    assert cache.get("a") is not None  # now the most recently used
    cache.put("i", b"y" * 100)
    assert cache.get("b") is None and cache.get("a") is not None and cache.bytes == 800
    cache.put("huge", b"z" * 101)  # over an eighth of the budget: not kept
    assert cache.get("huge") is None
    off = AnswerCache(max_bytes=0)
    off.put("a", b"")
    assert off.get("a") is None or off.bytes == 0


async def _nodelay_of(protocol_class: type) -> tuple[int, int]:
    """(the bound socket's proto, TCP_NODELAY of the server side of a connection accepted on it), the socket
    bound as uvicorn's workers bind theirs (`Config.bind_socket`; up to uvicorn 0.54 with proto 0, where
    asyncio leaves Nagle on; 0.55 binds with IPPROTO_TCP)."""
    config = uvicorn.Config(create_app, factory=True, host="127.0.0.1", port=0, http=protocol_class,
                            log_level="warning", lifespan="off")
    sock = config.bind_socket()
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        while not server.server_state.connections:
            await asyncio.sleep(0.01)
        (connection,) = server.server_state.connections
        server_side = connection.transport.get_extra_info("socket")
        value = server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.close()
        return sock.proto, value
    finally:
        server.should_exit = True
        await serving
        sock.close()


def test_the_server_turns_nagle_off_on_sockets_it_did_not_bind(monkeypatch, tmp_path):
    monkeypatch.setenv("HSAE_DATABASE_URL", f"sqlite:///{tmp_path / 'unused.db'}")
    proto, plain = asyncio.run(_nodelay_of(H11Protocol))
    if proto == 0:  # uvicorn < 0.55 binds with proto 0: what `--workers 2` served with, Nagle on
        assert plain == 0
    assert asyncio.run(_nodelay_of(NoDelayH11Protocol))[1] != 0  # on whatever socket uvicorn binds

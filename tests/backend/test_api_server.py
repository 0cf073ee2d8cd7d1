"""The API behind a real uvicorn server: bodies refused while they stream in, and `serve`'s own checks."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn

from backend.app import create_app
from backend.db.session import SchemaVersionError
from backend.server import serve
from tests.backend.api_fixtures import RUN_NAME, WRITE_TOKEN, api_db_url, app_settings, new_database  # noqa: F401
from trainer.errors import HSAEError


@pytest.fixture()
def server(api_db_url):
    app = create_app(app_settings(api_db_url, write_token=WRITE_TOKEN))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    instance = uvicorn.Server(config)
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not instance.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    port = instance.servers[0].sockets[0].getsockname()[1]
    yield port
    instance.should_exit = True
    thread.join(10)


def request_head(port: int, extra: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        f"PUT /api/v1/runs/{RUN_NAME}/features/1/6/annotation HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {WRITE_TOKEN}\r\nContent-Type: application/json\r\n{extra}\r\n".encode()
    )
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body[: _length(data)])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def test_declared_length_over_the_limit_is_refused_unread(server):
    sock = request_head(server, "Content-Length: 1000000000\r\n")  # not one body byte is sent
    status, body = read_response(sock)
    assert status == 413 and body["error"] == "too_large"


def test_streamed_body_is_cut_off_at_the_limit(server):
    sock = request_head(server, "Transfer-Encoding: chunked\r\n")
    sent, chunk = 0, b"x" * 65536
    try:
        for _ in range(256):  # 16 MiB offered; the limit is 1 MiB
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            sock.settimeout(0.001)
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except (TimeoutError, BlockingIOError):
                pass
            finally:
                sock.settimeout(10)
    except (BrokenPipeError, ConnectionResetError):
        pass
    status, body = read_response(sock)
    assert status == 413 and body["error"] == "too_large"
    assert sent < 8 << 20, f"the server read {sent} bytes before refusing"


def test_serve_checks_before_starting(tmp_path):
    with pytest.raises(HSAEError, match="--local serves on 127.0.0.1 only"):
        serve(db_url="sqlite:///unused.db", host="0.0.0.0", local=True)
    with pytest.raises(SchemaVersionError, match="hsae db upgrade"):
        serve(db_url=f"sqlite:///{tmp_path / 'empty.db'}")

"""uvicorn's HTTP/1.1 protocol with Nagle's algorithm off on every connection.

asyncio turns TCP_NODELAY on for a connection only when the listening socket was made with proto=IPPROTO_TCP.
uvicorn's single process listens through `loop.create_server(host, port)` (proto 6: on), but with
`--workers N` it binds `socket.socket(family)` itself (proto 0), and asyncio then leaves Nagle on. h11 writes
a response's head and body in two sends; the body waited for the ACK of the head, which the client's delayed
ACK held back ~40 ms: one client saw 48-52 ms per request with 2 workers against 9-11 ms with 1.
Use it as `uvicorn --http backend.http_protocol:NoDelayH11Protocol` (`hsae serve` does)."""

from __future__ import annotations

import asyncio
import socket

from uvicorn.protocols.http.h11_impl import H11Protocol

IMPORT_STRING = "backend.http_protocol:NoDelayH11Protocol"


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the peer already went away
            pass


class NoDelayH11Protocol(H11Protocol):
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        set_nodelay(transport)
        super().connection_made(transport)

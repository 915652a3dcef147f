"""The simulated kubelet's SPDY/3.1 upgrades, in front of its aiohttp application.

aiohttp only switches protocols for WebSocket, so each connection to the simulated kubelet's port first reaches
:class:`UpgradeFront`, which reads the request head (at most :data:`MAX_HEAD` bytes) and then either

* serves an ``Upgrade: SPDY/3.1`` request to an exec/attach/port-forward URL itself, as the kubelet's streaming
  server does: the handshake (:func:`handshake`: ``X-Stream-Protocol-Version`` required, 400 without it; the first
  version the client offers that the subresource accepts, else 403 listing the accepted ones in
  ``X-Accepted-Stream-Protocol-Versions``), ``101 Switching Protocols`` naming the version, then a SPDY session
  (:mod:`proxy.spdy`) served by :mod:`tunneld.dev.spdyserve`; or
* hands the connection, with the bytes read so far, to aiohttp's request handler (everything else, including
  WebSocket upgrades and keep-alive requests that follow on the same connection).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import h11

from proxy.dialer import TCPStream
from proxy.spdy import Session, SPDYStream

log = logging.getLogger("tunneld.dev.kubelet")

MAX_HEAD = 64 * 1024
Runner = Callable[[Session, "asyncio.Queue[SPDYStream | None]"], Awaitable[None]]


@dataclass(frozen=True)
class SPDYRoute:
    """How to serve one SPDY upgrade: the versions its subresource accepts, and what runs on the session."""

    protocols: tuple[str, ...]
    run: Runner


@dataclass(frozen=True)
class Refusal:
    """An HTTP answer instead of an upgrade (bad query, unknown pod...)."""

    status: int
    message: str


Router = Callable[[h11.Request], "SPDYRoute | Refusal | None"]


def spdy_versions(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """The ``X-Stream-Protocol-Version`` values offered, in order (repeated headers and comma lists)."""
    return [
        v.strip() for name, value in headers if name == b"x-stream-protocol-version"
        for v in value.decode("latin-1").split(",") if v.strip()
    ]


def is_spdy_upgrade(headers: list[tuple[bytes, bytes]]) -> bool:
    """``Connection: Upgrade`` and ``Upgrade: SPDY/...``."""
    connection = {t.strip().lower() for n, v in headers if n == b"connection" for t in v.split(b",")}
    upgrade = [v for n, v in headers if n == b"upgrade"]
    return b"upgrade" in connection and any(v.strip().lower().startswith(b"spdy/") for v in upgrade)


def handshake(offered: list[str], supported: tuple[str, ...]) -> str | Refusal:
    """The negotiated version (client's order), or the kubelet's refusal."""
    if not offered:
        return Refusal(400, "unable to upgrade: X-Stream-Protocol-Version is required")
    chosen = next((v for v in offered if v in supported), None)
    if chosen is None:
        return Refusal(403, f"unable to upgrade: unable to negotiate protocol: client supports {offered}, "
                            f"server accepts {list(supported)}")
    return chosen


def _answer(transport: asyncio.Transport, refusal: Refusal, supported: tuple[str, ...] = ()) -> None:
    body = (refusal.message + "\n").encode()
    accepted = b"".join(b"X-Accepted-Stream-Protocol-Versions: " + v.encode() + b"\r\n" for v in supported)
    reason = {400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found"}.get(refusal.status, b"Error")
    transport.write(b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%s"
                    b"Connection: close\r\n\r\n%s" % (refusal.status, reason, len(body), accepted, body))
    transport.close()


class UpgradeFront(asyncio.Protocol):
    """Per connection: a SPDY session, or a hand-over to ``handler_factory`` (aiohttp's ``web.Server``)."""

    def __init__(self, handler_factory: Callable[[], asyncio.Protocol], router: Router,
                 active: set[asyncio.Task[None]]) -> None:
        self._factory = handler_factory
        self._router = router
        self._active = active
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 and len(self._buffer) < MAX_HEAD:
            return
        if end >= 0 and self._upgrade(bytes(self._buffer[: end + 4]), bytes(self._buffer[end + 4:])):
            return
        self._hand_over()

    def eof_received(self) -> bool:
        if self._transport is not None:
            self._transport.close()
        return False

    def _upgrade(self, head: bytes, leftover: bytes) -> bool:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(head)
        try:
            request = conn.next_event()
        except h11.RemoteProtocolError:
            return False
        if not isinstance(request, h11.Request) or not is_spdy_upgrade(list(request.headers)):
            return False
        route = self._router(request)
        if route is None:
            return False
        assert self._transport is not None
        if isinstance(route, Refusal):
            _answer(self._transport, route)
            return True
        chosen = handshake(spdy_versions(list(request.headers)), route.protocols)
        if isinstance(chosen, Refusal):
            _answer(self._transport, chosen, route.protocols if chosen.status == 403 else ())
            return True
        self._transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            b"X-Stream-Protocol-Version: " + chosen.encode() + b"\r\n\r\n"
        )
        task = asyncio.get_running_loop().create_task(self._serve(route, leftover))
        self._active.add(task)
        task.add_done_callback(self._active.discard)
        return True

    async def _serve(self, route: SPDYRoute, leftover: bytes) -> None:
        assert self._transport is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_HEAD)
        protocol = asyncio.StreamReaderProtocol(reader)
        self._transport.set_protocol(protocol)
        protocol.connection_made(self._transport)
        writer = asyncio.StreamWriter(self._transport, protocol, reader, loop)
        incoming: asyncio.Queue[SPDYStream | None] = asyncio.Queue()
        session = Session(TCPStream(reader, writer), client=False, on_stream=incoming.put_nowait, leftover=leftover)

        async def end_marker() -> None:
            await session.closed.wait()
            incoming.put_nowait(None)

        marker = asyncio.create_task(end_marker())
        try:
            await route.run(session, incoming)
        except Exception:
            log.exception("SPDY session failed")
        finally:
            marker.cancel()
            await session.close()

    def _hand_over(self) -> None:
        assert self._transport is not None
        handler = self._factory()
        self._transport.set_protocol(handler)
        handler.connection_made(self._transport)
        handler.data_received(bytes(self._buffer))
        self._buffer.clear()

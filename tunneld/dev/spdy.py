"""A stand-in for the kubelet's SPDY/3.1 streams, in front of the simulated kubelet's aiohttp application.

aiohttp only switches protocols for WebSocket, so each connection to the simulated kubelet's port first reaches
:class:`UpgradeFront`, which reads the request head (at most :data:`MAX_HEAD` bytes) and then either

* answers an ``Upgrade: SPDY/3.1`` request (with ``X-Stream-Protocol-Version``) to a known exec/attach/port-forward
  target itself: ``101 Switching Protocols`` with ``Connection: Upgrade``, ``Upgrade: SPDY/3.1`` and
  ``X-Stream-Protocol-Version`` set to the first offered version, after which it echoes every byte back until the
  client's EOF; or
* hands the connection, with the bytes read so far, to aiohttp's request handler (everything else, including
  WebSocket upgrades and keep-alive requests that follow on the same connection).

This is NOT SPDY: there is no SPDY framing, no streams, no headers compression. It exists to prove that a gateway
passes a SPDY upgrade request through, relays the ``101`` and then splices bytes both ways, byte for byte. Exec
semantics (commands, status) are only implemented over WebSocket (see :mod:`tunneld.dev.channels`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

import h11

log = logging.getLogger("tunneld.dev.kubelet")

MAX_HEAD = 64 * 1024


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


class _Echo(asyncio.Protocol):
    """After the 101: every byte back to the sender, pausing reads while the sender is not reading."""

    def __init__(self, transport: asyncio.Transport, leftover: bytes, active: set[asyncio.Transport]) -> None:
        self.transport = transport
        self.active = active
        active.add(transport)
        transport.set_protocol(self)
        if leftover:
            transport.write(leftover)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        if self.transport.can_write_eof():
            self.transport.write_eof()
            return True  # keep the read side closed and let the write side drain
        return False

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.active.discard(self.transport)


class UpgradeFront(asyncio.Protocol):
    """Per connection: the SPDY stand-in, or a hand-over to ``handler_factory`` (aiohttp's ``web.Server``)."""

    def __init__(
        self, handler_factory: Callable[[], asyncio.Protocol], accepts: Callable[[str, str], bool],
        active: set[asyncio.Transport],
    ) -> None:
        self._factory = handler_factory
        self._accepts = accepts
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
        if end >= 0 and self._switch_to_echo(bytes(self._buffer[: end + 4]), bytes(self._buffer[end + 4:])):
            return
        self._hand_over()

    def eof_received(self) -> bool:
        if self._transport is not None:
            self._transport.close()
        return False

    def _switch_to_echo(self, head: bytes, leftover: bytes) -> bool:
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(head)
        try:
            request = conn.next_event()
        except h11.RemoteProtocolError:
            return False
        if not isinstance(request, h11.Request):
            return False
        headers = list(request.headers)
        versions = spdy_versions(headers)
        target = request.target.decode("latin-1")
        if not (is_spdy_upgrade(headers) and versions and self._accepts(request.method.decode(), target)):
            return False
        assert self._transport is not None
        self._transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            b"X-Stream-Protocol-Version: " + versions[0].encode("latin-1") + b"\r\n\r\n"
        )
        log.debug("SPDY stand-in: echoing for %s", target)
        _Echo(self._transport, leftover, self._active)
        return True

    def _hand_over(self) -> None:
        assert self._transport is not None
        handler = self._factory()
        self._transport.set_protocol(handler)
        handler.connection_made(self._transport)
        handler.data_received(bytes(self._buffer))
        self._buffer.clear()

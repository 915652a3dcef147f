"""Copying bytes both ways between a client connection and a :class:`~proxy.dialer.Stream`.

Each direction is its own loop that reads a bounded chunk and waits for the other side to accept it (``drain`` on
the client, the SSH channel window on the stream), so a slow reader on either end stops the copy instead of making
the gateway buffer.

How a splice ends depends on what it carries:

- A CONNECT tunnel (``upgraded=False``) is a TCP connection: an end of data on one side is passed on as a half-close
  on the other, and the splice ends when both directions have ended. A TLS client connection cannot be half-closed
  (asyncio's TLS transport has no ``write_eof``): there the stream's end of data ends the connection as a whole.
- An upgraded HTTP connection (``upgraded=True``: WebSocket, SPDY) ends as a whole, as kube-apiserver's upgrade-aware
  proxy ends it: when either side ends or fails, the other is ended too (the upstream with TLS ``close_notify`` and
  a channel close), so a client that vanishes never leaves an exec session running on the node.

A broken stream never looks complete: when the stream side fails (the tunnel dropped, the channel failed or closed
without the node's end of data) or the stream outlives ``limits.stream_idle_timeout`` / ``stream_max_lifetime``, a
TCP client gets a reset (``SO_LINGER`` 0: ``transport.abort()`` alone sends a FIN under asyncio and uvloop alike), not
an end of data. A unix-socket client has no reset: its connection is closed, and only its own framing tells it the
stream was cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from dataclasses import dataclass, field

from proxy.dialer import Stream, StreamError

log = logging.getLogger("proxy.splice")
audit = logging.getLogger("proxy.audit")

CHUNK = 64 * 1024
"""One read from either side: what the gateway holds for a stream besides the SSH channel's window."""


@dataclass(frozen=True)
class StreamLimits:
    """Bounds on one spliced stream, in seconds; 0 turns a bound off."""

    idle_timeout: float = 14400.0
    """No byte in either direction for this long: the stream is ended as broken."""
    max_lifetime: float = 0.0
    """The stream is ended as broken this long after it started, busy or not."""


@dataclass
class SpliceResult:
    """Bytes moved, and whether a side broke (as opposed to both ending cleanly)."""

    upstream_bytes: int = 0
    downstream_bytes: int = 0
    broken: str | None = None
    last_activity: float = field(default_factory=time.monotonic)


def reset(writer: asyncio.StreamWriter) -> None:
    """Drop the client connection so that a TCP client sees a reset (ECONNRESET), not an end of data.

    ``transport.abort()`` alone closes the socket with a FIN; ``SO_LINGER`` with a zero timeout makes the close a RST.
    A unix socket has no reset: it is simply closed.
    """
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: Stream,
    *,
    to_stream: bytes = b"",
    to_client: bytes = b"",
    upgraded: bool = False,
    limits: StreamLimits | None = None,
    peer: str = "",
    target: str = "",
) -> SpliceResult:
    """Copy ``reader`` -> ``stream`` and ``stream`` -> ``writer`` until the splice ends (see the module docstring).

    ``to_stream`` / ``to_client`` are bytes already read past a protocol switch that must go first.
    Always closes ``stream``; resets ``writer`` if the stream broke or expired, otherwise leaves closing it to the
    caller. ``peer`` and ``target`` name the stream in the audit line of an expiry.
    """
    limits = limits or StreamLimits()
    result = SpliceResult()
    half_closed: set[str] = set()

    async def up() -> None:
        if to_stream:
            await stream.write(to_stream)
            result.upstream_bytes += len(to_stream)
        while True:
            try:
                data = await reader.read(CHUNK)
            except (ConnectionError, OSError) as exc:
                raise _ClientBroke(str(exc) or type(exc).__name__) from exc
            if not data:
                break
            result.last_activity = time.monotonic()
            await stream.write(data)
            result.upstream_bytes += len(data)
        if not upgraded:
            await stream.write_eof()

    async def down() -> None:
        if writer.get_extra_info("sslcontext") is None:
            # drain() returns only once the transport has handed everything to the kernel: what the gateway holds for
            # a client that does not read is one read, besides what the stream holds (an SSH channel: its window).
            # (Not under TLS: asyncio's TLS transport would never resume writing at a zero low-water mark.)
            writer.transport.set_write_buffer_limits(high=0)
        if to_client:
            writer.write(to_client)
            result.downstream_bytes += len(to_client)
        while data := await stream.read(CHUNK):
            result.last_activity = time.monotonic()
            writer.write(data)
            result.downstream_bytes += len(data)
            del data  # held by the transport until sent; not here as well while waiting
            try:
                await writer.drain()
            except (ConnectionError, OSError) as exc:
                raise _ClientBroke(str(exc) or type(exc).__name__) from exc
        if not upgraded and writer.can_write_eof() and not writer.is_closing():
            with contextlib.suppress(OSError):
                writer.write_eof()
                half_closed.add("client")

    started = time.monotonic()
    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending:
            expired = _expired(limits, started, result.last_activity)
            if expired is not None:
                result.broken = expired
                audit.warning("stream ended: %s", expired, extra={"peer": peer, "target": target,
                                                                  "up": result.upstream_bytes,
                                                                  "down": result.downstream_bytes})
                reset(writer)
                break
            done, pending = await asyncio.wait(pending, timeout=_next_check(limits, started, result.last_activity),
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None and not upgraded and (task is tasks[0] or "client" in half_closed):
                    continue  # one direction ended cleanly: the other goes on (half-close)
                if exc is not None:
                    result.broken = str(exc) or type(exc).__name__
                    if isinstance(exc, StreamError):
                        reset(writer)  # the tunnel side broke: the client must see a reset, not an end
                    elif not isinstance(exc, _ClientBroke):
                        raise exc
                pending = set()  # an upgraded connection ends as a whole; a broken side ends the splice
                break
    finally:
        for task in tasks:
            task.cancel()
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:  # also when the splice itself is cancelled while it waits: the stream is always closed
            with contextlib.suppress(StreamError):
                await stream.close()
    return result


def _expired(limits: StreamLimits, started: float, last_activity: float) -> str | None:
    now = time.monotonic()
    if limits.max_lifetime > 0 and now - started >= limits.max_lifetime:
        return f"open for {limits.max_lifetime:g}s (limits.stream_max_lifetime)"
    if limits.idle_timeout > 0 and now - last_activity >= limits.idle_timeout:
        return f"idle for {limits.idle_timeout:g}s (limits.stream_idle_timeout)"
    return None


def _next_check(limits: StreamLimits, started: float, last_activity: float) -> float | None:
    """Seconds until a bound could next expire (None: no bound)."""
    deadlines = []
    if limits.max_lifetime > 0:
        deadlines.append(started + limits.max_lifetime)
    if limits.idle_timeout > 0:
        deadlines.append(last_activity + limits.idle_timeout)
    if not deadlines:
        return None
    return max(0.0, min(deadlines) - time.monotonic()) + 0.01


class _ClientBroke(Exception):
    """The client side of a splice failed."""

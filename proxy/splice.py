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
import time

from proxy.dialer import Stream, StreamError
from proxy.fastsplice import splice_in_callbacks, takeover_possible
from proxy.spliceends import SPLICES, SpliceResult, StreamLimits, audit_expiry, expired, next_check, reset

__all__ = ["CHUNK", "SPLICES", "SpliceResult", "StreamLimits", "reset", "splice"]

CHUNK = 64 * 1024
"""One read from either side: what the gateway holds for a stream besides the SSH channel's window."""


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

    A stream with a callback mode (an SSH channel) and a plain client connection are spliced in callbacks
    (:mod:`proxy.fastsplice`); anything else (TLS, SPDY or TCP streams, TLS clients) by a task per direction.
    """
    limits = limits or StreamLimits()
    written = 0  # to_client bytes already written by a callback splice that found no callback mode
    if takeover_possible(reader, writer, stream):
        fast = await splice_in_callbacks(reader, writer, stream, to_stream=to_stream, to_client=to_client,
                                         upgraded=upgraded, limits=limits, peer=peer, target=target)
        if fast is not None:
            return fast
        written, to_client = len(to_client), b""
    SPLICES["tasks"] += 1
    result = SpliceResult(downstream_bytes=written)
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
            why = expired(limits, started, result.last_activity)
            if why is not None:
                result.broken = why
                audit_expiry(why, result, peer, target)
                reset(writer)
                break
            done, pending = await asyncio.wait(pending, timeout=next_check(limits, started, result.last_activity),
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


class _ClientBroke(Exception):
    """The client side of a splice failed."""

"""Copying bytes both ways between a client connection and a :class:`~proxy.dialer.Stream`.

Each direction is its own loop that reads a bounded chunk and waits for the other side to accept it (``drain`` on
the client, the SSH channel window on the stream), so a slow reader on either end stops the copy instead of making
the gateway buffer: memory per spliced connection is bounded by the read size plus the transports' high-water marks.
An end of data on one side is passed on as a half-close on the other; a broken side aborts the other, so a client
never mistakes a dropped tunnel for a clean end of data.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from proxy.dialer import Stream, StreamError

CHUNK = 256 * 1024


@dataclass
class SpliceResult:
    """Bytes moved, and whether a side broke (as opposed to both ending cleanly)."""

    upstream_bytes: int = 0
    downstream_bytes: int = 0
    broken: str | None = None


async def splice(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: Stream,
    *,
    to_stream: bytes = b"",
    to_client: bytes = b"",
    until_client_ends: bool = False,
) -> SpliceResult:
    """Copy ``reader`` -> ``stream`` and ``stream`` -> ``writer`` until both directions end.

    ``to_stream`` / ``to_client`` are bytes already read past a protocol switch that must go first.
    Closes ``stream``; aborts ``writer`` if the stream broke, otherwise leaves closing it to the caller.
    With ``until_client_ends`` the splice ends as soon as the client's end of data has been passed on: for upgraded
    sessions (SPDY, WebSocket) whose clients never half-close, over streams that cannot half-close (TLS), as the
    apiserver's upgrade proxy ends with either side.
    """
    result = SpliceResult()

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
            await stream.write(data)
            result.upstream_bytes += len(data)
        stream.write_eof()

    async def down() -> None:
        if to_client:
            writer.write(to_client)
            result.downstream_bytes += len(to_client)
        while data := await stream.read(CHUNK):
            writer.write(data)
            result.downstream_bytes += len(data)
            try:
                await writer.drain()
            except (ConnectionError, OSError) as exc:
                raise _ClientBroke(str(exc) or type(exc).__name__) from exc
        if writer.can_write_eof() and not writer.is_closing():
            with contextlib.suppress(OSError):
                writer.write_eof()

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        pending: set[asyncio.Task[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None:
                    if until_client_ends and task is tasks[0]:
                        pending = set()  # the finally below cancels the other direction
                    continue
                result.broken = str(exc) or type(exc).__name__
                if isinstance(exc, StreamError):
                    writer.transport.abort()  # the tunnel side broke: the client must see a reset, not an end
                for other in pending:
                    other.cancel()
                for other in pending:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await other
                pending = set()
                if not isinstance(exc, StreamError | _ClientBroke):
                    raise exc
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await stream.close()
    return result


class _ClientBroke(Exception):
    """The client side of a splice failed."""

"""The contract between the fronts and whatever carries their bytes.

A front asks a :class:`Dialer` for a :class:`Stream` to ``host:port``. The gateway's dialer opens an SSH
``direct-tcpip`` channel through a node's tunnel; tests may hand in :class:`TCPDialer`, which connects directly.
Failures are :class:`DialError` subclasses (in the tree of :mod:`proxy.errors`) carrying the HTTP status and a
one-line message a front answers with; a stream that breaks in use raises :class:`~proxy.errors.StreamError`.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, runtime_checkable

from netnames import normalize_host
from proxy.errors import ProxyError, StreamError

__all__ = [
    "Attached", "ChannelRefused", "DestinationNotAllowed", "DialError", "DialTimeout", "Dialer", "NoTunnel",
    "Overloaded", "Stream", "StreamError", "StreamSink", "TCPDialer", "TCPStream", "TunnelDown", "TunnelUnavailable",
    "attach",
]

class DialError(ProxyError):
    """A dial failed. ``status`` is the HTTP status a front answers with."""

    status = 502


class DestinationNotAllowed(DialError):
    """The destination is outside the configured policy."""

    status = 403


class NoTunnel(DialError):
    """No node owns the destination, and no healthy tunnel may carry it."""

    status = 503


class TunnelDown(DialError):
    """The owning node's tunnel is not connected."""

    status = 502


class TunnelUnavailable(TunnelDown):
    """The owning node's tunnel is down and being re-established (node unreachable, sshd gone): retry later.

    Distinct from a plain :class:`TunnelDown` (502), which is kept for a node the gateway refuses to trust or log in
    to: retrying that does not help.
    """

    status = 503


class ChannelRefused(DialError):
    """The node's sshd refused to open the forwarded channel."""

    status = 502


class Overloaded(DialError):
    """A limit was reached (channels per tunnel); retry later."""

    status = 503


class DialTimeout(DialError):
    """Opening the channel took longer than the dial timeout."""

    status = 504


@runtime_checkable
class Stream(Protocol):
    """A bidirectional byte stream with half-close."""

    async def read(self, n: int = 65536) -> bytes:
        """Up to ``n`` bytes; ``b""`` at the peer's end of data. Raises :class:`StreamError` if the stream broke."""
        ...

    async def write(self, data: bytes) -> None:
        """Send ``data``, waiting while the peer is not reading (backpressure)."""
        ...

    async def write_eof(self) -> None:
        """Half-close: no more data will be written (a TLS stream sends ``close_notify``)."""
        ...

    async def close(self) -> None:
        """Close both directions and release the stream."""
        ...


class StreamSink(Protocol):
    """What a stream in callback mode (:func:`attach`) calls as things happen on its side, never awaiting."""

    def stream_data(self, data: bytes) -> None:
        """The peer's bytes. The sink calls :meth:`Attached.passed` once it has passed them on."""
        ...

    def stream_eof(self) -> None:
        """The peer's clean end of data."""
        ...

    def stream_broke(self, error: StreamError) -> None:
        """The stream broke: never to be passed on as a clean end."""
        ...

    def stream_pause(self) -> None:
        """The stream takes no more for now: stop sending until :meth:`stream_resume`."""
        ...

    def stream_resume(self) -> None:
        """The stream takes more again."""
        ...


class Attached(Protocol):
    """A stream in callback mode: the sending side, none of it waiting."""

    def send(self, data: bytes) -> None:
        """Queue ``data`` (the sink's :meth:`~StreamSink.stream_pause` says when to stop); raises StreamError."""
        ...

    def send_eof(self) -> None:
        """Half-close: no more data will be sent."""
        ...

    def passed(self, n: int) -> None:
        """``n`` bytes of :meth:`~StreamSink.stream_data` were passed on: the peer may send that many more."""
        ...


def attach(stream: Stream, sink: StreamSink) -> Attached | None:
    """Switch ``stream`` to callback mode if it offers one (an optional ``attach(sink)`` method), else None.

    Once attached, the stream hands what it had buffered and everything after to ``sink`` and is read no more;
    :meth:`Stream.close` still closes it. A stream that offers no callback mode (TLS, SPDY, TCP) is spliced by
    reading and writing it.
    """
    method = getattr(stream, "attach", None)
    return None if method is None else method(sink)  # type: ignore[no-any-return]  # an optional duck-typed method


class Dialer(Protocol):
    """Opens streams to ``host:port`` on the cluster side. A dialer connects to the host in its normal form
    (:func:`netnames.normalize_host`), the form a :class:`~proxy.policy.Policy` checks."""

    async def dial(self, host: str, port: int) -> Stream:
        """Open a stream or raise :class:`DialError`."""
        ...


class TCPStream:
    """:class:`Stream` over an asyncio TCP connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, n: int = 65536) -> bytes:
        try:
            return await self._reader.read(n)
        except (ConnectionError, OSError) as exc:
            raise StreamError(str(exc)) from exc

    async def write(self, data: bytes) -> None:
        try:
            self._writer.write(data)
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            raise StreamError(str(exc)) from exc

    async def write_eof(self) -> None:
        if self._writer.can_write_eof() and not self._writer.is_closing():
            self._writer.write_eof()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    def abort(self) -> None:
        """Drop the connection at once, unsent bytes included."""
        self._writer.transport.abort()


class TCPDialer:
    """A :class:`Dialer` that connects directly over TCP (for tests and local targets)."""

    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = timeout

    async def dial(self, host: str, port: int) -> Stream:
        host = normalize_host(host)  # what a policy checked, never a spelling the resolver reads differently
        try:
            async with asyncio.timeout(self._timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError as exc:
            raise DialTimeout(f"connect to {host}:{port} timed out") from exc
        except OSError as exc:
            raise ChannelRefused(f"connect to {host}:{port}: {exc.strerror or exc}") from exc
        return TCPStream(reader, writer)

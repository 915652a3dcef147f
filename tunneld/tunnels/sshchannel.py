"""The SSH boundary's channels: one forwarded channel as a :class:`proxy.dialer.Stream`, with its flow control.

:class:`Session` is the channel's receiving end (asyncssh calls it); :class:`ChannelStream` is what the fronts read
and write. asyncssh's errors are translated here into :class:`~tunneld.errors.StreamError`: a channel that fails, or
closes before the node's end of data, never reads as a clean end.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncssh

from tunneld.errors import StreamError

if TYPE_CHECKING:
    from proxy.dialer import StreamSink

# Larger than asyncssh's default so one channel can fill a fast link; still a hard bound on what one slow reader
# can make the node's sshd buffer for us.
CHANNEL_WINDOW = 4 * 1024 * 1024
READ_SIZE = 256 * 1024


@dataclass
class Counters:
    """Traffic through one tunnel (all its channels)."""

    bytes_in: int = 0
    bytes_out: int = 0
    open_channels: int = 0
    channels_total: int = 0


def describe(exc: BaseException) -> str:
    """A short reason for an asyncssh or socket error."""
    if isinstance(exc, asyncssh.DisconnectError):
        return f"disconnected: {exc.reason or type(exc).__name__}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


class _ClosedWithoutEOF(Exception):
    """The channel was closed before the node sent its end of data."""


class Session(asyncssh.SSHTCPSession[bytes]):
    """One channel's receiving end and flow control, for :class:`ChannelStream`.

    asyncssh's own streams (``open_connection``) add a general-purpose layer (read locks, separators, datatypes) that
    a byte pipe does not need and that costs CPU on every packet; this session keeps what a splice needs.

    Flow control: asyncssh gives the node its window back as soon as data reaches the session, so a stalled reader
    would let it hold up to twice the window. Instead the window is given back by hand, for the bytes the consumer has
    taken *and* finished with (a read's bytes are released by the next read: the splice only reads again once the
    client took the last chunk), so what the node sent and nobody has passed on never exceeds ``CHANNEL_WINDOW``; a
    node sending past its window is a protocol error asyncssh enforces. With an asyncssh that lacks the attributes
    this needs, it falls back to pausing the channel at a full window (bounded by twice the window).

    Attached to a sink (:meth:`ChannelStream.attach`), the session hands the node's bytes, end and failure straight to
    it from asyncssh's callbacks (its own packet path or the lean one alike), and the sink gives the window back as it
    passes bytes on.
    """

    def __init__(self) -> None:
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.node_eof = False  # the node sent CHANNEL_EOF: its side ended cleanly
        self.error: Exception | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.manual_window = False  # we give the node its window back (see above)
        self.lent = 0  # bytes of the last read, released at the next one
        self.credit = 0  # bytes released whose window the node has not been given back yet
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self.sink: StreamSink | None = None
        self.counters: Counters | None = None  # the tunnel's, counting what goes to the sink
        self.broke: Callable[[BaseException], StreamError] = lambda exc: StreamError(describe(exc))

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:  # type: ignore[override]  # a TCP session's channel is this subclass
        self.chan = chan
        self.manual_window = hasattr(chan, "_init_recv_window") and hasattr(chan, "_recv_window")
        if self.manual_window:
            chan._init_recv_window = 0  # asyncssh's own window adjusts off (it adjusts below half of this)

    def release(self) -> None:
        """The consumer is done with the last read: give its window back (in batches of a quarter window)."""
        lent, self.lent = self.lent, 0
        self.give_back(lent)

    def give_back(self, n: int) -> None:
        """``n`` bytes received were passed on: the node may send that many more (in batches of a quarter window)."""
        self.credit += n
        chan = self.chan
        if not self.manual_window or chan is None or self.credit < CHANNEL_WINDOW // 4 or self.eof:
            return
        credit, self.credit = self.credit, 0
        chan._recv_window += credit  # type: ignore[attr-defined]  # asyncssh keeps the window private
        with contextlib.suppress(asyncssh.Error, OSError):
            chan.send_packet(asyncssh.constants.MSG_CHANNEL_WINDOW_ADJUST, credit.to_bytes(4, "big"))

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        sink = self.sink
        if sink is not None:
            self.counters.bytes_in += len(data)  # type: ignore[union-attr]  # set with the sink
            sink.stream_data(data)
            return
        self.buffer.append(data)
        self.buffered += len(data)
        if (not self.manual_window and self.buffered >= CHANNEL_WINDOW and not self.reading_paused
                and self.chan is not None):
            self.reading_paused = True
            self.chan.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = self.node_eof = True
        self._wake_reader()
        if self.sink is not None:
            self.sink.stream_eof()
        return True  # keep our direction open: the client may still be sending (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and not self.node_eof:
            # A close without the node's EOF is a cut, not an end (the gateway closing the tunnel, for instance).
            exc = _ClosedWithoutEOF("channel closed without end of data")
        self.fail(exc)

    def fail(self, exc: BaseException | None) -> None:
        """The channel is over; ``exc`` (if not None) is why it broke. Readers, writers and a sink are told."""
        broken = exc is not None and self.error is None
        if exc is not None and self.error is None:
            self.error = exc if isinstance(exc, Exception) else StreamError(describe(exc))
        self.eof = True
        was_paused, self.writing_paused = self.writing_paused, False  # nothing will resume it: no writer may wait
        self._wake_reader()
        self._wake_writer()
        if broken and self.sink is not None and self.error is not None:
            self.sink.stream_broke(self.broke(self.error))
        elif was_paused and self.sink is not None:
            # Closed after the node's end of data with our data still queued: the sink must not wait either (its
            # next send finds the channel closed, its end of data ends the splice).
            self.sink.stream_resume()

    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.sink is not None:
            self.sink.stream_pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer()
        if self.sink is not None:
            self.sink.stream_resume()

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def wait_readable(self) -> None:
        self._readable = asyncio.get_running_loop().create_future()
        await self._readable

    async def wait_writable(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()
        await self._writable

    def take(self, n: int) -> bytes:
        """Up to ``n`` buffered bytes (the caller checked there are some)."""
        data = self.buffer.popleft()
        if len(data) > n:
            self.buffer.appendleft(data[n:])
            data = data[:n]
        elif self.buffer and len(data) + len(self.buffer[0]) <= n:
            parts, size = [data], len(data)
            while self.buffer and size + len(self.buffer[0]) <= n:
                size += len(self.buffer[0])
                parts.append(self.buffer.popleft())
            data = b"".join(parts)
        self.buffered -= len(data)
        self.lent = len(data)
        if self.reading_paused and self.buffered < CHANNEL_WINDOW // 2 and self.chan is not None:
            self.reading_paused = False
            self.chan.resume_reading()  # may deliver more data right away
        return data


class ChannelStream:
    """A forwarded channel as a :class:`proxy.dialer.Stream`, counting its bytes on the tunnel."""

    def __init__(self, session: Session, counters: Counters, target: str) -> None:
        assert session.chan is not None
        self._session = session
        self._chan = session.chan
        self._counters = counters
        self._closed = False
        self.target = target
        counters.open_channels += 1
        counters.channels_total += 1

    def _broke(self, exc: BaseException) -> StreamError:
        return StreamError(f"channel to {self.target} broke: {describe(exc)}")

    async def read(self, n: int = READ_SIZE) -> bytes:
        session = self._session
        session.release()
        while not session.buffer:
            if session.error is not None:
                raise self._broke(session.error)  # never a clean end: the tunnel or the channel failed
            if session.eof:
                return b""
            await session.wait_readable()
        data = session.take(n)
        self._counters.bytes_in += len(data)
        return data

    async def write(self, data: bytes) -> None:
        session = self._session
        if session.error is not None:
            raise self._broke(session.error)
        try:
            self._chan.write(data)
        except (asyncssh.Error, OSError) as exc:  # BrokenPipeError: the channel is closing
            raise self._broke(exc) from exc
        while session.writing_paused and session.error is None:
            await session.wait_writable()  # the node's window is spent, or our send buffer is full
        if session.error is not None:
            raise self._broke(session.error)
        self._counters.bytes_out += len(data)

    async def write_eof(self) -> None:
        self.send_eof()

    def attach(self, sink: StreamSink) -> ChannelStream | None:
        """Callback mode (:func:`proxy.dialer.attach`): what the node sends goes straight to ``sink``, starting with
        what is buffered; None (read and write instead) if the window cannot be given back by hand."""
        session = self._session
        if not session.manual_window or self._closed:
            return None
        session.counters = self._counters
        session.broke = self._broke
        session.sink = sink
        session.release()  # the last read's bytes were passed on before the switch
        while session.buffer:
            data = session.buffer.popleft()
            session.buffered -= len(data)
            self._counters.bytes_in += len(data)
            sink.stream_data(data)
        if session.error is not None:
            sink.stream_broke(self._broke(session.error))
        elif session.node_eof:
            sink.stream_eof()
        elif session.writing_paused:
            sink.stream_pause()
        return self

    def send(self, data: bytes) -> None:
        """Queue ``data`` on the channel without waiting (callback mode: the sink is told when to pause)."""
        if self._session.error is not None:
            raise self._broke(self._session.error)
        try:
            self._chan.write(data)
        except (asyncssh.Error, OSError) as exc:  # BrokenPipeError: the channel is closing
            raise self._broke(exc) from exc
        self._counters.bytes_out += len(data)

    def send_eof(self) -> None:
        try:
            if self._chan.can_write_eof():
                self._chan.write_eof()
        except (asyncssh.Error, OSError):
            pass

    def passed(self, n: int) -> None:
        """Callback mode: ``n`` bytes the sink was given are passed on; their window goes back to the node."""
        self._session.give_back(n)

    async def close(self) -> None:
        """Close the channel: unsent data still goes out first, then ``CHANNEL_CLOSE``.

        The node's answering close is not awaited: asyncssh releases the channel when it arrives, and waiting for a
        round trip to the node here would delay the next request on the client's kept-alive connection.
        """
        if self._closed:
            return
        self._closed = True
        self._session.sink = None
        self._counters.open_channels -= 1
        self._chan.close()

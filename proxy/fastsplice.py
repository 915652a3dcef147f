"""Splicing in callbacks: a plain (TCP or unix) client connection and a stream in callback mode
(:func:`proxy.dialer.attach`, an SSH channel), with no task, no StreamReader and no copy in the data path.

After the front has parsed the request head, the client's transport is taken over by a :class:`SpliceProtocol`,
fed first with what the front's StreamReader had already buffered. Then each side's bytes are handed to the other
from the callback that received them: the client's ``data_received`` queues them on the channel; the channel's
``data_received`` queues them for the client, and what one turn of the loop received (the packets of one read from
the node's connection) goes to the client's transport in one write. Backpressure both ways:

- client -> node: when the channel's send buffer is full (the node's window is spent), the channel pauses the sink
  and the client's transport stops reading until it resumes;
- node -> client: the node's window is given back only for bytes the client's transport took while below its
  (small) high-water mark; above it, what arrives waits in a queue of its own (the received bytes objects, not a
  growing transport buffer) until the transport drains. So what the node sent and nobody has passed on stays
  bounded by the channel's window plus :data:`HIGH_WATER` and one packet.

Endings are those of :mod:`proxy.splice` (its module docstring): half-close for CONNECT, ending as a whole for an
upgraded connection, a reset for a TCP client whose stream broke or expired, the stream always closed. At the end
the transport goes back to the front's protocol (with a connection loss seen meanwhile passed on), so the front
closes it as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from proxy.dialer import Attached, Stream, StreamError, attach
from proxy.spliceends import SPLICES, SpliceResult, StreamLimits, audit_expiry, expired, next_check, reset

HIGH_WATER = 16 * 1024
"""The client transport's write buffer above which the node's window is no longer given back."""
LOW_WATER = 4 * 1024
BATCH = 256 * 1024
"""At most this much of the queue goes to the client in one write (a read from the node's connection holds less)."""


def takeover_possible(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: Stream) -> bool:
    """Whether the splice can run in callbacks: a stream that offers a callback mode (:func:`proxy.dialer.attach`)
    and a plain socket client whose StreamReader we can empty.

    TLS client connections stay on the task-based splice (asyncio's TLS transport cannot half-close, and its flow
    control and teardown differ); so does a connection that already failed or is closing.
    """
    transport = writer.transport
    return (getattr(stream, "attach", None) is not None and writer.get_extra_info("sslcontext") is None
            and not transport.is_closing() and reader.exception() is None
            and isinstance(getattr(reader, "_buffer", None), bytearray)
            and isinstance(getattr(reader, "_eof", None), bool) and hasattr(transport, "set_protocol"))


def _take_buffered(reader: asyncio.StreamReader) -> tuple[bytes, bool]:
    """What the StreamReader holds, and whether the client's end of data came with it (asyncio keeps no public way
    to take a buffer without waiting; :func:`takeover_possible` checked these attributes exist)."""
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]  # asyncio's StreamReader keeps it private
    data = bytes(buffer)
    buffer.clear()
    return data, bool(reader._eof)  # type: ignore[attr-defined]  # private as well


class SpliceProtocol(asyncio.Protocol):
    """The client transport's protocol and the stream's sink for one splice."""

    def __init__(self, writer: asyncio.StreamWriter, upgraded: bool, result: SpliceResult) -> None:
        self.writer = writer
        self.transport: asyncio.Transport = writer.transport  # type: ignore[assignment]  # a socket's transport
        self.upgraded = upgraded
        self.result = result
        self.stream: Attached | None = None
        self.loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.up_open = True  # client -> stream
        self.down_open = True  # stream -> client
        self.client_full = False  # the client transport's buffer is over its high-water mark
        self.reading_paused = False  # we paused reading the client (the stream takes no more)
        self.withheld = 0  # bytes passed to the client transport whose window the node has not been given back
        self.queue: deque[bytes] = deque()  # the node's bytes not yet written to the client transport
        self.flushing = False  # a flush of the queue is scheduled
        self.eof_pending = False  # the node's end of data, to pass on once the queue is empty
        self.lost: tuple[Exception | None] | None = None  # the client connection's loss, to pass on at the end

    def end(self, broken: str | None = None) -> None:
        if broken is not None and self.result.broken is None:
            self.result.broken = broken
        if not self.done.done():
            self.done.set_result(None)

    def broke(self, error: StreamError) -> None:
        """The stream side broke: the client must see a reset, not an end."""
        self.result.broken = str(error) or type(error).__name__
        reset(self.writer)
        self.end()

    # The client's side (asyncio.Protocol).

    def data_received(self, data: bytes) -> None:
        if self.done.done() or self.stream is None:
            return
        self.result.last_activity = time.monotonic()
        try:
            self.stream.send(data)
        except StreamError as exc:
            self.broke(exc)
            return
        self.result.upstream_bytes += len(data)

    def eof_received(self) -> bool:
        if self.done.done():
            return True
        self.up_open = False
        if self.upgraded:
            self.end()  # an upgraded connection ends as a whole
        else:
            assert self.stream is not None
            self.stream.send_eof()
            if not self.down_open:
                self.end()
        return True  # the transport stays open: the other direction may go on, and the front closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)
        self.end((str(exc) or type(exc).__name__) if exc is not None else "client connection lost")

    def pause_writing(self) -> None:
        self.client_full = True

    def resume_writing(self) -> None:
        self.client_full = False
        if self.stream is None or self.done.done():
            return
        if self.withheld:
            withheld, self.withheld = self.withheld, 0
            self.stream.passed(withheld)
        if self.queue:
            self.schedule_flush()
        elif self.eof_pending:
            self.eof_pending = False
            self.node_ended()

    # The stream's side (proxy.dialer.StreamSink).

    def stream_data(self, data: bytes) -> None:
        if self.done.done():
            return
        self.result.last_activity = time.monotonic()
        self.result.downstream_bytes += len(data)
        self.queue.append(data)
        if not self.client_full:
            self.schedule_flush()

    def schedule_flush(self) -> None:
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Up to :data:`BATCH` queued bytes to the client in one write; the node gets their window back unless they
        filled the transport (then once it drains)."""
        self.flushing = False
        queue = self.queue
        if self.done.done() or self.client_full or self.stream is None or not queue:
            return
        batch = [queue.popleft()]
        size = len(batch[0])
        while queue and size < BATCH:
            data = queue.popleft()
            batch.append(data)
            size += len(data)
        if len(batch) == 1:
            self.transport.write(batch[0])
        else:
            self.transport.writelines(batch)  # uvloop: one writev; asyncio: one join
        del batch
        if self.client_full:
            self.withheld += size
        else:
            self.stream.passed(size)
            if queue:
                self.schedule_flush()
            elif self.eof_pending:
                self.eof_pending = False
                self.node_ended()

    def stream_eof(self) -> None:
        if self.done.done():
            return
        if self.queue:
            self.eof_pending = True
        else:
            self.node_ended()

    def node_ended(self) -> None:
        self.down_open = False
        if not self.upgraded and self.transport.can_write_eof():
            with contextlib.suppress(OSError):
                self.transport.write_eof()
            if self.up_open:
                return  # half-closed: the client may still be sending
        self.end()

    def stream_broke(self, error: StreamError) -> None:
        if not self.done.done():
            self.broke(error)

    def stream_pause(self) -> None:
        if not self.done.done() and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def stream_resume(self) -> None:
        if self.reading_paused and not self.done.done() and not self.transport.is_closing():
            self.reading_paused = False
            self.transport.resume_reading()


async def splice_in_callbacks(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: Stream,
    *,
    to_stream: bytes,
    to_client: bytes,
    upgraded: bool,
    limits: StreamLimits,
    peer: str,
    target: str,
) -> SpliceResult | None:
    """:func:`proxy.splice.splice` in callbacks (the caller checked :func:`takeover_possible`); None when ``stream``
    has no callback mode, with nothing done but ``to_client`` written."""
    result = SpliceResult()
    sp = SpliceProtocol(writer, upgraded, result)
    transport = sp.transport
    front = transport.get_protocol()
    # From here to the wait nothing yields: no byte of either side can arrive out of order.
    transport.set_protocol(sp)  # first: a transport that fills from here on pauses the splice, never the front
    transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
    if to_client:
        transport.write(to_client)  # before what the stream has buffered, which attaching it queues
        result.downstream_bytes += len(to_client)
    stream_attached = attach(stream, sp)
    if stream_attached is None:
        transport.set_protocol(front)
        if sp.client_full:
            front.pause_writing()  # the transport will resume the front's protocol, which must know it is paused
        return None
    sp.stream = stream_attached
    SPLICES["callbacks"] += 1
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    timer: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal timer
        timer = None
        if sp.done.done():
            return
        why = expired(limits, started, result.last_activity)
        if why is None:
            delay = next_check(limits, started, result.last_activity)
            timer = loop.call_later(delay, check) if delay is not None else None
            return
        result.broken = why
        audit_expiry(why, result, peer, target)
        reset(writer)
        sp.end()

    try:
        buffered, client_eof = _take_buffered(reader)
        if not sp.reading_paused and not transport.is_reading() and not transport.is_closing():
            transport.resume_reading()  # the StreamReader may have paused it while full (not the stream, attaching)
        for data in (to_stream, buffered):
            if data:
                sp.data_received(data)
        if client_eof:
            sp.eof_received()
        delay = next_check(limits, started, result.last_activity)
        if delay is not None:
            timer = loop.call_later(delay, check)
        await sp.done
    finally:  # also when the splice itself is cancelled while it waits: the stream is always closed
        if timer is not None:
            timer.cancel()
        sp.done.cancel()  # no callback acts any more
        transport.set_protocol(front)
        if sp.client_full:
            front.pause_writing()  # the transport will resume the front's protocol, which must know it is paused
        if sp.reading_paused and not transport.is_closing():
            transport.resume_reading()
        if sp.lost is not None:
            front.connection_lost(sp.lost[0])  # the front's writer waits for it to close
        with contextlib.suppress(StreamError):
            await stream.close()
    if result.broken is None and not transport.is_closing() and transport.get_write_buffer_size():
        await _deliver_the_rest(writer, limits, started, result, peer, target)
    return result


async def _deliver_the_rest(writer: asyncio.StreamWriter, limits: StreamLimits, started: float,
                            result: SpliceResult, peer: str, target: str) -> None:
    """The splice ended cleanly with bytes still on their way to the client: the stream's bounds hold until the
    client took them (the front's close would wait for them without any), and a client that does not take them in
    time is reset, since it did not receive the whole stream (the task splice's last ``drain`` does the same)."""
    waiting_since = time.monotonic()
    writer.transport.set_write_buffer_limits(high=0)  # the front's protocol resumes once everything is sent
    try:
        async with asyncio.timeout(next_check(limits, started, waiting_since)):
            await writer.drain()
    except TimeoutError:
        why = expired(limits, started, waiting_since) or "stream bound expired"
        result.broken = why
        audit_expiry(why, result, peer, target)
        reset(writer)
    except (ConnectionError, OSError) as exc:
        result.broken = str(exc) or type(exc).__name__

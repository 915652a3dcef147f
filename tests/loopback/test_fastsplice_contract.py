"""The callback splice against a stream the test drives (the optional ``attach`` of :mod:`proxy.dialer`'s contract):
the order of the bytes around the switch, and how the front gets its connection back however the splice ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from proxy.dialer import StreamError, StreamSink
from proxy.splice import SPLICES, SpliceResult, reset, splice

from ..waiting import wait_for
from .test_stream_ends import outcome


class DrivenStream:
    """A :class:`proxy.dialer.Stream` whose callback mode the test drives; it is never read or written."""

    def __init__(self) -> None:
        self.sink: StreamSink | None = None
        self.sent = bytearray()
        self.eof = False
        self.closed = False
        self.given_back = 0

    async def read(self, n: int = 65536) -> bytes:
        raise AssertionError("read in callback mode")

    async def write(self, data: bytes) -> None:
        raise AssertionError("written in callback mode")

    async def write_eof(self) -> None:
        raise AssertionError("half-closed outside callback mode")

    async def close(self) -> None:
        self.closed = True

    def attach(self, sink: StreamSink) -> DrivenStream:
        self.sink = sink
        return self

    def send(self, data: bytes) -> None:
        self.sent += data

    def send_eof(self) -> None:
        self.eof = True

    def passed(self, n: int) -> None:
        self.given_back += n


@dataclass
class Front:
    """One connection: the client's ends, and the gateway's side with its splice running as a task."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server_writer: asyncio.StreamWriter
    front_protocol: object
    task: asyncio.Task[SpliceResult]
    stream: DrivenStream = field(default_factory=DrivenStream)


class FullAtAttach(DrivenStream):
    """A stream whose send side is already full when it is attached (an SSH channel with its window spent)."""

    def attach(self, sink: StreamSink) -> DrivenStream:
        super().attach(sink)
        sink.stream_pause()
        return self


@pytest.fixture
async def front(request: pytest.FixtureRequest) -> AsyncIterator[Front]:
    """The client sends a head line and more in one segment; the front reads the head only (the rest stays in its
    StreamReader) and splices with bytes of its own for each side (the stream: a DrivenStream, or the class given
    by indirect parametrization)."""
    stream: DrivenStream = getattr(request, "param", DrivenStream)()
    accepted: asyncio.Future[tuple[asyncio.StreamWriter, object, asyncio.Task[SpliceResult]]] = \
        asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\n")
        protocol = writer.transport.get_protocol()
        task = asyncio.ensure_future(splice(reader, writer, stream, to_stream=b"<T>", to_client=b"<C>"))
        accepted.set_result((writer, protocol, task))
        try:
            await task
        except asyncio.CancelledError:
            pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    writer.write(b"HEAD\nbuffered")
    server_writer, protocol, task = await asyncio.wait_for(accepted, 10)
    try:
        yield Front(reader, writer, server_writer, protocol, task, stream)
    finally:
        task.cancel()
        writer.close()
        server_writer.close()
        server.close()


@pytest.mark.both_loops
async def test_bytes_keep_their_order_and_a_cancelled_splice_gives_the_connection_back(front: Front) -> None:
    assert await asyncio.wait_for(front.reader.readexactly(3), 10) == b"<C>"
    assert SPLICES["callbacks"] >= 1 and front.stream.sink is not None
    front.stream.sink.stream_data(b"node")
    assert await asyncio.wait_for(front.reader.readexactly(4), 10) == b"node"
    await wait_for(lambda: front.stream.given_back == 4, 5, "the window given back for what the client took")
    front.writer.write(b"more")
    await wait_for(lambda: bytes(front.stream.sent) == b"<T>bufferedmore", 5, "the client's bytes, in order")

    front.task.cancel()
    await asyncio.gather(front.task, return_exceptions=True)
    assert front.stream.closed
    assert front.server_writer.transport.get_protocol() is front.front_protocol
    front.server_writer.write(b"after")  # the front's writer works as before
    assert await asyncio.wait_for(front.reader.readexactly(5), 10) == b"after"
    front.server_writer.close()
    await asyncio.wait_for(front.server_writer.wait_closed(), 5)


@pytest.mark.both_loops
async def test_a_client_that_vanishes_ends_the_splice_and_the_front_sees_the_loss(front: Front) -> None:
    assert await asyncio.wait_for(front.reader.readexactly(3), 10) == b"<C>"
    reset(front.writer)  # a reset: a FIN alone would be a half-close, after which the node may still send
    result = await asyncio.wait_for(front.task, 10)
    assert result.broken is not None and front.stream.closed
    # The loss reached the front's protocol: its writer is closed (with the reset as the reason).
    closed = await asyncio.wait_for(asyncio.gather(front.server_writer.wait_closed(), return_exceptions=True), 5)
    assert closed[0] is None or isinstance(closed[0], ConnectionError)


@pytest.mark.both_loops
async def test_a_stream_that_breaks_resets_the_client(front: Front) -> None:
    assert await asyncio.wait_for(front.reader.readexactly(3), 10) == b"<C>"
    assert front.stream.sink is not None
    front.stream.sink.stream_broke(StreamError("channel to x broke: gone"))
    assert await outcome(front.reader) == "reset"
    result = await asyncio.wait_for(front.task, 10)
    assert result.broken == "channel to x broke: gone" and front.stream.closed


async def test_half_close_both_ways_then_the_splice_ends(front: Front) -> None:
    assert await asyncio.wait_for(front.reader.readexactly(3), 10) == b"<C>"
    assert front.stream.sink is not None
    front.stream.sink.stream_eof()
    assert await asyncio.wait_for(front.reader.read(), 10) == b""  # the node's end, as the client's end of data
    front.writer.write(b"still")
    await wait_for(lambda: bytes(front.stream.sent) == b"<T>bufferedstill", 5, "the other direction still open")
    assert not front.task.done()
    front.writer.write_eof()
    result = await asyncio.wait_for(front.task, 10)
    assert front.stream.eof and result.broken is None and front.stream.closed


@pytest.mark.both_loops
@pytest.mark.parametrize("front", [FullAtAttach], indirect=True)
async def test_a_stream_full_when_attached_holds_the_client_back_until_it_resumes(front: Front) -> None:
    assert await asyncio.wait_for(front.reader.readexactly(3), 10) == b"<C>"  # the splice is in place
    assert front.stream.sink is not None
    transport = front.server_writer.transport
    assert not transport.is_reading()  # the client is not read while the stream takes nothing
    front.writer.write(b"x" * 65536)
    front.stream.sink.stream_resume()
    await wait_for(lambda: bytes(front.stream.sent) == b"<T>buffered" + b"x" * 65536, 5, "the client read again")
    assert transport.is_reading()

"""SPDY/3.1 framing and sessions, as Kubernetes' streaming endpoints speak it (exec, attach, port-forward).

Both ends of a Kubernetes stream (client-go and the kubelet) use the same SPDY library, whose rules this follows:
frames are SPDY version 3; every header block is zlib-compressed with the SPDY/3 dictionary, one compression context
per direction for the whole connection, each block ended with a sync flush; a stream is opened by SYN_STREAM and
answered by SYN_REPLY; data frames carry bytes, FLAG_FIN half-closes; RST_STREAM aborts a stream; GOAWAY ends the
session. Flow control (WINDOW_UPDATE, SETTINGS) is read and ignored, as that library does: backpressure is TCP's.

    control frame: 1 | version (15) | type (16) | flags (8) | length (24) | payload
    data frame:    0 | stream id (31)           | flags (8) | length (24) | payload
    SYN_STREAM: stream id (31) | associated id (31) | priority (3) + unused (5) | slot (8) | header block
    SYN_REPLY / HEADERS: stream id | header block;  RST_STREAM: stream id | status;  PING: id;  GOAWAY: last id | status
    header block (before compression): count (32) | for each: name length (32) | name | value length (32) | value
                                       (several values of one name are joined with NUL bytes)

Everything a peer sends is bounded: frame payloads (:data:`MAX_FRAME`), decompressed header blocks
(:data:`MAX_HEADER_BLOCK`), streams per session, and unread data per stream (a full stream stops the reader, so a
peer that is not read is slowed by TCP, never buffered without bound).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from proxy.dialer import Stream
from proxy.errors import StreamError

VERSION = 3
DATA, SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 0, 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
RST_PROTOCOL_ERROR, RST_INVALID_STREAM, RST_REFUSED_STREAM, RST_CANCEL = 1, 2, 3, 5
MAX_FRAME = 1024 * 1024
MAX_HEADER_BLOCK = 64 * 1024
MAX_STREAMS = 256
STREAM_QUEUE = 16
"""Unread data frames per stream before the session stops reading the connection."""

_DICTIONARY_WORDS = [
    *(
    "options head post put delete trace accept accept-charset accept-encoding accept-language accept-ranges age allow "
    "authorization cache-control connection content-base content-encoding content-language content-length "
    "content-location content-md5 content-range content-type date etag expect expires from host if-match "
    "if-modified-since if-none-match if-range if-unmodified-since last-modified location max-forwards pragma "
    "proxy-authenticate proxy-authorization range referer retry-after server te trailer transfer-encoding upgrade "
    "user-agent vary via warning www-authenticate method get status"
    ).split(),
    "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin",
]
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(len(w).to_bytes(4, "big") + w.encode() for w in _DICTIONARY_WORDS) + _DICTIONARY_TAIL.encode()
"""The SPDY/3 header compression dictionary (length-prefixed header names, then common values)."""

Headers = dict[str, list[str]]


class SPDYError(Exception):
    """The peer broke the protocol (or a bound): the session is over."""


@dataclass
class Frame:
    """One frame: ``kind`` is :data:`DATA` or a control type."""

    kind: int
    stream_id: int = 0
    flags: int = 0
    data: bytes = b""
    headers: Headers = field(default_factory=dict)
    status: int = 0
    associated: int = 0


class HeaderCodec:
    """One direction's header compression context (each side keeps one for sending and one for receiving)."""

    def __init__(self) -> None:
        self._compress = zlib.compressobj(zdict=DICTIONARY)
        self._decompress = zlib.decompressobj(zdict=DICTIONARY)

    def encode(self, headers: Headers) -> bytes:
        parts = [struct.pack(">I", len(headers))]
        for name, values in headers.items():
            key, value = name.lower().encode(), "\0".join(values).encode()
            parts += [struct.pack(">I", len(key)), key, struct.pack(">I", len(value)), value]
        raw = b"".join(parts)
        return self._compress.compress(raw) + self._compress.flush(zlib.Z_SYNC_FLUSH)

    def decode(self, block: bytes) -> Headers:
        try:
            raw = self._decompress.decompress(block, MAX_HEADER_BLOCK + 1)
        except zlib.error as exc:
            raise SPDYError(f"header block does not decompress: {exc}") from exc
        if len(raw) > MAX_HEADER_BLOCK or self._decompress.unconsumed_tail:
            raise SPDYError(f"header block over {MAX_HEADER_BLOCK} bytes")
        return _parse_block(raw)


def _parse_block(raw: bytes) -> Headers:
    def take(offset: int) -> tuple[bytes, int]:
        if offset + 4 > len(raw):
            raise SPDYError("truncated header block")
        (n,) = struct.unpack_from(">I", raw, offset)
        if offset + 4 + n > len(raw):
            raise SPDYError("truncated header block")
        return raw[offset + 4:offset + 4 + n], offset + 4 + n

    if len(raw) < 4:
        raise SPDYError("truncated header block")
    (count,) = struct.unpack_from(">I", raw, 0)
    headers: Headers = {}
    offset = 4
    for _ in range(count):
        name, offset = take(offset)
        value, offset = take(offset)
        if not name or name.lower() != name:
            raise SPDYError("header names must be non-empty lower case")
        headers.setdefault(name.decode("latin-1"), []).extend(value.decode("latin-1").split("\0"))
    if offset != len(raw):
        raise SPDYError("bytes after the header block")
    return headers


class FrameCodec:
    """Frames to bytes and back for one connection (it owns both header compression contexts)."""

    def __init__(self) -> None:
        self._out = HeaderCodec()
        self._in = HeaderCodec()
        self._buffer = bytearray()

    def encode(self, frame: Frame) -> bytes:
        if frame.kind == DATA:
            return struct.pack(">II", frame.stream_id & 0x7FFFFFFF, (frame.flags << 24) | len(frame.data)) + frame.data
        if frame.kind == SYN_STREAM:
            payload = struct.pack(">IIH", frame.stream_id, frame.associated, 0) + self._out.encode(frame.headers)
        elif frame.kind in (SYN_REPLY, HEADERS):
            payload = struct.pack(">I", frame.stream_id) + self._out.encode(frame.headers)
        elif frame.kind in (RST_STREAM, GOAWAY):
            payload = struct.pack(">II", frame.stream_id, frame.status)
        elif frame.kind == PING:
            payload = struct.pack(">I", frame.stream_id)
        else:
            raise ValueError(f"cannot encode frame type {frame.kind}")
        return struct.pack(">HHI", 0x8000 | VERSION, frame.kind, (frame.flags << 24) | len(payload)) + payload

    def feed(self, data: bytes) -> list[Frame]:
        """The whole frames ``data`` completes (the rest is kept). Raises :class:`SPDYError`."""
        self._buffer += data
        frames = []
        while len(self._buffer) >= 8:
            first, second = struct.unpack_from(">II", self._buffer, 0)
            length = second & 0xFFFFFF
            if length > MAX_FRAME:
                raise SPDYError(f"frame of {length} bytes (limit {MAX_FRAME})")
            if len(self._buffer) < 8 + length:
                break
            payload = bytes(self._buffer[8:8 + length])
            del self._buffer[:8 + length]
            flags = second >> 24
            if first & 0x80000000:
                version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
                if version != VERSION:
                    raise SPDYError(f"SPDY version {version} (expected {VERSION})")
                frame = self._control(kind, flags, payload)
                if frame is not None:
                    frames.append(frame)
            else:
                frames.append(Frame(DATA, first & 0x7FFFFFFF, flags, payload))
        return frames

    def _control(self, kind: int, flags: int, payload: bytes) -> Frame | None:
        def ids(n: int) -> tuple[int, ...]:
            if len(payload) < 4 * n:
                raise SPDYError(f"control frame {kind} too short")
            return struct.unpack_from(">" + "I" * n, payload, 0)

        if kind == SYN_STREAM:
            if len(payload) < 10:
                raise SPDYError("SYN_STREAM too short")
            sid, assoc = ids(2)
            return Frame(kind, sid & 0x7FFFFFFF, flags, headers=self._in.decode(payload[10:]),
                         associated=assoc & 0x7FFFFFFF)
        if kind in (SYN_REPLY, HEADERS):
            (sid,) = ids(1)
            return Frame(kind, sid & 0x7FFFFFFF, flags, headers=self._in.decode(payload[4:]))
        if kind in (RST_STREAM, GOAWAY):
            sid, status = ids(2)
            return Frame(kind, sid & 0x7FFFFFFF, flags, status=status)
        if kind == PING:
            (pid,) = ids(1)
            return Frame(kind, pid, flags)
        if kind in (SETTINGS, WINDOW_UPDATE):
            return None  # flow control is TCP's (see the module docstring)
        raise SPDYError(f"unknown control frame type {kind}")


class SPDYStream:
    """One stream: ``headers`` from its SYN_STREAM; bytes in and out; FIN half-closes each way."""

    def __init__(self, session: Session, stream_id: int, headers: Headers) -> None:
        self.session = session
        self.id = stream_id
        self.headers = headers
        self.reply: Headers | None = None
        self.reset_status: int | None = None
        self.local_closed = False
        self.remote_closed = False
        self._chunks: deque[bytes] = deque()
        self._readable = asyncio.Event()
        self._space = asyncio.Event()
        self._ended = False

    def header(self, name: str) -> str:
        return (self.headers.get(name.lower()) or [""])[0]

    async def read(self) -> bytes:
        """The next bytes; ``b""`` once the peer half-closed. Raises :class:`SPDYError` if the stream was reset or
        the session broke."""
        while not self._chunks:
            if self._ended:
                if self.reset_status is not None:
                    raise SPDYError(f"stream {self.id} reset ({self.reset_status})")
                return b""
            self._readable.clear()
            await self._readable.wait()
        data = self._chunks.popleft()
        self._space.set()
        return data

    async def write(self, data: bytes, fin: bool = False) -> None:
        if self.local_closed:
            raise SPDYError(f"stream {self.id} is closed for writing")
        self.local_closed = fin
        await self.session.send(Frame(DATA, self.id, FLAG_FIN if fin else 0, data))
        if fin:
            self.session.forget_if_done(self)

    async def close(self) -> None:
        """Half-close our side (an empty data frame with FLAG_FIN)."""
        if not self.local_closed:
            await self.write(b"", fin=True)

    async def reset(self, status: int = RST_CANCEL) -> None:
        if self.id in self.session.streams:
            await self.session.send(Frame(RST_STREAM, self.id, status=status))
            self.reset_status = status
            self.session.ended(self)

    async def deliver(self, data: bytes) -> None:
        """Queue bytes for :meth:`read`; waits (holding up the session's reader) while the stream is full."""
        while len(self._chunks) >= STREAM_QUEUE and not self._ended:
            self._space.clear()
            await self._space.wait()
        if not self._ended:
            self._chunks.append(data)
            self._readable.set()

    def end(self, reset: bool) -> None:
        """No more bytes will come: after what is queued (nothing, when ``reset``), readers see the end."""
        self._ended = True
        if reset:
            self._chunks.clear()
        self._readable.set()
        self._space.set()


class Session:
    """A SPDY session over an upgraded connection (any :class:`~proxy.dialer.Stream`; ``leftover`` is what was read
    past the upgrade). The side that sent the upgrade request opens odd stream ids."""

    def __init__(self, stream: Stream, *, client: bool, on_stream: Callable[[SPDYStream], None] | None = None,
                 max_streams: int = MAX_STREAMS, leftover: bytes = b"") -> None:
        self.stream = stream
        self._leftover = leftover
        self.codec = FrameCodec()
        self.streams: dict[int, SPDYStream] = {}
        self._next_id = 1 if client else 2
        self._on_stream = on_stream
        self._max_streams = max_streams
        self._replies: dict[int, asyncio.Future[Headers]] = {}
        self._write_lock = asyncio.Lock()
        self.error: str | None = None
        self.closed = asyncio.Event()
        self._task = asyncio.create_task(self._read_loop())

    async def send(self, frame: Frame) -> None:
        async with self._write_lock:  # header compression state is shared: frames are encoded in send order
            try:
                await self.stream.write(self.codec.encode(frame))
            except StreamError as exc:
                raise ConnectionResetError(str(exc)) from exc

    async def open_stream(self, headers: Headers, timeout: float = 10.0) -> SPDYStream:
        """SYN_STREAM with ``headers``; returns once the peer's SYN_REPLY arrived."""
        sid, self._next_id = self._next_id, self._next_id + 2
        stream = SPDYStream(self, sid, headers)
        self.streams[sid] = stream
        reply = self._replies[sid] = asyncio.get_running_loop().create_future()
        await self.send(Frame(SYN_STREAM, sid, headers=headers))
        try:
            async with asyncio.timeout(timeout):
                stream.reply = await reply
        finally:
            self._replies.pop(sid, None)
        return stream

    async def _read_loop(self) -> None:
        try:
            data = self._leftover or await self.stream.read(65536)
            while data:
                for frame in self.codec.feed(data):
                    await self._dispatch(frame)
                data = await self.stream.read(65536)
            self.error = None
        except SPDYError as exc:
            self.error = str(exc)
            with contextlib.suppress(ConnectionError, OSError):
                await self.send(Frame(GOAWAY, 0, status=RST_PROTOCOL_ERROR))
        except (ConnectionError, OSError, StreamError) as exc:
            self.error = f"connection lost: {exc}"
        finally:
            for stream in list(self.streams.values()):
                if not stream.remote_closed:
                    stream.reset_status = RST_CANCEL  # cut by the session's end: never a clean end of data
                self.ended(stream)
            for waiter in self._replies.values():
                if not waiter.done():
                    waiter.set_exception(SPDYError(self.error or "session closed"))
            self.closed.set()

    async def _dispatch(self, frame: Frame) -> None:
        stream = self.streams.get(frame.stream_id)
        if frame.kind == DATA:
            if stream is None or stream.remote_closed:
                return  # data for a stream that is gone (reset, or closed by us)
            if frame.data:
                await stream.deliver(frame.data)
            if frame.flags & FLAG_FIN:
                stream.remote_closed = True
                stream.end(reset=False)
                self.forget_if_done(stream)
        elif frame.kind == SYN_STREAM:
            await self._incoming(frame)
        elif frame.kind == SYN_REPLY:
            waiter = self._replies.get(frame.stream_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(frame.headers)
        elif frame.kind == RST_STREAM:
            if stream is not None:
                stream.reset_status = frame.status
                self.ended(stream)
            waiter = self._replies.get(frame.stream_id)
            if waiter is not None and not waiter.done():
                waiter.set_exception(SPDYError(f"stream refused ({frame.status})"))
        elif frame.kind == PING:
            await self.send(Frame(PING, frame.stream_id))
        elif frame.kind == GOAWAY:
            raise ConnectionResetError("GOAWAY from the peer")

    async def _incoming(self, frame: Frame) -> None:
        if frame.stream_id in self.streams or frame.stream_id % 2 == self._next_id % 2 or frame.stream_id == 0:
            raise SPDYError(f"bad stream id {frame.stream_id} in SYN_STREAM")
        if len(self.streams) >= self._max_streams or self._on_stream is None:
            await self.send(Frame(RST_STREAM, frame.stream_id, status=RST_REFUSED_STREAM))
            return
        stream = SPDYStream(self, frame.stream_id, frame.headers)
        self.streams[frame.stream_id] = stream
        await self.send(Frame(SYN_REPLY, frame.stream_id))
        if frame.flags & FLAG_FIN:
            stream.remote_closed = True
            stream.end(reset=False)
        self._on_stream(stream)

    def ended(self, stream: SPDYStream) -> None:
        """Mark ``stream`` over (reset, or the session ended): readers see the end, the id is released."""
        stream.remote_closed = stream.local_closed = True
        self.streams.pop(stream.id, None)
        stream.end(reset=stream.reset_status is not None)

    def forget_if_done(self, stream: SPDYStream) -> None:
        """Release the id of a stream closed both ways."""
        if stream.local_closed and stream.remote_closed:
            self.streams.pop(stream.id, None)

    async def close(self) -> None:
        """End the session: GOAWAY, then close the connection and wait for the reader to stop."""
        if not self.closed.is_set():
            with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                async with asyncio.timeout(1.0):  # a peer that reads nothing cannot hold the close up
                    await self.send(Frame(GOAWAY, 0))
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        try:
            async with asyncio.timeout(1.0):
                await self.stream.close()
        except TimeoutError:  # unsent bytes for a peer that stopped reading: drop them
            abort = getattr(self.stream, "abort", None)
            if abort is not None:
                abort()

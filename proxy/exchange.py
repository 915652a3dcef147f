"""One client connection of a front, as HTTP/1.1 exchanges parsed and framed by h11 (see :mod:`proxy.server`).

A front's handler reads each request head with :meth:`Exchange.request`, its body with :meth:`Exchange.body`, and
answers with :meth:`Exchange.send` (or, after a ``101`` or a CONNECT's ``200``, takes the raw connection). Every
refusal is raised as a typed error (:mod:`proxy.errors`): an unparsable head, a head too large or too slow, and a
request whose body length could be read two ways (:func:`proxy.framing.ambiguity`) never reach a front's logic.
Once any byte of a response is written, :meth:`Exchange.error` can only cut the connection: a body never carries a
second status line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import h11

from proxy.errors import (
    BadRequest,
    ClientGone,
    HeadersTooLarge,
    ProxyError,
    RequestTimeout,
    looks_like_tls,
    plain_words,
)
from proxy.failures import status_body
from proxy.framing import ambiguity
from proxy.splice import reset

if TYPE_CHECKING:
    from proxy.server import Limits, Peer

READ = 256 * 1024


class Exchange:
    """One client connection: read requests, write responses, or switch to raw bytes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limits: Limits, peer: Peer) -> None:
        self.reader = reader
        self.writer = writer
        self.limits = limits
        self.peer = peer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._received = 0  # bytes fed to h11 since the current request head was awaited
        self._cycles = 0
        self._started = False  # bytes of a response to the current request were written
        self.current: h11.Request | None = None
        """The request being answered (for error negotiation and audit lines)."""

    async def _next(self, timeout: float) -> Any:
        event = self.conn.next_event()
        if event is not h11.NEED_DATA:
            return event  # already buffered: no read, no timer
        async with asyncio.timeout(timeout):
            while event is h11.NEED_DATA:
                try:
                    data = await self.reader.read(READ)
                except (ConnectionError, OSError) as exc:
                    raise ClientGone(str(exc)) from exc
                if self._cycles == 0 and self._received == 0 and looks_like_tls(data):
                    raise BadRequest("TLS sent to a plain-HTTP port")
                self._received += len(data)
                self.conn.receive_data(data)
                event = self.conn.next_event()
        return event

    async def request(self) -> h11.Request | None:
        """The next request head, or None when the client is done.

        Raises :class:`~proxy.errors.Refused` subclasses for a head that must be refused (408, 400, 431, 505).
        """
        first = self._cycles == 0
        buffered = len(self.conn.trailing_data[0])
        self._received = 0
        try:
            # The first head must arrive within header_timeout; a kept-alive connection may idle longer first.
            event = await self._next(self.limits.header_timeout if first else self.limits.idle_timeout)
        except TimeoutError as exc:
            if first:
                raise RequestTimeout("request head not received in time") from exc
            return None
        except h11.RemoteProtocolError as exc:
            raise _refusal(exc) from exc
        except ClientGone:
            return None
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed, or anything unexpected: done
        self.current = event
        # h11 bounds only a head that is still incomplete; one that arrived whole in a read is measured here.
        if buffered + self._received - len(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
            raise HeadersTooLarge("request header fields too large")
        if event.http_version not in (b"1.0", b"1.1"):
            raise BadRequest(f"HTTP/{event.http_version.decode('ascii', 'replace')} is not supported", 505)
        why = ambiguity(event.headers, event.http_version)
        if why is not None:
            raise BadRequest(f"ambiguous request framing: {why}")
        return event

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, as it arrives: each read within ``idle_timeout`` (else :class:`RequestTimeout`).

        A body cut short raises :class:`ClientGone`, a malformed one :class:`BadRequest`.
        """
        while True:
            try:
                event = await self._next(self.limits.idle_timeout)
            except TimeoutError as exc:
                raise RequestTimeout(f"request body stalled for {self.limits.idle_timeout:g}s") from exc
            except h11.RemoteProtocolError as exc:
                raise self._body_refusal(exc) from exc
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                return
            else:
                raise ClientGone("connection closed during the request body")

    def buffered_body(self) -> tuple[list[bytes], bool, ProxyError | None]:
        """The request body bytes already read from the client (no read, no wait): (chunks, whether the body's end is
        among them, the refusal for a malformed body or None). After a refusal the body must not be read further."""
        chunks: list[bytes] = []
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                return chunks, False, self._body_refusal(exc)
            if isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                return chunks, True, None
            elif event is h11.NEED_DATA:
                return chunks, False, None
            else:
                return chunks, False, ClientGone("connection closed during the request body")

    def _body_refusal(self, exc: h11.RemoteProtocolError) -> ProxyError:
        if self.conn.trailing_data[1]:  # the client closed mid-body
            return ClientGone("connection closed during the request body")
        return BadRequest(f"bad request body: {plain_words(str(exc), from_client=True)}")

    def empty_body(self, request: h11.Request) -> bool:
        """True, and the request's end consumed, when the current request carries no body (most GETs).

        Lets a front skip streaming a body it knows is empty; when False, read the body with :meth:`body`.
        """
        if self.conn.their_state is not h11.SEND_BODY:
            return False
        for name, value in request.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0"):
                return False
        event = self.conn.next_event()
        assert isinstance(event, h11.EndOfMessage), event
        return True

    async def send(self, *events: Any) -> None:
        """Send h11 events (a response head, data, end of message) and wait for the client to take them."""
        data = b"".join([self.conn.send(event) or b"" for event in events])  # one write: one syscall, one segment
        if data:
            self._started = True
            self.writer.write(data)
        await self._drain()

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ClientGone(str(exc)) from exc

    async def send_unframed_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """A response head whose body ends when the connection closes (neither Content-Length nor chunked).

        h11 would frame such a body as chunked for an HTTP/1.1 client, and so end it with a final chunk even when the
        upstream was cut short; this head is written as is, and the connection cannot carry another request.
        """
        lines = [b"HTTP/1.1 %d %s" % (status, reason or reason_phrase(status)),
                 *(name + b": " + value for name, value in headers), b"Connection: close", b"", b""]
        self._started = True
        self.writer.write(b"\r\n".join(lines))
        await self._drain()

    async def send_unframed(self, data: bytes) -> None:
        """Body bytes after :meth:`send_unframed_head`."""
        self.writer.write(data)
        await self._drain()

    @property
    def response_started(self) -> bool:
        """True once any byte of a response to the current request was written: no other status may follow."""
        return self._started

    def wants_json(self) -> bool:
        """True when the current request's ``Accept`` names JSON (a Kubernetes client)."""
        if self.current is None:
            return False
        return any(n == b"accept" and b"json" in v.lower() for n, v in self.current.headers)

    async def error(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        """Answer with ``status`` and a one-line message (a Kubernetes ``Status`` for a JSON caller), and close.

        Once a response is under way nothing is written: the connection is cut instead.
        """
        if self._started:
            self.abort()
            return
        content_type, body = status_body(status, message, self.wants_json())
        head = [("Content-Type", content_type), ("Content-Length", str(len(body))),
                ("Connection", "close"), *(headers or [])]
        try:
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self.send(h11.Response(status_code=status, headers=head, reason=reason_phrase(status)),
                                h11.Data(data=body), h11.EndOfMessage())
            elif self.conn.our_state is h11.ERROR or self.conn.their_state is h11.ERROR:
                # h11 refuses to speak after a protocol error; the status line is still owed to the client.
                reason = reason_phrase(status).decode()
                lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in head), "", ""]
                self._started = True
                self.writer.write("\r\n".join(lines).encode() + body)
                await self.writer.drain()
        except (ClientGone, ConnectionError, OSError, h11.LocalProtocolError):
            pass

    def switched(self) -> bytes:
        """After a 2xx to CONNECT or a 101: the bytes the client already sent past the request."""
        return bytes(self.conn.trailing_data[0])

    @property
    def reusable(self) -> bool:
        return self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE

    def next_cycle(self) -> None:
        """Get ready for the next request on a kept-alive connection (it may idle up to ``idle_timeout`` first)."""
        self.conn.start_next_cycle()
        self._cycles += 1
        self._started = False
        self.current = None

    def abort(self) -> None:
        """Drop the connection without a clean end (the client must not take a truncated body for a whole one).

        Over TCP this is a reset (``SO_LINGER`` 0: ``transport.abort()`` alone sends a FIN under asyncio and uvloop);
        a unix socket has no reset, so a client there sees an end of data and must rely on the body's framing.
        """
        reset(self.writer)


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (h11 sends none unless told)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Error"


def _refusal(exc: h11.RemoteProtocolError) -> BadRequest | HeadersTooLarge:
    """A request head h11 could not parse, as the refusal to answer with (always 400 but for a head too large)."""
    if exc.error_status_hint == 431:
        return HeadersTooLarge("request header fields too large")
    return BadRequest(f"malformed request: {plain_words(str(exc), from_client=True)}")

"""Forwarding one HTTP/1.1 request to an upstream over a dialed stream, and its response (or upgrade) back.

The exchange runs in steps, each its own function: :func:`send_request` (the head, with as much of the body as has
arrived, in one write; the rest of the body goes up in a task of its own while the answer is awaited: an upstream
may answer, and stream, before it has read everything) and :func:`receive_head`, then either :func:`relay_body` or
:func:`switch_protocols` (a ``101`` turns the connection into a raw splice for exec, attach and port-forward).
Headers and framing are :mod:`proxy.framing`'s; the upstream's HTTP (the head written, the response parsed by
httptools with h11 as the arbiter of anything unusual) is :mod:`proxy.upstreamhttp`'s.

Every step raises the typed errors of :mod:`proxy.errors` and answers nothing itself: the front's server maps them
to a status, or cuts the connection once a response is under way (:mod:`proxy.failures`). Time is bounded at every
step: each read of a request body and each write of it upstream within ``idle_timeout``; the response head within
``response_timeout`` of the request's end; each read of the response body within ``idle_timeout``. A request body
that fails (the client left, stalled or sent bad framing) ends the exchange even while the response streams.

A response cut short never looks complete: a chunked one ends without its final chunk, one with a Content-Length
ends short of it, and a close-delimited one stays close-delimited (it is not re-framed as chunked, which would add a
final chunk the upstream never sent); in each case the client connection is closed, and reset when the upstream
broke rather than ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import h11

from proxy.dialer import Dialer, Stream
from proxy.errors import (
    ClientGone,
    ProxyError,
    StreamError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    looks_like_tls,
    plain_words,
)
from proxy.framing import ambiguity, close_delimited, is_upgrade, request_headers, response_headers
from proxy.server import Exchange
from proxy.splice import StreamLimits, splice
from proxy.tls import TLSStream
from proxy.upstreamhttp import END, NEED_DATA, Event, Head, HeadError, ResponseError, ResponseParser, request_head

log = logging.getLogger("proxy.forward")

READ = 256 * 1024
MAX_RESPONSE_HEAD = 64 * 1024


@dataclass(frozen=True)
class Upstream:
    """Where to send a request and how to talk to it."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    identities: tuple[str, ...] = ()
    """Names or addresses the upstream's certificate must carry (when ``tls`` verifies)."""
    what: str = "target"

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


async def open_upstream(dialer: Dialer, up: Upstream) -> Stream:
    """Dial (the dialer checks the policy) and wrap in TLS when asked. Raises :class:`~proxy.dialer.DialError`."""
    stream = await dialer.dial(up.host, up.port)
    if up.tls is not None:
        try:
            stream = await TLSStream.connect(stream, up.tls, up.host, up.identities, up.what)
        except BaseException:
            await stream.close()
            raise
    return stream


class _Upstream:
    """The upstream's side of one exchange over a stream (:mod:`proxy.upstreamhttp`); parsers' and the clock's failures
    come out as :mod:`proxy.errors` types."""

    def __init__(self, stream: Stream, up: Upstream, idle: float) -> None:
        self.stream = stream
        self.up = up
        self.idle = idle
        self.response: ResponseParser | None = None
        self.chunked = False
        """The request body goes up chunked (else as is, under its Content-Length)."""
        self.first = b""
        """The first bytes the upstream sent (to say what it spoke when it was not HTTP)."""

    def head(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], upgrade: bool = False) -> bytes:
        """The request head to write (and the parser for its answer made ready)."""
        self.chunked = (b"transfer-encoding", b"chunked") in headers
        self.response = ResponseParser(method, MAX_RESPONSE_HEAD,
                                       [(n, v) for n, v in headers if n in (b"connection", b"upgrade")]
                                       if upgrade else None)
        try:
            return request_head(method, target, headers)
        except HeadError as exc:
            raise UpstreamProtocolError(f"{self.up.what}: {exc}") from exc

    def frame(self, chunks: list[bytes], end: bool) -> bytes:
        """Request body bytes as they go up (chunked, or as is), with the body's end when ``end``."""
        if self.chunked:
            out = b"".join([b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c])
            return out + b"0\r\n\r\n" if end else out
        return b"".join(chunks)

    async def send(self, data: bytes) -> None:
        """Write ``data``; the upstream must take it within ``idle`` seconds."""
        if data:
            try:
                async with asyncio.timeout(self.idle):
                    await self.stream.write(data)
            except TimeoutError as exc:
                raise UpstreamTimeout(f"{self.up.what} took no data for {self.idle:g}s") from exc

    async def fill(self, bounded: bool = True) -> None:
        """Feed the parser the next chunk from the upstream (``b""`` at its end), within ``idle`` seconds if
        ``bounded``."""
        if bounded:
            try:
                async with asyncio.timeout(self.idle):
                    data = await self.stream.read(READ)
            except TimeoutError as exc:
                raise UpstreamTimeout(f"{self.up.what} sent nothing for {self.idle:g}s") from exc
        else:
            data = await self.stream.read(READ)
        self.feed(data)

    def feed(self, data: bytes) -> None:
        if len(self.first) < 2:
            self.first += data[:2]
        assert self.response is not None
        self.response.receive(data)

    def event(self) -> Event:
        """The next parsed event, or ``NEED_DATA``."""
        assert self.response is not None
        try:
            return self.response.next_event()
        except ResponseError as exc:
            raise self._not_http(exc) from exc

    def _not_http(self, exc: Exception) -> UpstreamProtocolError:
        what = self.up.what
        if looks_like_tls(self.first):
            return UpstreamProtocolError(f"{what}: the target spoke TLS; use the https: prefix")
        if not self.first:
            hint = "" if self.up.tls is not None else " (if it serves TLS, use the https: prefix)"
            return UpstreamProtocolError(f"{what} closed the connection without answering{hint}")
        return UpstreamProtocolError(f"{what} answered with malformed HTTP: {plain_words(str(exc), from_client=False)}")


async def send_request(ex: Exchange, request: h11.Request, upstream: _Upstream, target: str, peer_address: str,
                       response_timeout: float) -> tuple[asyncio.Task[None] | None, Head]:
    """Steps 1 to 3: the request line and headers, re-framed (:func:`proxy.framing.request_headers`), in one write
    with as much of the body as has arrived already (all of it, for most requests), then the response head. Returns
    the task sending the rest of the body, if any (an upstream may answer, and stream, before it has read
    everything), and the head."""
    data = upstream.head(request.method, target.encode(), request_headers(request, upstream.up.authority,
                                                                          peer_address), is_upgrade(request))
    if ex.empty_body(request):
        return None, await _sent_and_answered(upstream, data, response_timeout)
    chunks, ended, failure = ex.buffered_body()
    await upstream.send(data + upstream.frame(chunks, ended))
    if failure is not None:
        raise failure
    body = None if ended else asyncio.create_task(_send_body(ex, upstream), name="request body")
    try:
        return body, await receive_head(upstream, body, response_timeout)
    except BaseException:
        await _cancel(body)
        raise


async def _sent_and_answered(upstream: _Upstream, data: bytes, timeout: float) -> Head:
    """A request without a body: written within ``idle``, answered within ``timeout`` of that (one timer, moved)."""
    answering = False
    try:
        async with asyncio.timeout(upstream.idle) as clock:
            await upstream.stream.write(data)
            answering = True
            clock.reschedule(asyncio.get_running_loop().time() + timeout)
            event = await _head(upstream)
    except TimeoutError as exc:
        if answering:
            raise UpstreamTimeout(f"{upstream.up.what} did not answer within {timeout:g}s") from exc
        raise UpstreamTimeout(f"{upstream.up.what} took no data for {upstream.idle:g}s") from exc
    return _checked(upstream, event)


async def _send_body(ex: Exchange, upstream: _Upstream) -> None:
    async for chunk in ex.body():
        await upstream.send(upstream.frame([chunk], False))
    await upstream.send(upstream.frame([], True))


def _client_failure(body: asyncio.Task[None] | None) -> BaseException | None:
    """The request body's failure when it was the client's doing (it ends the exchange), else None."""
    if body is None or not body.done() or body.cancelled():
        return None
    exc = body.exception()
    return None if exc is None or isinstance(exc, UpstreamError) else exc


async def _await_with_body(aw: asyncio.Future[Any], body: asyncio.Task[None] | None) -> None:
    """Wait for ``aw`` while the request body is still going up; a client-side body failure ends the wait."""
    if body is not None and not body.done():
        await asyncio.wait({aw, body}, return_when=asyncio.FIRST_COMPLETED)
    if (failure := _client_failure(body)) is not None and not aw.done():
        raise failure


async def _head(upstream: _Upstream) -> Event:
    """The response head (1xx other than 101 swallowed)."""
    while True:
        event = upstream.event()
        if event is NEED_DATA:
            await upstream.fill(bounded=False)
        elif isinstance(event, Head) and event.status_code < 200 and event.status_code != 101:
            continue  # 100 Continue and friends: ours to swallow
        else:
            return event


async def receive_head(upstream: _Upstream, body: asyncio.Task[None] | None, timeout: float) -> Head:
    """Step 3: the response head (1xx other than 101 swallowed), due ``timeout`` seconds after the request's end."""
    if body is None or body.done():
        # Nothing is going up any more (a GET's usual case): the clock runs from now, no task needed.
        if (failure := _client_failure(body)) is not None:
            raise failure
        try:
            async with asyncio.timeout(timeout):
                event = await _head(upstream)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{upstream.up.what} did not answer within {timeout:g}s") from exc
    else:
        task = asyncio.ensure_future(_head(upstream))
        try:
            await _await_with_body(task, body)
            try:
                async with asyncio.timeout(timeout):
                    event = await asyncio.shield(task) if not task.done() else task.result()
            except TimeoutError as exc:
                raise UpstreamTimeout(f"{upstream.up.what} did not answer within {timeout:g}s") from exc
        finally:
            await _cancel(task)
    return _checked(upstream, event)


def _checked(upstream: _Upstream, event: Event) -> Head:
    """The response head, unless its framing could be read two ways (or the upstream closed without one)."""
    if isinstance(event, Head):
        why = ambiguity(event.headers, event.http_version)
        if why is not None:
            raise UpstreamProtocolError(f"{upstream.up.what} answered with ambiguous framing: {why}")
        return event
    raise upstream._not_http(ResponseError("no response"))


async def switch_protocols(ex: Exchange, request: h11.Request, upstream: _Upstream, event: Head,
                           body: asyncio.Task[None] | None) -> None:
    """Step 4a: the upstream answered 101: pass it on and splice raw bytes until either side ends, which ends both
    (as kube-apiserver's upgrade-aware proxy does), within the stream limits."""
    if not is_upgrade(request):
        raise UpstreamProtocolError(f"{upstream.up.what} switched protocols unasked")
    if body is not None:
        await body
    await ex.send(h11.InformationalResponse(status_code=101, headers=event.headers, reason=event.reason))
    assert upstream.response is not None
    leftover = upstream.response.trailing
    limits = StreamLimits(ex.limits.stream_idle_timeout, ex.limits.stream_max_lifetime)
    await splice(ex.reader, ex.writer, upstream.stream, to_stream=ex.switched(), to_client=bytes(leftover),
                 upgraded=True, limits=limits, peer=str(ex.peer), target=upstream.up.authority)


async def relay_body(ex: Exchange, request: h11.Request, upstream: _Upstream, event: Head,
                     body: asyncio.Task[None] | None, location_prefix: str | None) -> None:
    """Step 4b: the response head and body to the client, as they arrive (whatever has arrived goes in one write:
    a small response's head, body and end in one segment)."""
    headers = response_headers(event.headers, location_prefix)
    unframed = close_delimited(request.method, event)
    pending: list[Any] = []
    if unframed:
        await ex.send_unframed_head(event.status_code, event.reason, headers)
    else:
        pending.append(h11.Response(status_code=event.status_code, reason=event.reason, headers=headers))
    while True:
        item = upstream.event()
        if item is NEED_DATA:
            if pending:
                await ex.send(*pending)
                pending = []
            await _read_more(upstream, body)
        elif isinstance(item, bytes):
            if unframed:
                await ex.send_unframed(item)
            else:
                pending.append(h11.Data(data=item))
        elif item is END:
            if not unframed:
                pending.append(h11.EndOfMessage())
                await ex.send(*pending)
            return
        else:
            raise StreamError(f"{upstream.up.what} closed before the response was complete")


async def _read_more(upstream: _Upstream, body: asyncio.Task[None] | None) -> None:
    if body is None or body.done():
        if (failure := _client_failure(body)) is not None:
            raise failure
        await upstream.fill()
        return
    # The upload is still under way: it bounds itself, and ends the exchange if it fails on the client's side.
    task = asyncio.ensure_future(upstream.fill(bounded=False))
    try:
        await _await_with_body(task, body)
        async with asyncio.timeout(upstream.idle):
            await asyncio.shield(task)
    except TimeoutError as exc:
        raise UpstreamTimeout(f"{upstream.up.what} sent nothing for {upstream.idle:g}s") from exc
    finally:
        await _cancel(task)


async def _cancel(task: asyncio.Future[Any] | None) -> None:
    """Cancel ``task`` if it still runs and wait for it; its outcome is retrieved either way."""
    if task is None:
        return
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    elif not task.cancelled():
        task.exception()


async def forward(
    ex: Exchange, request: h11.Request, dialer: Dialer, up: Upstream, target: str,
    *, location_prefix: str | None = None, response_timeout: float = 60.0,
) -> bool:
    """Send ``request`` to ``up`` as ``target`` (path and query) and relay the answer.

    Returns True when the client connection can carry another request; raises :class:`~proxy.errors.ProxyError`.
    """
    stream = await open_upstream(dialer, up)
    upstream = _Upstream(stream, up, ex.limits.idle_timeout)
    body: asyncio.Task[None] | None = None
    try:
        body, event = await send_request(ex, request, upstream, target, ex.peer.address, response_timeout)
        if event.status_code == 101:
            await switch_protocols(ex, request, upstream, event, body)
            return False
        await relay_body(ex, request, upstream, event, body, location_prefix)
        # Answered before the whole request was read, or the request failed: this connection cannot be reused.
        return not is_upgrade(request) and (body is None or (body.done() and body.exception() is None))
    except ProxyError as exc:
        if not isinstance(exc, ClientGone):
            log.info("forwarding failed: %s", exc.message, extra={"peer": str(ex.peer), "target": up.authority})
        raise
    finally:
        await _cancel(body)
        with contextlib.suppress(Exception):
            await stream.close()

"""Forwarding one HTTP/1.1 request to an upstream over a dialed stream, and its response (or upgrade) back.

The exchange runs in steps, each its own function: :func:`send_head`, :func:`start_body` (the request body goes up
in a task of its own while the answer is awaited: an upstream may answer, and stream, before it has read everything),
:func:`receive_head`, then either :func:`relay_body` or :func:`switch_protocols` (a ``101`` turns the connection into
a raw splice for exec, attach and port-forward). Headers and framing are :mod:`proxy.framing`'s.

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
    """h11 client side over a stream; h11's and the clock's failures come out as :mod:`proxy.errors` types."""

    def __init__(self, stream: Stream, up: Upstream, idle: float) -> None:
        self.stream = stream
        self.up = up
        self.idle = idle
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
        self.first = b""
        """The first bytes the upstream sent (to say what it spoke when it was not HTTP)."""

    async def send(self, event: Any) -> None:
        """Send an event; the upstream must take it within ``idle`` seconds."""
        data = self.conn.send(event)
        if data:
            try:
                async with asyncio.timeout(self.idle):
                    await self.stream.write(data)
            except TimeoutError as exc:
                raise UpstreamTimeout(f"{self.up.what} took no data for {self.idle:g}s") from exc

    async def fill(self, bounded: bool = True) -> None:
        """Feed h11 the next chunk from the upstream (``b""`` at its end), within ``idle`` seconds if ``bounded``."""
        try:
            async with asyncio.timeout(self.idle if bounded else None):
                data = await self.stream.read(READ)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{self.up.what} sent nothing for {self.idle:g}s") from exc
        if len(self.first) < 2:
            self.first += data[:2]
        self.conn.receive_data(data)

    def event(self) -> Any:
        """The next parsed event, or ``h11.NEED_DATA``."""
        try:
            return self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise self._not_http(exc) from exc

    def _not_http(self, exc: h11.RemoteProtocolError) -> UpstreamProtocolError:
        what = self.up.what
        if looks_like_tls(self.first):
            return UpstreamProtocolError(f"{what}: the target spoke TLS; use the https: prefix")
        if not self.first:
            hint = "" if self.up.tls is not None else " (if it serves TLS, use the https: prefix)"
            return UpstreamProtocolError(f"{what} closed the connection without answering{hint}")
        return UpstreamProtocolError(f"{what} answered with malformed HTTP: {plain_words(str(exc), from_client=False)}")


async def send_head(upstream: _Upstream, request: h11.Request, target: str, peer_address: str) -> None:
    """Step 1: the request line and headers, re-framed (:func:`proxy.framing.request_headers`)."""
    await upstream.send(h11.Request(method=request.method, target=target.encode(),
                                    headers=request_headers(request, upstream.up.authority, peer_address)))


def start_body(ex: Exchange, request: h11.Request, upstream: _Upstream) -> asyncio.Task[None] | None:
    """Step 2: None when the request has no body (its end is sent at once), else the task sending it up."""
    if ex.empty_body(request):
        upstream.conn.send(h11.EndOfMessage())  # nothing to write for an empty body
        return None
    return asyncio.create_task(_send_body(ex, upstream), name="request body")


async def _send_body(ex: Exchange, upstream: _Upstream) -> None:
    async for chunk in ex.body():
        await upstream.send(h11.Data(data=chunk))
    await upstream.send(h11.EndOfMessage())


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


async def receive_head(upstream: _Upstream, body: asyncio.Task[None] | None, timeout: float) -> Any:
    """Step 3: the response head (1xx other than 101 swallowed), due ``timeout`` seconds after the request's end."""

    async def head() -> Any:
        while True:
            event = upstream.event()
            if event is h11.NEED_DATA:
                await upstream.fill(bounded=False)
            elif isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                continue  # 100 Continue and friends: ours to swallow
            else:
                return event

    if body is None or body.done():
        # Nothing is going up any more (a GET's usual case): the clock runs from now, no task needed.
        if (failure := _client_failure(body)) is not None:
            raise failure
        try:
            async with asyncio.timeout(timeout):
                event = await head()
        except TimeoutError as exc:
            raise UpstreamTimeout(f"{upstream.up.what} did not answer within {timeout:g}s") from exc
    else:
        task = asyncio.ensure_future(head())
        try:
            await _await_with_body(task, body)
            try:
                async with asyncio.timeout(timeout):
                    event = await asyncio.shield(task) if not task.done() else task.result()
            except TimeoutError as exc:
                raise UpstreamTimeout(f"{upstream.up.what} did not answer within {timeout:g}s") from exc
        finally:
            await _cancel(task)
    if isinstance(event, h11.Response | h11.InformationalResponse):
        why = ambiguity(event.headers, event.http_version)
        if why is not None:
            raise UpstreamProtocolError(f"{upstream.up.what} answered with ambiguous framing: {why}")
        return event
    raise upstream._not_http(h11.RemoteProtocolError("no response"))


async def switch_protocols(ex: Exchange, request: h11.Request, upstream: _Upstream, event: Any,
                           body: asyncio.Task[None] | None) -> None:
    """Step 4a: the upstream answered 101: pass it on and splice raw bytes until either side ends, which ends both
    (as kube-apiserver's upgrade-aware proxy does), within the stream limits."""
    if not is_upgrade(request):
        raise UpstreamProtocolError(f"{upstream.up.what} switched protocols unasked")
    if body is not None:
        await body
    await ex.send(h11.InformationalResponse(status_code=101, headers=list(event.headers), reason=event.reason))
    leftover = upstream.conn.trailing_data[0]
    limits = StreamLimits(ex.limits.stream_idle_timeout, ex.limits.stream_max_lifetime)
    await splice(ex.reader, ex.writer, upstream.stream, to_stream=ex.switched(), to_client=bytes(leftover),
                 upgraded=True, limits=limits, peer=str(ex.peer), target=upstream.up.authority)


async def relay_body(ex: Exchange, request: h11.Request, upstream: _Upstream, event: h11.Response,
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
        if item is h11.NEED_DATA:
            if pending:
                await ex.send(*pending)
                pending = []
            await _read_more(upstream, body)
        elif isinstance(item, h11.Data):
            if unframed:
                await ex.send_unframed(item.data)
            else:
                pending.append(h11.Data(data=item.data))
        elif isinstance(item, h11.EndOfMessage):
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
        await send_head(upstream, request, target, ex.peer.address)
        body = start_body(ex, request, upstream)
        event = await receive_head(upstream, body, response_timeout)
        if isinstance(event, h11.InformationalResponse):
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

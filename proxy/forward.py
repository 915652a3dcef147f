"""Forwarding one HTTP/1.1 request to an upstream over a dialed stream, and its response (or upgrade) back.

Hop-by-hop headers (``Connection`` and the headers it names, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``,
``Transfer-Encoding``, ``Upgrade``) are dropped in both directions and the body is re-framed by h11, except that an
upgrade request keeps ``Connection: Upgrade`` and ``Upgrade``. The caller's ``Authorization`` is never passed on:
credentials for the gateway are not credentials for the target.

Bodies stream through in both directions without being collected. If the upstream breaks or ends before its response
is complete, the client connection is aborted: for a chunked response, the final chunk is never sent, so the client
cannot mistake a truncated body for a whole one. A ``101 Switching Protocols`` answer turns the connection into a
raw splice (exec, attach, port-forward over WebSocket or SPDY).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import h11

from proxy.dialer import Dialer, DialError, Stream, StreamError
from proxy.policy import Policy
from proxy.server import ClientGone, Exchange
from proxy.splice import splice
from proxy.tls import TLSStream

log = logging.getLogger("proxy.forward")

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade",
})
NEVER_FORWARD = frozenset({b"authorization", b"host"})
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


async def open_upstream(dialer: Dialer, policy: Policy, up: Upstream) -> Stream:
    """Check policy, dial, and wrap in TLS when asked. Raises :class:`DialError`."""
    policy.check(up.host, up.port)
    stream = await dialer.dial(up.host, up.port)
    if up.tls is not None:
        stream = await TLSStream.connect(stream, up.tls, up.host, up.identities, up.what)
    return stream


def _connection_tokens(headers: Any) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens |= {t.strip().lower() for t in value.split(b",") if t.strip()}
    return tokens


def is_upgrade(request: h11.Request) -> bool:
    return b"upgrade" in _connection_tokens(request.headers) and any(n == b"upgrade" for n, _ in request.headers)


def request_headers(request: h11.Request, up: Upstream, peer_address: str) -> list[tuple[bytes, bytes]]:
    """The headers to send upstream."""
    named = _connection_tokens(request.headers)
    out: list[tuple[bytes, bytes]] = [(b"host", up.authority.encode())]
    forwarded_for = peer_address.rsplit(":", 1)[0] if ":" in peer_address else peer_address
    xff = None
    for name, value in request.headers:
        if name in HOP_BY_HOP or name in NEVER_FORWARD or name in named:
            continue
        if name == b"x-forwarded-for":
            xff = value
            continue
        out.append((name, value))
    if forwarded_for and forwarded_for != "unix":
        out.append((b"x-forwarded-for", (xff + b", " if xff else b"") + forwarded_for.encode()))
    if any(n == b"transfer-encoding" for n, _ in request.headers):
        out.append((b"transfer-encoding", b"chunked"))
    if is_upgrade(request):
        out.append((b"connection", b"Upgrade"))
        out.extend((b"upgrade", v) for n, v in request.headers if n == b"upgrade")
    return out


def response_headers(headers: Any, location_prefix: str | None) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers as the client should get them."""
    named = _connection_tokens(headers)
    out = []
    for name, value in headers:
        if name in HOP_BY_HOP or name in named:
            continue
        if name == b"location" and location_prefix and value.startswith(b"/") and not value.startswith(b"//"):
            value = location_prefix.encode() + value
        out.append((name, value))
    return out


class _Upstream:
    """h11 client side over a stream."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)

    async def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.write(data)

    async def fill(self) -> None:
        """Feed h11 the next chunk from the upstream (``b""`` at its end)."""
        self.conn.receive_data(await self.stream.read(READ))

    async def next(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            await self.fill()


async def forward(
    ex: Exchange, request: h11.Request, dialer: Dialer, policy: Policy, up: Upstream, target: str,
    *, location_prefix: str | None = None, response_timeout: float = 60.0,
) -> bool:
    """Send ``request`` to ``up`` as ``target`` (path and query) and relay the answer.

    Returns True when the client connection can carry another request.
    """
    try:
        stream = await open_upstream(dialer, policy, up)
    except DialError as exc:
        log.info("upstream refused: %s", exc.message, extra={"peer": str(ex.peer), "target": up.authority})
        await ex.error(exc.status, exc.message)
        return False
    upgrade = is_upgrade(request)
    upstream = _Upstream(stream)
    body: asyncio.Task[None] | None = None
    head: asyncio.Future[Any] | None = None
    try:
        await upstream.send(h11.Request(
            method=request.method, target=target.encode(), headers=request_headers(request, up, ex.peer.address),
        ))
        if ex.empty_body(request):
            await upstream.send(h11.EndOfMessage())
            async with asyncio.timeout(response_timeout):
                event = await upstream.next()
        else:
            # The body goes up while we wait for the answer: an upstream may answer (and stream) before it has read
            # everything, and waiting for the whole body first would deadlock once the buffers between us are full.
            body = asyncio.create_task(_send_body(ex, upstream))
            head = asyncio.ensure_future(upstream.next())
            await asyncio.wait({body, head}, return_when=asyncio.FIRST_COMPLETED)
            if not head.done():
                if body.exception() is not None and not isinstance(body.exception(), StreamError):
                    raise body.exception()  # type: ignore[misc]  # the client went away
                # The response timeout counts from the end of the request, as an HTTP client's would.
                async with asyncio.timeout(response_timeout):
                    event = await head
            else:
                event = head.result()
        async with asyncio.timeout(response_timeout):
            while isinstance(event, h11.InformationalResponse) and event.status_code != 101:
                event = await upstream.next()  # 100 Continue and friends: ours to swallow
        if isinstance(event, h11.InformationalResponse):  # 101: the upstream switched protocols
            if not upgrade:
                raise StreamError("upstream switched protocols unasked")
            if body is not None:
                await body
            await ex.send(h11.InformationalResponse(
                status_code=101, headers=list(event.headers), reason=event.reason,
            ))
            leftover = bytes(upstream.conn.trailing_data[0])
            await splice(ex.reader, ex.writer, stream, to_stream=ex.switched(), to_client=leftover)
            return False
        if not isinstance(event, h11.Response):
            raise StreamError("upstream closed the connection without answering")
        # Whatever of the response has arrived goes to the client in one write: the head, and for a small response
        # its whole body and end too.
        events: list[Any] = [h11.Response(
            status_code=event.status_code, reason=event.reason,
            headers=response_headers(event.headers, location_prefix),
        )]
        while True:
            event = upstream.conn.next_event()
            if event is h11.NEED_DATA:
                if events:
                    await ex.send(*events)
                    events = []
                await upstream.fill()
            elif isinstance(event, h11.Data):
                events.append(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                events.append(h11.EndOfMessage())
                await ex.send(*events)
                break
            else:
                raise StreamError("upstream closed before the response was complete")
        if body is None:
            return not upgrade
        if not body.done():
            return False  # answered before reading the whole request: this connection cannot be reused
        if body.exception() is not None:
            return False
    except TimeoutError:
        await ex.error(504, f"{up.what} did not answer within {response_timeout:g}s")
        return False
    except (StreamError, h11.RemoteProtocolError) as exc:
        log.warning("upstream failed mid-request: %s", exc, extra={"peer": str(ex.peer), "target": up.authority})
        if ex.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await ex.error(502, f"{up.what} failed: {exc}")
        else:
            ex.abort()  # the response is under way: cut it rather than end it cleanly
        return False
    except ClientGone:
        return False
    finally:
        for task in (body, head):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            elif task is not None and not task.cancelled():
                task.exception()  # retrieved: its failure was handled above
        with contextlib.suppress(Exception):
            await stream.close()
    return not upgrade


async def _send_body(ex: Exchange, upstream: _Upstream) -> None:
    async for chunk in ex.body():
        await upstream.send(h11.Data(data=chunk))
    await upstream.send(h11.EndOfMessage())

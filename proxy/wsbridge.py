"""WebSocket clients to SPDY kubelets, as kube-apiserver translates for kubelets without WebSocket v5.

kubectl 1.3x speaks WebSocket first; a kubelet before ``ExtendWebSocketsToKubelet`` accepts only SPDY for what it
asks. The gateway answers the client's WebSocket handshake itself (wsproto, sans-IO, after the upgrade) and upgrades
to the kubelet with SPDY/3.1:

* exec and attach offering ``v5.channel.k8s.io``: a stream translator. One SPDY stream per channel towards the
  kubelet (``X-Stream-Protocol-Version: v4.channel.k8s.io``; ``error``, ``stdin`` if asked, ``stdout``, ``stderr``
  unless a tty, ``resize`` with a tty); a client message ``[ch] + data`` goes to channel ``ch``'s stream (0 stdin,
  4 resize; any other channel is a protocol error), ``[255, 0]`` half-closes stdin (FIN); bytes from the kubelet's
  ``stdout``/``stderr``/``error`` streams go to the client as ``[1|2|3] + data``. Once the kubelet's streams have all
  ended (the final Status is on ``error``), the WebSocket is closed normally (1000); a session that breaks closes it
  with 1011, never 1000.
* port-forward offering ``SPDY/3.1+portforward.k8s.io``: a tunnel. The WebSocket's binary messages carry the client's
  SPDY byte stream; the gateway upgrades to the kubelet with ``X-Stream-Protocol-Version: portforward.k8s.io`` and
  splices bytes, never parsing the SPDY.

Bounded: a client message is streamed a fragment at a time (no message is buffered whole), a close message
``[255, ch]`` is exactly 2 bytes, text messages are refused (1003), and each direction waits for the other side to
take its bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging

import h11
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.utilities import RemoteProtocolError

from proxy.dialer import Stream
from proxy.errors import BadRequest, ClientGone, ProxyError, StreamError
from proxy.exchange import Exchange
from proxy.spdy import Session, SPDYError, SPDYStream

log = logging.getLogger("proxy.ws")

V5 = "v5.channel.k8s.io"
TUNNEL = "SPDY/3.1+portforward.k8s.io"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
READ = 64 * 1024
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
NORMAL, PROTOCOL_ERROR, UNSUPPORTED, INTERNAL = 1000, 1002, 1003, 1011


def offered(request: h11.Request) -> list[str]:
    """The WebSocket subprotocols a request offers (empty unless it is a WebSocket upgrade)."""
    if not any(n == b"upgrade" and v.strip().lower() == b"websocket" for n, v in request.headers):
        return []
    return [p.strip() for n, v in request.headers if n == b"sec-websocket-protocol"
            for p in v.decode("latin-1").split(",") if p.strip()]


def accept_headers(request: h11.Request, protocol: str) -> list[tuple[bytes, bytes]]:
    """The ``101`` headers answering a WebSocket handshake; :class:`BadRequest` for a malformed one."""
    keys = [v for n, v in request.headers if n == b"sec-websocket-key"]
    versions = [v.strip() for n, v in request.headers if n == b"sec-websocket-version"]
    if request.method != b"GET" or len(keys) != 1 or versions != [b"13"]:
        raise BadRequest("a WebSocket upgrade is a GET with one Sec-WebSocket-Key and Sec-WebSocket-Version 13")
    try:
        if len(base64.b64decode(keys[0].strip(), validate=True)) != 16:
            raise ValueError
    except ValueError:
        raise BadRequest("Sec-WebSocket-Key must be 16 bytes in base64") from None
    digest = base64.b64encode(hashlib.sha1(keys[0].strip() + GUID).digest())
    return [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-WebSocket-Accept", digest),
            (b"Sec-WebSocket-Protocol", protocol.encode())]


class ClientSocket:
    """The client's WebSocket after the 101: messages in (as fragments), binary messages out."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.ws = Connection(ConnectionType.SERVER, trailing_data=ex.switched())
        self.closed = False
        self._in_message = False

    def _write(self, event: Event) -> None:
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self.ex.writer.write(self.ws.send(event))

    async def send(self, data: bytes) -> None:
        """One binary message (waits while the client is not reading). Raises :class:`ClientGone`."""
        self._write(BytesMessage(data=data))
        try:
            await self.ex.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ClientGone(str(exc)) from exc

    async def fragments(self) -> tuple[bytes, bool, bool] | None:
        """The next (data, first fragment of its message, last fragment); None once the client closed."""
        while True:
            for event in self.ws.events():
                if isinstance(event, BytesMessage):
                    first, self._in_message = not self._in_message, not event.message_finished
                    return bytes(event.data), first, event.message_finished
                if isinstance(event, Ping):
                    self._write(event.response())
                elif isinstance(event, CloseConnection):
                    self._write(event.response())
                    return None
                elif isinstance(event, TextMessage):
                    raise _Close(UNSUPPORTED, "text messages are not part of this protocol")
            try:
                data = await self.ex.reader.read(READ)
            except (ConnectionError, OSError) as exc:
                raise ClientGone(str(exc)) from exc
            if not data:
                return None
            try:
                self.ws.receive_data(data)
            except RemoteProtocolError as exc:
                raise _Close(PROTOCOL_ERROR, f"bad WebSocket data: {exc}") from exc

    async def close(self, code: int, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self._write(CloseConnection(code=code, reason=reason[:100]))
            with contextlib.suppress(ConnectionError, OSError):
                await self.ex.writer.drain()


class _Close(Exception):
    """End the WebSocket with ``code``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


async def _pump_down(stream: SPDYStream, channel: int, sock: ClientSocket) -> None:
    prefix = bytes([channel])
    while data := await stream.read():
        await sock.send(prefix + data)


async def _pump_up(sock: ClientSocket, streams: dict[int, SPDYStream]) -> None:
    channel: int | None = None
    closing = b""
    while (item := await sock.fragments()) is not None:
        data, first, last = item
        if first:
            if not data:
                raise _Close(PROTOCOL_ERROR, "a message needs a channel byte")
            channel, data, closing = data[0], data[1:], b""
        if channel == CLOSE:
            closing += data
            if len(closing) > 1 or (last and len(closing) != 1):
                raise _Close(PROTOCOL_ERROR, "a close message is exactly [255, channel]")
            if last:
                target = streams.get(closing[0])
                if target is not None and not target.local_closed:
                    await target.close()
            continue
        target = streams.get(channel) if channel is not None else None
        if target is None:
            raise _Close(PROTOCOL_ERROR, f"no writable channel {channel}")
        if data and not target.local_closed:
            await target.write(data)


async def translate_exec(ex: Exchange, upstream: Stream, leftover: bytes, flags: set[str]) -> None:
    """Run the v5 -> SPDY v4 translator after both upgrades; returns when the session is over. ``flags``: which of
    the kubelet's ``input``, ``output``, ``error``, ``tty`` the request set (one stream each, as client-go opens)."""
    sock = ClientSocket(ex)
    session = Session(upstream, client=True, leftover=leftover)
    outcome, reason = INTERNAL, "the kubelet's session broke"
    tasks: list[asyncio.Task[None]] = []
    try:
        tty = "tty" in flags
        names = ["error", *(["stdin"] if "input" in flags else []), *(["stdout"] if "output" in flags else []),
                 *(["stderr"] if "error" in flags and not tty else []), *(["resize"] if tty else [])]
        opened = {name: await session.open_stream({"streamtype": [name]}) for name in names}
        channels = {"stdin": STDIN, "stdout": STDOUT, "stderr": STDERR, "error": ERROR, "resize": RESIZE}
        writable = {channels[n]: s for n, s in opened.items() if n in ("stdin", "resize")}
        downs = [asyncio.create_task(_pump_down(s, channels[n], sock)) for n, s in opened.items()
                 if n in ("stdout", "stderr", "error")]
        up = asyncio.create_task(_pump_up(sock, writable))
        tasks = [*downs, up]
        waiting: set[asyncio.Task[None]] = {*downs, up}
        while not up.done() and not all(t.done() for t in downs):
            _, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if all(t.done() for t in downs):
            failures = [t.exception() for t in downs if t.exception() is not None]
            if not failures:
                outcome, reason = NORMAL, ""
            elif all(isinstance(f, ClientGone) for f in failures):
                outcome = 0
        elif up.done():
            exc = up.exception()
            if isinstance(exc, _Close):
                outcome, reason = exc.code, exc.reason
            else:  # the client closed or went away: nothing left to tell it
                outcome = 0
    except (SPDYError, StreamError, ConnectionError, OSError, TimeoutError) as exc:
        log.info("exec translation failed: %s", exc, extra={"peer": str(ex.peer)})
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
        if outcome:
            await sock.close(outcome, reason)


async def tunnel(ex: Exchange, upstream: Stream, leftover: bytes) -> None:
    """Splice the client's WebSocket binary messages with the kubelet's raw SPDY connection."""
    sock = ClientSocket(ex)

    async def down() -> None:
        if leftover:
            await sock.send(leftover)
        while data := await upstream.read(READ):
            await sock.send(data)

    async def up() -> None:
        while (item := await sock.fragments()) is not None:
            if item[0]:
                await upstream.write(item[0])

    tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
    code = NORMAL
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if isinstance(exc, _Close):
                code = exc.code
            elif isinstance(exc, StreamError | ProxyError):
                code = INTERNAL
            if task is tasks[1] and exc is None:
                code = 0  # the client closed: answered already
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await upstream.close()
        if code:
            await sock.close(code)

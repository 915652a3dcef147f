"""A small HTTP/1.1 server core for the fronts: listeners, limits, and request heads parsed with h11.

aiohttp's web application cannot serve CONNECT or hand over a raw upgraded connection, which are the two things a
proxy front needs, so the fronts run on plain asyncio streams with h11 doing the HTTP/1.1 parsing and framing.
Each accepted connection becomes an :class:`Exchange`; a front's handler gets it once per request.

Limits protect the gateway from slow or hostile clients: a cap on open connections (beyond it: 503 and close), a
header-size limit (431), a time limit for receiving a request head (408, slowloris), and an idle limit between
requests on a kept-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import h11

from proxy.accept import accept_forever, tcp_listener, unix_listener
from proxy.unixsock import OwnedSocket, prepare_socket_path

log = logging.getLogger("proxy.server")
audit = logging.getLogger("proxy.audit")

READ = 256 * 1024
REFUSING = 64
"""Connections past ``max_connections`` that may be open at once while they are told 503."""


@dataclass(frozen=True)
class Limits:
    """Per-listener protections."""

    max_connections: int = 1024
    max_header_bytes: int = 16 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 60.0


class ClientGone(Exception):
    """The client closed or broke the connection."""


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, for logs and audit: a certificate subject or unix credentials."""

    address: str
    identity: str | None = None

    def __str__(self) -> str:
        return f"{self.identity}@{self.address}" if self.identity else self.address


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
                self._received += len(data)
                self.conn.receive_data(data)
                event = self.conn.next_event()
        return event

    async def request(self) -> h11.Request | None:
        """The next request head, or None when the client is done. Errors are answered here."""
        first = self._cycles == 0
        buffered = len(self.conn.trailing_data[0])
        self._received = 0
        try:
            # The first head must arrive within header_timeout; a kept-alive connection may idle longer first.
            event = await self._next(self.limits.header_timeout if first else self.limits.idle_timeout)
        except TimeoutError:
            if first:
                await self.error(408, "request head not received in time")
            return None
        except h11.RemoteProtocolError as exc:
            await self.error(exc.error_status_hint, _protocol_message(exc))
            return None
        except ClientGone:
            return None
        if isinstance(event, h11.Request):
            # h11 bounds only a head that is still incomplete; one that arrived whole in a read is measured here.
            if buffered + self._received - len(self.conn.trailing_data[0]) > self.limits.max_header_bytes:
                await self.error(431, "request header fields too large")
                return None
            if event.http_version not in (b"1.0", b"1.1"):
                await self.error(505, f"HTTP/{event.http_version.decode('ascii', 'replace')} is not supported")
                return None
            return event
        return None  # ConnectionClosed, or anything unexpected: done

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, as it arrives."""
        while True:
            try:
                event = await self._next(self.limits.idle_timeout)
            except TimeoutError as exc:
                raise ClientGone("request body stalled") from exc
            except h11.RemoteProtocolError as exc:
                raise ClientGone(f"bad request body: {exc}") from exc
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                return
            else:
                raise ClientGone("connection closed during the request body")

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
            self.writer.write(data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ClientGone(str(exc)) from exc

    async def error(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        """Answer with ``status`` and a one-line text body, and close after it."""
        body = (message.rstrip() + "\n").encode("utf-8", "replace")
        head = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
                ("Connection", "close"), *(headers or [])]
        try:
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                await self.send(h11.Response(status_code=status, headers=head, reason=reason_phrase(status)),
                                h11.Data(data=body), h11.EndOfMessage())
            elif self.conn.our_state is h11.ERROR or self.conn.their_state is h11.ERROR:
                # h11 refuses to speak after a protocol error; the status line is still owed to the client.
                reason = reason_phrase(status).decode()
                lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in head), "", ""]
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

    def abort(self) -> None:
        """Drop the connection without a clean end (the client must not take a truncated body for a whole one)."""
        self.writer.transport.abort()


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for ``status`` (h11 sends none unless told)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Error"


def _protocol_message(exc: h11.RemoteProtocolError) -> str:
    if exc.error_status_hint == 431:
        return "request header fields too large"
    return f"malformed request: {exc}"


Handler = Callable[[Exchange], Awaitable[None]]


class Server:
    """Serves one front's handler on any number of listeners, with :class:`Limits`."""

    def __init__(self, name: str, handler: Handler, limits: Limits) -> None:
        self.name = name
        self._handler = handler
        self.limits = limits
        self._listeners: list[socket.socket] = []
        self._accepting: set[asyncio.Task[None]] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._socket_paths: list[OwnedSocket] = []
        self.ports: list[int] = []

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def listen_tcp(self, host: str, port: int, tls: ssl.SSLContext | None) -> int:
        """Listen on TCP (TLS when ``tls`` is given); returns the bound port."""
        listener = await tcp_listener(host, port)
        bound = int(listener.getsockname()[1])
        self._listen(listener, tls)
        self.ports.append(bound)
        log.info("%s listening on %s:%d%s", self.name, host, bound, " (TLS)" if tls else "")
        return bound

    async def listen_unix(self, path: Path, mode: int) -> None:
        """Listen on a unix socket created with ``mode`` (its permissions are the access control)."""
        prepare_socket_path(path)
        listener = unix_listener(path, mode)
        self._socket_paths.append(OwnedSocket.of(path))
        self._listen(listener, None)
        log.info("%s listening on unix:%s (mode %04o)", self.name, path, mode)

    def _listen(self, listener: socket.socket, tls: ssl.SSLContext | None) -> None:
        # Every listener runs proxy.accept's loop: a failed accept (out of descriptors) is logged and retried, never
        # fatal. TLS is handshaken here rather than by asyncio's TLS server, which drops a failed handshake without a
        # word: a refused client certificate belongs in the audit log.
        self._listeners.append(listener)
        admit = functools.partial(self._admit, tls=tls)
        self._accepting.add(asyncio.create_task(accept_forever(self.name, listener, admit),
                                                name=f"{self.name}:accept"))

    def _admit(self, conn: socket.socket, tls: ssl.SSLContext | None) -> None:
        # Connections (TLS handshakes under way included) are bounded. Past max_connections a plain connection is
        # answered 503 (a few at a time: REFUSING); beyond that, or with no TLS yet to speak, it is closed at once.
        if len(self._handshakes) >= self.limits.max_connections + (0 if tls else REFUSING):
            log.warning("%s: %d connections (limits.max_connections); closing a new one", self.name,
                        len(self._handshakes))
            conn.close()
            return
        task = asyncio.create_task(self._handshake(conn, tls))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket, tls: ssl.SSLContext | None) -> None:
        """TLS server handshake (if any) within ``header_timeout``, then serve; a failed one is audited and dropped."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            peername = conn.getpeername()
            peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else "unix"
        except OSError:
            peer = "unknown"
        try:
            if tls is None:
                transport, _ = await loop.connect_accepted_socket(lambda: protocol, conn)
            else:
                transport, _ = await loop.connect_accepted_socket(
                    lambda: protocol, conn, ssl=tls, ssl_handshake_timeout=self.limits.header_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            # A refused certificate is a warning; a peer that hung up or stalled (port scans, TCP health checks) is not.
            level = logging.WARNING if "CERTIFICATE" in str(why).upper() else logging.INFO
            audit.log(level, "%s: TLS handshake refused: %s", self.name, why, extra={"peer": peer, "front": self.name})
            conn.close()
            return
        except asyncio.CancelledError:  # shutting down mid-handshake
            conn.close()
            raise
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self._accept(reader, writer)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # asyncio runs this as a task per connection; track it so shutdown can drain or cancel it.
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # Only close() cancels these top-level tasks. Ending quietly matters: Python 3.11's stream callback
            # logs a cancelled connection task as an error with a traceback.
            pass
        finally:
            self._tasks.discard(task)
            self._writers.discard(writer)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        ex = Exchange(reader, writer, self.limits, peer)
        try:
            if len(self._tasks) > self.limits.max_connections:
                log.warning("%s: connection limit (%d) reached; refusing %s", self.name,
                            self.limits.max_connections, peer)
                await ex.error(503, "too many connections")
                return
            await self._handler(ex)
        except ClientGone:
            pass
        except Exception:
            log.exception("%s: handler failed", self.name)
            await ex.error(500, "internal error")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def stop_accepting(self) -> None:
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)  # off the loop's selector before the close
        self._accepting.clear()
        for listener in self._listeners:
            listener.close()
        self._listeners.clear()
        for owned in self._socket_paths:
            owned.remove()
        self._socket_paths.clear()

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting; let open connections finish for up to ``grace`` seconds, then cut them."""
        await self.stop_accepting()
        if self._tasks and grace > 0:
            await asyncio.wait(set(self._tasks), timeout=grace)
        if self._writers:
            log.warning("%s: %d connections still open after the %g s grace period: cutting them", self.name,
                        len(self._writers), grace, extra={"connections": len(self._writers)})
        for writer in list(self._writers):
            writer.transport.abort()
        for task in [*self._tasks, *self._handshakes]:
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)


def _peer(writer: asyncio.StreamWriter) -> Peer:
    sslobj = writer.get_extra_info("ssl_object")
    identity = None
    if sslobj is not None:
        cert = sslobj.getpeercert()
        if cert:
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        identity = f"cn={value}"
    addr = writer.get_extra_info("peername")
    if isinstance(addr, tuple):
        return Peer(f"{addr[0]}:{addr[1]}", identity)
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        with contextlib.suppress(OSError):
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            return Peer("unix", f"uid={uid},pid={pid}")
    return Peer("unix")

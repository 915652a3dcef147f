"""A small HTTP/1.1 server core for the fronts: listeners, limits, and request heads parsed with h11.

aiohttp's web application cannot serve CONNECT or hand over a raw upgraded connection, which are the two things a
proxy front needs, so the fronts run on plain asyncio streams with h11 doing the HTTP/1.1 parsing and framing.
Each accepted connection becomes an :class:`~proxy.exchange.Exchange`, which the front's handler is given.

Limits protect the gateway from slow or hostile clients: a cap on open connections (beyond it: 503 and close), a
header-size limit (431), a time limit for receiving a request head (408, slowloris), and an idle limit between
requests on a kept-alive connection and between reads of a request body. A request whose body length could be read
two ways is refused with 400 before a front sees it (:mod:`proxy.framing`).

Handlers raise the typed errors of :mod:`proxy.errors`; the server answers them in one place
(:func:`proxy.failures.answer`) and closes the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from netnames import peer_cred
from proxy.accept import accept_forever, tcp_listener, unix_listener
from proxy.errors import ClientGone, Overcrowded
from proxy.exchange import Exchange, reason_phrase
from proxy.failures import answer
from proxy.splice import reset
from proxy.unixsock import OwnedSocket, prepare_socket_path

__all__ = ["ClientGone", "Exchange", "Handler", "Limits", "Peer", "Server", "reason_phrase"]

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
    stream_idle_timeout: float = 14400.0
    stream_max_lifetime: float = 0.0


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, for logs and audit: a certificate subject or unix credentials."""

    address: str
    identity: str | None = None

    def __str__(self) -> str:
        return f"{self.identity}@{self.address}" if self.identity else self.address


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

    async def listen_unix(self, path: Path, mode: int, group: int | None = None) -> None:
        """Listen on a unix socket created with ``mode`` and owned by ``group`` (when given): its permissions are
        the first access control, a front's own checks of the peer's credentials the second."""
        prepare_socket_path(path)
        listener = unix_listener(path, mode if group is None else mode & 0o700)
        if group is not None:  # the group's bits only once the group is the one meant
            os.chown(path, -1, group)
            os.chmod(path, mode)
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
                raise Overcrowded(f"too many connections (limits.max_connections = {self.limits.max_connections})")
            await self._handler(ex)
        except Exception as exc:
            await answer(ex, exc, self.name)
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
            reset(writer)  # a stream cut at the end of the grace period is cut, not ended
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
    cred = peer_cred(writer.get_extra_info("socket"))
    return Peer("unix", f"uid={cred.uid},pid={cred.pid}" if cred is not None else None)

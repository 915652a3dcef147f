"""The certificates API's TCP listener, bounded by ``[limits]`` like the fronts.

aiohttp's own site accepts without limit and waits forever for a first request, so 2,000 idle connections could
take every file descriptor the daemon has. This listener runs :func:`proxy.accept.accept_forever` (a failed accept
is logged and retried, never fatal) and hands each connection to the aiohttp application's protocol:

- at most ``max_connections`` connections (TLS handshakes under way included); beyond, a new one is closed at once
  and audited (there is no TLS yet to answer 503 on);
- the TLS handshake and the first request head must arrive within ``header_timeout`` (else 408 and close);
- a kept-alive connection may idle ``idle_timeout`` between requests (aiohttp's keep-alive timer), and a request,
  its body included, must be handled within ``idle_timeout`` (else 408 and close: a stalled body).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.accept import accept_forever, tcp_listener
from proxy.server import Limits

log = logging.getLogger("tunneld.certs")
audit = logging.getLogger("certs.audit")

REQUEST_TIMEOUT = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 34\r\n"
                   b"Connection: close\r\n\r\nrequest head not received in time\n")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    response = web.json_response(body, status=code)
    response.force_close()
    return response


class APIListener:
    """Serves an aiohttp application on one TCP listener (TLS when given a context) within :class:`Limits`."""

    def __init__(self, app: web.Application, limits: Limits, name: str = "certificates API") -> None:
        self.name = name
        self.limits = limits

        @web.middleware
        async def bounded(request: web.Request, handler: Handler) -> web.StreamResponse:
            return await self._bounded(request, handler)
        app.middlewares.insert(0, bounded)  # outermost: it sees every request first
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=limits.idle_timeout)
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._head_due: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}
        self._tls: ssl.SSLContext | None = None
        self.port: int | None = None

    @property
    def connections(self) -> int:
        """Open connections, TLS handshakes under way included."""
        server = self._runner.server
        return len(self._handshakes) + (len(server.connections) if server is not None else 0)

    async def start(self, host: str, port: int, context: ssl.SSLContext | None) -> None:
        """Bind and serve; :attr:`port` holds the bound port (useful with port 0)."""
        await self._runner.setup()
        self._tls = context
        self._listener = await tcp_listener(host, port)
        self.port = int(self._listener.getsockname()[1])
        self._accepting = asyncio.create_task(accept_forever(self.name, self._listener, self._admit),
                                              name=f"{self.name}:accept")
        log.info("certificates API listening", extra={"host": host, "port": self.port, "tls": context is not None})

    def _admit(self, conn: socket.socket) -> None:
        if self.connections >= self.limits.max_connections:
            audit.warning("%s: %d connections (limits.max_connections); closing a new one", self.name,
                          self.connections, extra={"front": self.name})
            conn.close()
            return
        task = asyncio.create_task(self._handshake(conn))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            peername = conn.getpeername()
            peer = f"{peername[0]}:{peername[1]}"
        except OSError:
            peer = "unknown"
        try:
            if self._tls is None:
                transport, _ = await loop.connect_accepted_socket(self._runner.server, conn)  # type: ignore[arg-type]  # aiohttp's Server is a protocol factory
            else:
                transport, _ = await loop.connect_accepted_socket(
                    self._runner.server, conn, ssl=self._tls,  # type: ignore[arg-type]  # as above
                    ssl_handshake_timeout=self.limits.header_timeout)
        except (ssl.SSLError, OSError, TimeoutError) as exc:
            why = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
            level = logging.WARNING if "CERTIFICATE" in str(why).upper() else logging.INFO
            audit.log(level, "%s: TLS handshake refused: %s", self.name, why, extra={"peer": peer, "front": self.name})
            conn.close()
            return
        except asyncio.CancelledError:
            conn.close()
            raise
        left = max(0.0, self.limits.header_timeout - (loop.time() - started))
        self._head_due[transport] = loop.call_later(left, self._head_late, transport, peer)

    def _head_late(self, transport: asyncio.BaseTransport, peer: str) -> None:
        self._head_due.pop(transport, None)
        if transport.is_closing():
            return
        audit.info("%s: request head not received in time; closing", self.name,
                   extra={"peer": peer, "front": self.name})
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(REQUEST_TIMEOUT)
        transport.close()

    async def _bounded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.transport is not None:
            due = self._head_due.pop(request.transport, None)
            if due is not None:
                due.cancel()
        try:
            async with asyncio.timeout(self.limits.idle_timeout) as deadline:
                return await handler(request)
        except TimeoutError:
            if not deadline.expired():
                raise
            audit.info("%s: %s %s not handled within idle_timeout (a stalled body?); closing", self.name,
                       request.method, request.path, extra={"peer": request.remote, "front": self.name})
            return _status(408, "Timeout", "request not completed in time")

    async def stop(self) -> None:
        """Close the listener and open connections."""
        if self._accepting is not None:
            self._accepting.cancel()
            await asyncio.gather(self._accepting, return_exceptions=True)
            self._accepting = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
        for due in self._head_due.values():
            due.cancel()
        self._head_due.clear()
        await self._runner.cleanup()

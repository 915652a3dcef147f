"""What runs inside a simulated pod: an HTTP app, the same app over HTTPS, and a TCP echo.

Pod port :data:`HTTP_PORT` (8080) serves the HTTP app, :data:`HTTPS_PORT` (8443) the same app over TLS (when the pod
has a serving context) and :data:`ECHO_PORT` (7777) a TCP echo that honours half-close. Other ports a pod declares
have nothing listening behind them (useful to see a refused connection).

HTTP app, any method:

* ``POST /echo`` -> the request body, streamed back as it arrives (``application/octet-stream``);
* ``GET /stream?n=N&interval=S`` -> chunked, N lines ``chunk i\\n`` with S seconds between them;
* ``GET /redirect`` -> ``302`` with ``Location: /target``;
* ``GET /big?bytes=N`` -> N bytes of :func:`pattern` with ``Content-Length`` (N up to 1 GiB);
* anything else -> JSON ``{"pod", "namespace", "node", "method", "path", "query", "headers"}``: ``path`` is the raw
  request target as received (with its query), ``query`` the raw (still encoded) query string, ``headers`` a dict
  with lower-case names (repeated headers joined with ``", "``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from dataclasses import dataclass, field

from aiohttp import web

HTTP_PORT, HTTPS_PORT, ECHO_PORT = 8080, 8443, 7777
DEFAULT_PORTS = (HTTP_PORT, HTTPS_PORT, ECHO_PORT)
MAX_BIG = 1 << 30
MAX_LINES = 100_000
MAX_INTERVAL = 10.0
READ = 64 * 1024
_BLOCK = bytes(i % 251 for i in range(251 * 1024))  # a whole number of periods: blocks join seamlessly


def pattern(n: int) -> bytes:
    """The ``/big`` body: ``bytes(i % 251 for i in range(n))``."""
    whole, rest = divmod(n, len(_BLOCK))
    return _BLOCK * whole + _BLOCK[:rest]


def _number(request: web.Request, key: str, default: float, maximum: float) -> float:
    raw = request.query.get(key)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{key}: not a number\n") from None
    if not 0 <= value <= maximum:
        raise web.HTTPBadRequest(text=f"{key}: must be between 0 and {maximum:g}\n")
    return value


@dataclass(frozen=True)
class PodIdentity:
    """Which pod an app answers for."""

    node: str
    namespace: str
    name: str


def make_app(pod: PodIdentity) -> web.Application:
    """The pod's HTTP application (served on both the HTTP and the HTTPS port)."""

    async def info(request: web.Request) -> web.Response:
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        return web.json_response({
            "pod": pod.name, "namespace": pod.namespace, "node": pod.node, "method": request.method,
            "path": request.raw_path, "query": request.raw_path.partition("?")[2], "headers": headers,
        })

    async def echo(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.content_length is not None:
            resp.content_length = request.content_length
        await resp.prepare(request)
        async for chunk in request.content.iter_chunked(READ):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def stream(request: web.Request) -> web.StreamResponse:
        n = int(_number(request, "n", 10, MAX_LINES))
        interval = _number(request, "interval", 0.1, MAX_INTERVAL)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(n):
            if i:
                await asyncio.sleep(interval)
            await resp.write(f"chunk {i}\n".encode())
        await resp.write_eof()
        return resp

    async def big(request: web.Request) -> web.StreamResponse:
        n = int(_number(request, "bytes", 0, MAX_BIG))
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = n
        await resp.prepare(request)
        view = memoryview(_BLOCK)
        left = n
        while left > 0:
            chunk = view[: min(left, len(_BLOCK))]
            await resp.write(chunk.tobytes())
            left -= len(chunk)
        await resp.write_eof()
        return resp

    async def dispatch(request: web.Request) -> web.StreamResponse:
        route = (request.method, request.path)
        if route == ("POST", "/echo"):
            return await echo(request)
        if route == ("GET", "/stream"):
            return await stream(request)
        if route == ("GET", "/redirect"):
            raise web.HTTPFound("/target")
        if route == ("GET", "/big"):
            return await big(request)
        return await info(request)

    app = web.Application(client_max_size=MAX_BIG)
    app.router.add_route("*", "/{tail:.*}", dispatch)
    return app


class _EchoServer:
    """TCP echo: every byte back; after the client's EOF, finish echoing and close."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while data := await reader.read(READ):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self.writers):
            writer.close()
        if self.server is not None:
            await self.server.wait_closed()


def bound_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket bound to ``host:port`` (port 0: an ephemeral port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class PodApps:
    """One pod's apps. ``listening`` maps each served pod port to where it really listens (after :meth:`start`).

    With ``bind_on_pod_ip`` the apps listen on ``pod_ip:port`` (inside a network namespace holding that address);
    otherwise on ``host`` with ephemeral ports.
    """

    pod: PodIdentity
    pod_ip: str
    ports: list[int]
    host: str
    tls: ssl.SSLContext | None = None
    bind_on_pod_ip: bool = False
    listening: dict[int, tuple[str, int]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None
    _echo: _EchoServer | None = None

    def _socket(self, port: int) -> socket.socket:
        sock = bound_socket(self.pod_ip, port) if self.bind_on_pod_ip else bound_socket(self.host, 0)
        self.listening[port] = sock.getsockname()[:2]
        return sock

    async def start(self) -> None:
        """Bind and serve every app the pod's ports call for."""
        web_ports = [p for p in (HTTP_PORT, HTTPS_PORT) if p in self.ports and (p == HTTP_PORT or self.tls)]
        try:
            if web_ports:
                # A handler whose client went away is cancelled, as a real server stops at its next write: a paced
                # /stream must not outlive the gateway's channel by its whole interval.
                self._runner = web.AppRunner(make_app(self.pod), access_log=None, shutdown_timeout=1.0,
                                             handler_cancellation=True)
                await self._runner.setup()
                for port in web_ports:
                    tls = self.tls if port == HTTPS_PORT else None
                    await web.SockSite(self._runner, self._socket(port), ssl_context=tls).start()
            if ECHO_PORT in self.ports:
                self._echo = _EchoServer()
                self._echo.server = await asyncio.start_server(self._echo.handle, sock=self._socket(ECHO_PORT))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop every app (open connections are cut)."""
        if self._echo is not None:
            await self._echo.close()
            self._echo = None
        if self._runner is not None:
            with contextlib.suppress(Exception):
                await self._runner.cleanup()
            self._runner = None
        self.listening.clear()

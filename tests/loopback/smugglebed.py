"""A proxy front over a plain TCP dialer, with two loopback upstreams on one "node": a raw one that records exactly
the bytes the gateway forwarded and answers with whatever bytes a test gives it, and a strict HTTP server (aiohttp)
that records each request it parsed."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web

from proxy.apiproxy import APIProxyFront
from proxy.authn import UNAUTHENTICATED_GROUP, Authenticator
from proxy.authz import ANY, Authorizer, Rule
from proxy.dialer import TCPDialer
from proxy.directory import Directory, NodeInfo
from proxy.policy import Policy, PolicyDialer, PortSet
from proxy.server import Limits, Server
from proxy.tls import client_context

from .conftest import next_base

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class RawUpstream:
    """Records every byte of each connection; answers ``reply`` once it has a request head (``answer``), or only
    records until the gateway closes (``silent``). ``then``: ``close``, ``reset`` (RST) or ``hold`` after replying."""

    mode: str = "answer"
    reply: bytes | list[bytes] = OK
    then: str = "close"
    received: list[bytes] = field(default_factory=list)
    connections: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    replied: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        data = bytearray()
        try:
            async with asyncio.timeout(10):
                while self.mode == "answer" and b"\r\n\r\n" not in data and b"\n\n" not in data:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    data += chunk
                if self.mode == "answer":
                    for piece in [self.reply] if isinstance(self.reply, bytes) else self.reply:
                        writer.write(piece)
                        await writer.drain()
                        await asyncio.sleep(0.05)  # separate segments: the gateway may relay a head before the rest
                    self.replied.set()
                    if self.then == "hold":
                        await self.release.wait()
                    elif self.then == "reset":
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.transport.abort()
                        return
                    if self.then == "close":
                        writer.close()
                while chunk := await reader.read(65536):
                    data += chunk
        except (TimeoutError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.received.append(bytes(data))
            writer.close()


@dataclass
class Bed:
    raw: RawUpstream
    raw_port: int
    strict_port: int
    strict_seen: list[dict[str, object]]
    proxy_port: int
    proxy: Server

    def url(self, port: int, path: str = "/x") -> str:
        return f"/api/v1/nodes/node-a:{port}/proxy{path}"


def _strict_app(seen: list[dict[str, object]]) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        seen.append({"method": request.method, "headers": list(request.raw_headers), "body": body})
        return web.Response(body=b"seen")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@contextlib.asynccontextmanager
async def smuggle_bed(idle_timeout: float = 5.0) -> AsyncIterator[Bed]:
    address = next_base()
    raw = RawUpstream()
    raw_server = await asyncio.start_server(raw.handle, address, 0)
    raw_port = raw_server.sockets[0].getsockname()[1]
    seen: list[dict[str, object]] = []
    runner = web.AppRunner(_strict_app(seen), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, address, 0)
    await site.start()
    strict_port = runner.addresses[0][1]
    policy = Policy(node_hosts={"node-a": 10250, address: 10250}, node_ports=PortSet.parse([raw_port, strict_port]))
    dialer = PolicyDialer(TCPDialer(timeout=5), policy)
    # Framing is what these tests are about, byte for byte: the front runs as insecure_anonymous_loopback = true
    # configures it (loopback callers without credentials are system:anonymous, and a rule lets them through), so
    # no Authorization line has to be spliced into the hand-laid requests. Authentication has its own suites.
    anonymous = Rule(groups=frozenset({UNAUTHENTICATED_GROUP}), resources=frozenset({ANY}), verbs=frozenset({ANY}))
    front = APIProxyFront(dialer, Directory([NodeInfo("node-a", address)]),
                          authn=Authenticator(anonymous_loopback=True), authz=Authorizer([anonymous], "test rules"),
                          kubelet_tls=client_context(None), target_tls=client_context(None), response_timeout=5)
    proxy = Server("proxy", front, Limits(max_connections=64, header_timeout=5, idle_timeout=idle_timeout))
    proxy_port = await proxy.listen_tcp("127.0.0.1", 0, None)
    try:
        yield Bed(raw, raw_port, strict_port, seen, proxy_port, proxy)
    finally:
        await proxy.close()
        raw_server.close()
        await runner.cleanup()

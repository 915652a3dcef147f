"""Hostile clients against both fronts (CONNECT on a unix socket, proxy URLs on loopback TCP), over the dev cluster.

Slowloris (408 at the header deadline, idle keep-alive connections closed), oversized and malformed heads (431/400),
a connection flood (503 beyond ``max_connections`` while the status API keeps answering), a burst of dials beyond
the per-tunnel channel limit (503, never more channels than the limit), and the unix socket's file permissions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import h11
import pytest

from certs.files import write_secret
from proxy.server import Exchange, Limits, Server
from tests import rawhttp
from tests.proxyauth import bearer_of
from tests.waiting import wait_value
from tunneld.app import Gateway
from tunneld.config import Config, EgressSettings, LimitSettings, PolicySettings, ProxySettings
from tunneld.dev.cluster import HEALTHZ_PORT, DevCluster
from tunneld.dev.pki import DevCA, server_context

from .conftest import fast_config, started

pytestmark = pytest.mark.slow


def abuse_config(cluster: DevCluster, d: Path, *, health: bool = True, **limits: float) -> Config:
    cfg = fast_config(cluster, socket=d / "status.sock")
    return replace(
        cfg,
        egress=EgressSettings(socket=d / "egress.sock"),
        proxy=ProxySettings(listen="127.0.0.1:0"),
        policy=PolicySettings(node_ports=(str(HEALTHZ_PORT),)),
        limits=replace(LimitSettings(), **limits),  # type: ignore[arg-type]
        health=replace(cfg.health, enabled=health),
    )


@pytest.fixture
async def gw_factory(cluster: DevCluster, short_dir: Path) -> AsyncIterator[object]:
    made: list[Gateway] = []

    async def make(**kw: object) -> Gateway:
        gw = await started(abuse_config(cluster, short_dir, **kw))  # type: ignore[arg-type]
        made.append(gw)
        return gw

    yield make
    for gw in made:
        await gw.stop(0.0)


def fronts(gw: Gateway) -> list[tuple[str | Path, int | None]]:
    """(address, port) of each front: the egress unix socket (port None) and the proxy TCP listener."""
    assert gw.config.egress.socket is not None
    return [(gw.config.egress.socket, None), ("127.0.0.1", gw.proxy.ports[0])]


async def status_healthz(gw: Gateway) -> int:
    assert gw.config.status.socket is not None
    conn = aiohttp.UnixConnector(path=str(gw.config.status.socket))
    async with aiohttp.ClientSession(connector=conn) as session:
        async with session.get("http://status/healthz", timeout=aiohttp.ClientTimeout(total=3)) as resp:
            return resp.status


async def open_conn(addr: str | Path, port: int | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if port is None:
        return await asyncio.open_unix_connection(str(addr))
    return await asyncio.open_connection(str(addr), port)


async def collect(reader: asyncio.StreamReader, into: bytearray) -> None:
    """Read until EOF or reset, keeping what arrived."""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(4096):
            into.extend(chunk)


async def test_slowloris_head_gets_408_at_the_header_deadline(gw_factory) -> None:  # type: ignore[no-untyped-def]
    gw = await gw_factory(header_timeout=0.6)
    for addr, port in fronts(gw):
        reader, writer = await open_conn(addr, port)
        head = b"GET /api/v1/nodes/node-1/proxy/healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
        started_at = time.monotonic()
        got = bytearray()

        collector = asyncio.create_task(collect(reader, got))
        try:
            for i in range(100):  # one byte every 50 ms: never a complete head
                if collector.done():
                    break
                with contextlib.suppress(ConnectionError):
                    writer.write(head[i : i + 1] if i < len(head) else b"a")
                    await writer.drain()
                await asyncio.sleep(0.05)
            await asyncio.wait_for(collector, 8)
            closed_at = time.monotonic()
        finally:
            writer.close()
        answer = bytes(got)
        assert rawhttp.status_of(answer) == 408, (addr, answer)
        assert 0.5 <= closed_at - started_at <= 8, closed_at - started_at  # generous: loaded CI machines
        # A connection that sends nothing at all is closed the same way.
        silent, how = await rawhttp.raw(addr, port, b"", timeout=8)
        assert rawhttp.status_of(silent) == 408 and how == "eof", (silent, how)
    assert await status_healthz(gw) == 200


async def test_idle_keepalive_connection_is_closed(gw_factory) -> None:  # type: ignore[no-untyped-def]
    gw = await gw_factory(idle_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.ports[0])
    try:
        auth = f"Authorization: {bearer_of(gw.config.auth.token_file)}\r\n".encode()
        writer.write(b"GET /api/v1/nodes/node-1:%d/proxy/healthz HTTP/1.1\r\nHost: x\r\n%s\r\n" % (HEALTHZ_PORT, auth))
        await writer.drain()
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            assert rawhttp.status_of(head) == 200, head
            assert await reader.readexactly(2) == b"ok"
        idle_from = time.monotonic()
        async with asyncio.timeout(5):
            rest = await reader.read()  # the server ends the idle kept-alive connection
        assert rest == b"" and 0.4 <= time.monotonic() - idle_from <= 3
    finally:
        writer.close()


@pytest.mark.parametrize("request_bytes", [
    b"GET /api/v1/nodes/node-1/proxy/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 8192 + b"\r\n\r\n",
    b"GET /api/v1/nodes/node-1/proxy/ HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 40)
                                                                       for i in range(200)) + b"\r\n",
    b"GET /api/v1/nodes/node-1/proxy/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"CONNECT " + b"a" * 9000 + b":10248 HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["one-huge-header", "many-headers", "huge-request-line", "huge-connect-target"])
async def test_oversized_heads_get_431(gw_factory, request_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    gw = await gw_factory(max_header_bytes=4096)
    for addr, port in fronts(gw):
        answer, how = await rawhttp.raw(addr, port, request_bytes, timeout=5)
        assert rawhttp.status_of(answer) == 431, (addr, answer[:200], how)


@pytest.mark.parametrize("request_bytes", [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"CONNECT  HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /api/v1/nodes/node-1/proxy/ HTTP/1.1\r\nHost: x\r\nX-A: b\rX-Injected: 1\r\n\r\n",
    b"GET /api/v1/nodes/node-1/proxy/ HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
    b"GET /api/v1/nodes/node-1/proxy/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /api/v1/nodes/node-1/proxy/a b HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
], ids=["garbage", "version", "empty-target", "bare-cr", "nul", "two-lengths", "space-in-target", "tls"])
async def test_malformed_heads_get_400_and_reach_no_node(gw_factory, request_bytes: bytes) -> None:  # type: ignore[no-untyped-def]
    gw = await gw_factory(health=False)
    channels = sum(t.counters.channels_total for t in gw.pool.tunnels.values())
    for addr, port in fronts(gw):
        answer, _ = await rawhttp.raw(addr, port, request_bytes, timeout=5)
        assert rawhttp.status_of(answer) == (505 if b"HTTP/9.9" in request_bytes else 400), (addr, answer[:200])
    assert sum(t.counters.channels_total for t in gw.pool.tunnels.values()) == channels, "a malformed request dialed"


async def test_connection_flood_is_bounded_with_503_and_status_keeps_answering(gw_factory) -> None:  # type: ignore[no-untyped-def]
    limit, extra = 20, 40
    gw = await gw_factory(max_connections=limit, header_timeout=30)
    for addr, port in fronts(gw):
        holders = [await open_conn(addr, port) for _ in range(limit)]
        try:
            refused = 0
            for _ in range(extra):
                answer, _ = await rawhttp.raw(addr, port, b"", timeout=3)
                refused += rawhttp.status_of(answer) == 503 and b"too many connections" in answer
            assert refused == extra
            assert await status_healthz(gw) == 200, "the status API answers during the flood"
            for reader, _ in holders:  # the connections within the limit were not answered or dropped
                assert not reader.at_eof() and len(reader._buffer) == 0  # type: ignore[attr-defined]
        finally:
            for _, writer in holders:
                writer.close()
        # Once the flood is gone, the front serves again.
        async def ask(addr: str = addr, port: int = port) -> bytes:
            answer, _ = await rawhttp.raw(addr, port, b"CONNECT 10.255.0.1:1 HTTP/1.1\r\nHost: x\r\n\r\n", timeout=3)
            return answer

        await wait_value(ask, lambda answer: rawhttp.status_of(answer) not in (0, 503), 5,
                         "the front to serve again after the flood")


async def test_channel_limit_holds_under_a_burst_of_concurrent_dials(gw_factory, cluster: DevCluster) -> None:  # type: ignore[no-untyped-def]
    limit, burst = 4, 16
    gw = await gw_factory(max_channels_per_tunnel=limit, health=False)
    node = cluster.sim_nodes[0]
    sock = gw.config.egress.socket
    assert sock is not None
    results = await asyncio.gather(*(rawhttp.open_egress(sock, node.address, HEALTHZ_PORT) for _ in range(burst)))
    try:
        codes = sorted(code for code, *_ in results)
        assert codes == [200] * limit + [503] * (burst - limit), codes
        assert all(b"max_channels_per_tunnel" in head for code, head, *_ in results if code == 503)
        assert gw.pool.tunnels[node.name].counters.open_channels == limit
        # Other tunnels are not affected by one tunnel's limit.
        code, _, _, writer = await rawhttp.open_egress(sock, cluster.sim_nodes[1].address, HEALTHZ_PORT)
        assert code == 200
        writer.close()
    finally:
        for _, _, _, writer in results:
            writer.close()


async def test_egress_socket_refuses_peers_without_permission(cluster: DevCluster, short_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a peer as another user")
    short_dir.chmod(0o755)  # only the socket file's own mode decides
    cfg = abuse_config(cluster, short_dir)
    cfg = replace(cfg, egress=EgressSettings(socket=short_dir / "egress.sock", socket_mode=0o660))
    gw = await started(cfg)
    try:
        sock = short_dir / "egress.sock"
        assert sock.stat().st_mode & 0o777 == 0o660
        # The interpreter starts as root (it may live where others cannot read), then drops to the peer's ids.
        probe = (
            "import os,socket,sys\n"
            "groups=[int(g) for g in sys.argv[3].split(',') if g]\n"
            "os.setgroups(groups); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[2]))\n"
            "s=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); s.sendall(b'CONNECT 10.255.0.1:1 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n');"
            " print(s.recv(100).split()[1].decode())\n"
            "except PermissionError: print('EACCES')\n"
        )

        def as_user(uid: int, gid: int, groups: list[int]) -> str:
            assert uid == gid
            cp = subprocess.run([sys.executable, "-I", "-c", probe, str(sock), str(uid), ",".join(map(str, groups))],
                                capture_output=True, text=True, timeout=20)
            assert cp.returncode == 0, cp.stderr
            return cp.stdout.strip()

        loop = asyncio.get_running_loop()
        stranger = await loop.run_in_executor(None, as_user, 65534, 65534, [])
        member = await loop.run_in_executor(None, as_user, 65534, 65534, [sock.stat().st_gid])
        assert stranger == "EACCES", "a peer outside the socket's owner and group got in"
        assert member == "403", "a peer in the socket's group is let in (and then judged by policy)"
    finally:
        await gw.stop(0.0)


@pytest.mark.both_loops
async def test_tls_handshakes_under_way_are_bounded(short_dir: Path) -> None:
    """Clients that connect to a TLS listener and never say hello hold handshakes, not the listener: past
    ``max_connections`` of them a new connection is closed at once; once they go, TLS clients are served again."""
    ca = DevCA("abuse test CA")
    issued = ca.issue_serving("front", ["127.0.0.1"])
    (short_dir / "s.crt").write_bytes(issued.cert_pem)
    write_secret(short_dir / "s.key", issued.key_pem)
    client_tls = ssl.create_default_context(cadata=ca.cert_pem.decode())

    async def hello(ex: Exchange) -> None:
        if await ex.request() is not None:
            await ex.send(h11.Response(status_code=200, headers=[("Content-Length", "2")]), h11.Data(data=b"ok"),
                          h11.EndOfMessage())

    server = Server("tls-test", hello, Limits(max_connections=3, header_timeout=20))
    port = await server.listen_tcp("127.0.0.1", 0, server_context(short_dir / "s.crt", short_dir / "s.key"))
    try:
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.3)  # accepted: three handshakes under way, waiting for a hello that never comes
        extra_reader, extra = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(extra_reader.read(), 5) == b""  # closed at once, no handshake
        extra.close()
        for _, writer in silent:
            writer.close()
        async with asyncio.timeout(10):
            while True:  # the silent clients' handshakes end as they hang up
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_tls)
                    break
                except (ConnectionError, ssl.SSLError):
                    await asyncio.sleep(0.1)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.read(4096)).endswith(b"\r\n\r\nok")
        writer.close()
    finally:
        await server.close()

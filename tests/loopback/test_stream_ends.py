"""Streams end, and end truthfully: upgraded streams and CONNECT tunnels through the gateway and the dev cluster.

What a client sees is observed on its own socket (a reset is ``ConnectionResetError``, an end of data is ``b""``);
what the gateway holds is read from its counters (``open_channels``, the fronts' connections) and what the node
holds from the simulated kubelet (its running exec and port-forward sessions).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from proxy.splice import reset
from tunneld.app import Gateway
from tunneld.config import Config, EgressSettings, PolicySettings
from tunneld.dev.cluster import DevCluster

from ..proxyauth import bearer_of
from ..waiting import wait_for
from .conftest import fast_config, started

NS = "/api/v1/namespaces"
SOURCE_PORT = 7790


def open_channels(gw: Gateway) -> int:
    return sum(t.counters.open_channels for t in gw.pool.tunnels.values())


def kubelet_streams(cluster: DevCluster) -> int:
    return sum(k.open_streams for k in cluster.kubelets)


async def all_released(gw: Gateway, cluster: DevCluster | None = None) -> None:
    """The channel, the connection slot and the node's session are all given back."""
    await wait_for(lambda: open_channels(gw) == 0, 5, "open_channels back to 0")
    await wait_for(lambda: gw.proxy.connections == 0 and gw.egress.connections == 0, 5, "front connections gone")
    if cluster is not None:
        await wait_for(lambda: kubelet_streams(cluster) == 0, 5, "the kubelet's session ended")


async def outcome(reader: asyncio.StreamReader, timeout: float = 10) -> str:
    """Read until the connection ends: ``reset`` (ECONNRESET) or ``eof``."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        return "reset"
    return "eof"


def with_limits(cfg: Config, **limits: float) -> Config:
    return replace(cfg, limits=replace(cfg.limits, **limits))  # type: ignore[arg-type]


# --- FIN or RST ---------------------------------------------------------------------------------------------------


@pytest.mark.both_loops
async def test_abort_alone_sends_a_fin_and_reset_sends_a_rst() -> None:
    """Why :func:`proxy.splice.reset` sets SO_LINGER 0: ``transport.abort()`` alone ends the client's data cleanly."""
    seen: dict[str, str] = {}
    for how in ("abort", "reset"):
        handled = asyncio.Event()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, how: str = how,
                         handled: asyncio.Event = handled) -> None:
            w.transport.abort() if how == "abort" else reset(w)
            handled.set()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
            await asyncio.wait_for(handled.wait(), 5)
            seen[how] = await outcome(reader)
            writer.close()
        finally:
            server.close()
    assert seen == {"abort": "eof", "reset": "reset"}


# --- upgraded streams ------------------------------------------------------------------------------------------


@pytest.fixture
async def gw(cluster: DevCluster) -> AsyncIterator[Gateway]:
    gateway = await started(with_limits(fast_config(cluster), stream_idle_timeout=1.0))
    await gateway.api_front.pods.refresh()
    try:
        yield gateway
    finally:
        await gateway.stop()


async def spdy_exec(gw: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.ports[0])
    writer.write(
        f"POST {NS}/default/pods/web-1/exec?command=cat&stdin=true HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: {bearer_of(gw.config.auth.token_file)}\r\n".encode()
        + b"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n"
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 "), head
    await ping(reader, writer)
    return reader, writer


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int = 1) -> None:
    """A SPDY/3.1 PING (a control frame: version 3, type 6, 4 bytes of id), which the kubelet answers in kind."""
    frame = struct.pack(">HHII", 0x8003, 6, 4, n)
    writer.write(frame)
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(len(frame)), 10) == frame


@pytest.mark.both_loops
async def test_websocket_exec_client_that_vanishes_ends_the_session_on_the_node(gw: Gateway,
                                                                                cluster: DevCluster) -> None:
    # The kubelet is TLS: the gateway must end it with close_notify, since TLS has no half-close to pass on.
    async with connect(f"ws://127.0.0.1:{gw.proxy.ports[0]}{NS}/default/pods/web-1/exec?command=cat&stdin=true"
                       "&stdout=true", subprotocols=["v5.channel.k8s.io"], open_timeout=10,  # type: ignore[list-item]
                       additional_headers={"Authorization": bearer_of(gw.config.auth.token_file)}) as conn:
        await conn.send(b"\x00hi")
        assert await asyncio.wait_for(conn.recv(), 10) == b"\x01hi"
        assert kubelet_streams(cluster) == 1 and open_channels(gw) == 1
        conn.transport.close()  # TCP close, no WebSocket close frame
        await all_released(gw, cluster)


@pytest.mark.parametrize("how", ["fin", "rst"])
async def test_spdy_client_that_closes_without_a_word_ends_the_session_on_the_node(gw: Gateway,
                                                                                    cluster: DevCluster,
                                                                                    how: str) -> None:
    _, writer = await spdy_exec(gw)
    assert kubelet_streams(cluster) == 1
    if how == "rst":
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    await all_released(gw, cluster)


async def test_upgraded_stream_ends_when_the_kubelet_ends_it(gw: Gateway, cluster: DevCluster) -> None:
    reader, writer = await spdy_exec(gw)
    for kubelet in cluster.kubelets:
        for session in list(kubelet._upgraded):
            session.cancel()  # the kubelet ends the session: GOAWAY, then it closes the connection
    assert await outcome(reader) == "eof"  # the node ended it cleanly: a clean end for the client too
    writer.close()
    await all_released(gw, cluster)


async def test_upgraded_stream_whose_tunnel_drops_is_reset(cluster: DevCluster) -> None:
    gateway = await started(fast_config(cluster))  # no short stream limit here: only the tunnel's loss can end it
    await gateway.api_front.pods.refresh()
    try:
        reader, writer = await spdy_exec(gateway)
        await cluster.sim_nodes[0].stop()  # web-1's node: its SSH connection is dropped mid-stream
        assert await outcome(reader) == "reset"
        writer.close()
        await all_released(gateway)
    finally:
        await gateway.stop()


@pytest.mark.both_loops
async def test_idle_upgraded_stream_is_reset_and_audited(gw: Gateway, cluster: DevCluster,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.audit")
    reader, writer = await spdy_exec(gw)
    assert await outcome(reader, timeout=5) == "reset"  # stream_idle_timeout = 1: ended as a broken stream
    writer.close()
    lines = [r for r in caplog.records if r.name == "proxy.audit" and "stream_idle_timeout" in r.getMessage()]
    assert len(lines) == 1 and getattr(lines[0], "peer", "").startswith("127.0.0.1:"), caplog.text
    await all_released(gw, cluster)


async def test_busy_stream_is_cut_at_its_max_lifetime(cluster: DevCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.audit")
    gateway = await started(with_limits(fast_config(cluster), stream_max_lifetime=1.0))
    await gateway.api_front.pods.refresh()
    try:
        reader, writer = await spdy_exec(gateway)
        loop = asyncio.get_running_loop()
        started_at = loop.time()
        result = "open"
        async with asyncio.timeout(10):
            while result == "open":  # busy: bytes both ways every 50 ms, so only the lifetime can end it
                try:
                    await ping(reader, writer)
                    await asyncio.sleep(0.05)
                except (ConnectionResetError, BrokenPipeError):
                    result = "reset"
                except asyncio.IncompleteReadError:
                    result = "eof"
        assert result == "reset" and 0.9 <= loop.time() - started_at < 5
        writer.close()
        assert any("stream_max_lifetime" in r.getMessage() for r in caplog.records if r.name == "proxy.audit")
        await all_released(gateway, cluster)
    finally:
        await gateway.stop()


# --- CONNECT -------------------------------------------------------------------------------------------------------


@pytest.fixture
async def sources(cluster: DevCluster) -> AsyncIterator[None]:
    """On every node: a server that sends 1 KiB every 20 ms for as long as the client stays."""

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for _ in range(3000):  # bounded: about a minute
                writer.write(b"x" * 1024)
                await writer.drain()
                await asyncio.sleep(0.02)
        except ConnectionError:
            pass
        finally:
            writer.close()

    servers = [await asyncio.start_server(source, sim.address, SOURCE_PORT) for sim in cluster.sim_nodes]
    try:
        yield
    finally:
        for server in servers:
            server.close()


def egress_config(cluster: DevCluster, sock: Path, **limits: float) -> Config:
    cfg = fast_config(cluster)
    return with_limits(replace(cfg, egress=EgressSettings(socket=sock, listen="127.0.0.1:0"),
                               policy=PolicySettings(node_ports=(str(SOURCE_PORT),))), **limits)


async def connect_via(gw: Gateway, over: str, sock: Path, target: str) -> tuple[asyncio.StreamReader,
                                                                                  asyncio.StreamWriter]:
    if over == "tcp":
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.egress.ports[0])
    else:
        reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert len(await asyncio.wait_for(reader.readexactly(1024), 10)) == 1024  # bytes are flowing
    return reader, writer


@pytest.mark.both_loops
@pytest.mark.parametrize("over, sees", [("tcp", "reset"), ("unix", "eof")])
async def test_connect_tunnel_loss_mid_stream(cluster: DevCluster, sources: None, short_dir: Path,
                                              over: str, sees: str) -> None:
    """The node's SSH connection dies mid-stream: a TCP client gets a reset; a unix socket has none to give."""
    sock = short_dir / "egress.sock"
    gw = await started(egress_config(cluster, sock))
    try:
        node = cluster.sim_nodes[0]
        reader, writer = await connect_via(gw, over, sock, f"{node.address}:{SOURCE_PORT}")
        await node.stop()  # every SSH connection of the node is dropped
        assert await outcome(reader) == sees
        writer.close()
        await all_released(gw)
    finally:
        await gw.stop()


@pytest.mark.parametrize("over, sees", [("tcp", "reset"), ("unix", "eof")])
async def test_idle_connect_tunnel_is_ended_as_broken(cluster: DevCluster, short_dir: Path, over: str, sees: str,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="proxy.audit")
    sock = short_dir / "egress.sock"
    gw = await started(egress_config(cluster, sock, stream_idle_timeout=1.0))
    try:
        node = cluster.sim_nodes[1]
        reader, writer = await asyncio.open_unix_connection(str(sock)) if over == "unix" else \
            await asyncio.open_connection("127.0.0.1", gw.egress.ports[0])
        writer.write(f"CONNECT {node.address}:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert await outcome(reader, timeout=5) == sees  # nothing sent either way: idle for 1 s
        writer.close()
        assert any("stream_idle_timeout" in r.getMessage() for r in caplog.records if r.name == "proxy.audit")
        await all_released(gw)
    finally:
        await gw.stop()


@pytest.mark.both_loops
async def test_connect_tunnel_cut_at_the_end_of_the_grace_period_is_a_reset(cluster: DevCluster, sources: None,
                                                                            short_dir: Path) -> None:
    sock = short_dir / "egress.sock"
    gw = await started(egress_config(cluster, sock))
    node = cluster.sim_nodes[2]
    try:
        reader, writer = await connect_via(gw, "tcp", sock, f"{node.address}:{SOURCE_PORT}")
    finally:
        await gw.stop(grace=0.2)
    assert await outcome(reader) == "reset"
    writer.close()

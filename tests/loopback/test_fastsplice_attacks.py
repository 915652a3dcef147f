"""The callback splice (:mod:`proxy.fastsplice`) through the gateway, against what is easy to get wrong: bytes the
node sent with its 101 that a congested client does not take, a node that ends and closes its channel while the
client is held back or sending, the client's bytes and end in the front's buffer at the switch, a stream held back
both ways and cut, a half-closed client that never reads (and one that never takes the node's last bytes), and many
streams cut at random."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.fastsplice import BATCH, HIGH_WATER, SpliceProtocol
from proxy.splice import SPLICES
from tunneld.app import Gateway
from tunneld.dev.cluster import DevCluster

from ..proxyauth import bearer_of
from ..waiting import wait_for
from .conftest import ECHO_PORT, SOURCE_PORT, NodeServers, source_stalls, started
from .test_fastsplice import (
    DEAF_PORT,
    HALF_PORT,
    PACKET,
    UPGRADE_PORT,
    MiB,
    config,
    connect,
    gateway_side,
    gateway_side_of,
)
from .test_stream_ends import all_released, outcome


@pytest.fixture
async def gw(cluster: DevCluster, short_dir: Path) -> AsyncIterator[Gateway]:
    gateway = await started(config(cluster, short_dir / "egress.sock"))
    try:
        yield gateway
    finally:
        await gateway.stop()


async def upload(writer: asyncio.StreamWriter, sent: list[int]) -> str:
    """Send until the connection fails (at most 1 GiB): how it failed."""
    try:
        for _ in range(1024):
            writer.write(b"u" * MiB)
            await writer.drain()
            sent[0] += MiB
    except ConnectionError as exc:
        return type(exc).__name__
    return "sent everything"


async def test_node_that_ends_and_closes_while_the_client_is_held_back_resets_the_client(
        gw: Gateway, cluster: DevCluster) -> None:
    """The node answers early and goes away (its end of data, then the channel's close) while the client's upload
    is held back on a spent window: the client must not be left paused with nobody reading it. Its upload did not
    arrive, so it gets a reset, as from a TCP peer that closed."""
    answer = asyncio.Event()
    go_away = asyncio.Event()
    node_writers: list[asyncio.StreamWriter] = []

    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        node_writers.append(writer)
        await answer.wait()
        writer.write(b"413 too large")
        writer.write_eof()
        await go_away.wait()
        writer.transport.abort()  # unread bytes: the node's kernel resets, its sshd closes the channel

    node = cluster.sim_nodes[0]
    server = await asyncio.start_server(early, node.address, DEAF_PORT)
    try:
        reader, writer = await connect(gw, f"{node.address}:{DEAF_PORT}", "tcp")
        sent = [0]
        uploading = asyncio.create_task(upload(writer, sent))
        try:
            await wait_for(lambda: not gateway_side(gw).is_reading(), 20, "the gateway holding the client back")
            answer.set()
            assert await asyncio.wait_for(reader.read(-1), 10) == b"413 too large"  # the node's end, as an end
            go_away.set()
            assert await asyncio.wait_for(uploading, 10) in ("ConnectionResetError", "BrokenPipeError")
        finally:
            uploading.cancel()
            await asyncio.gather(uploading, return_exceptions=True)
        writer.close()
        await all_released(gw)
    finally:
        go_away.set()
        answer.set()
        for w in node_writers:
            w.transport.abort()
        server.close()


async def test_bytes_the_node_sent_with_its_101_that_the_client_does_not_take_hold_back_the_node(
        gw: Gateway, cluster: DevCluster) -> None:
    """The node's first bytes come with its 101 (they reach the splice as bytes read past the switch); a client that
    takes none of them must still stall the node within a window, and then get every byte in order."""
    total = 32 * MiB
    written = [0]

    async def upgrade(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n"
                         + bytes(range(256)) * 4096)  # 1 MiB in the same write as the head
            for _ in range(1, total // MiB):
                await writer.drain()
                written[0] += MiB
                writer.write(bytes(range(256)) * 4096)
            await writer.drain()
            written[0] += MiB
        except ConnectionError:
            pass
        finally:
            writer.close()

    node = cluster.sim_nodes[1]
    server = await asyncio.start_server(upgrade, node.address, UPGRADE_PORT)
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # the client's kernel takes little for it
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.proxy.ports[0]))
        reader, writer = await asyncio.open_connection(sock=sock)
        await wait_for(lambda: len(gw.proxy._writers) == 1, 10, "the gateway accepted the connection")
        # A congested link: the gateway's kernel takes little more for the client either (as once its send buffer
        # is full), so what the splice writes first stays in the gateway's transport.
        gateway_side_of(gw).get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        writer.write(f"GET /api/v1/nodes/{node.name}:{UPGRADE_PORT}/proxy/x HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: {bearer_of(gw.config.auth.token_file)}\r\n"
                     "Connection: Upgrade\r\nUpgrade: x\r\n\r\n".encode())
        stalled_at = await source_stalls(lambda: written[0], limit=20)
        assert stalled_at <= 16 * MiB, stalled_at
        transport = gateway_side_of(gw)
        splice = transport.get_protocol()
        assert isinstance(splice, SpliceProtocol)
        in_transport = transport.get_write_buffer_size()
        assert in_transport <= 256 * 1024 + HIGH_WATER + BATCH + PACKET, in_transport
        received, pattern = 0, bytes(range(256)) * 1025
        async with asyncio.timeout(30):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101 ")
            while data := await reader.read(256 * 1024):
                assert data == pattern[received % 256:received % 256 + len(data)], received
                received += len(data)
        assert received == total
        writer.close()
        await all_released(gw)
    finally:
        server.close()


@pytest.mark.both_loops
@pytest.mark.parametrize("over", ["tcp", "unix"])
async def test_head_bytes_and_end_in_one_write_all_reach_the_node_and_come_back(
        gw: Gateway, cluster: DevCluster, node_servers: NodeServers, over: str) -> None:
    """The client's bytes and its end of data are in the front's buffer when the splice takes over."""
    node = cluster.sim_nodes[0]
    if over == "tcp":
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.egress.ports[0])
    else:
        reader, writer = await asyncio.open_unix_connection(str(gw.config.egress.socket))
    payload = bytes(range(256)) * 1000
    writer.write(f"CONNECT {node.address}:{ECHO_PORT} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() + payload)
    writer.write_eof()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert await asyncio.wait_for(reader.read(-1), 10) == payload  # all of it, then the echo's end
    writer.close()
    await all_released(gw)


async def test_a_tcp_client_that_sends_and_closes_at_once_still_delivers_its_bytes(gw: Gateway,
                                                                                  cluster: DevCluster) -> None:
    got: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got.append(await reader.read(-1))
        try:
            writer.write(b"answer" * 10000)  # to a client that is gone
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    node = cluster.sim_nodes[1]
    server = await asyncio.start_server(record, node.address, HALF_PORT)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", gw.egress.ports[0])
        payload = b"p" * 300_000
        writer.write(f"CONNECT {node.address}:{HALF_PORT} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() + payload)
        await writer.drain()
        writer.close()
        await wait_for(lambda: got == [payload], 10, "the node received everything and the end")
        await all_released(gw)
    finally:
        server.close()


async def test_a_node_that_ends_and_closes_as_the_client_sends_resets_the_client(gw: Gateway,
                                                                                 cluster: DevCluster) -> None:
    """The node's end and close race the client's upload: the client reads the node's end, and its upload (which did
    not all arrive) is reset; nothing is held, every time."""
    async def quick(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"bye")
        writer.write_eof()
        writer.transport.abort()

    node = cluster.sim_nodes[1]
    server = await asyncio.start_server(quick, node.address, HALF_PORT)
    try:
        for _ in range(10):
            _, writer = await connect(gw, f"{node.address}:{HALF_PORT}", "tcp")
            assert await asyncio.wait_for(upload(writer, [0]), 10) in ("ConnectionResetError", "BrokenPipeError")
            writer.close()
            await all_released(gw)
    finally:
        server.close()


@pytest.mark.parametrize("how", ["lifetime", "node_stops"])
async def test_a_stream_held_back_both_ways_is_cut_with_a_reset(cluster: DevCluster, short_dir: Path,
                                                                how: str) -> None:
    """Neither the client nor the node reads; the stream reaches its lifetime, or the node's sshd goes away."""
    node_writers: list[asyncio.StreamWriter] = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        node_writers.append(writer)
        with contextlib.suppress(ConnectionError):
            for _ in range(1024):
                writer.write(b"n" * MiB)
                await writer.drain()

    limits = {"stream_max_lifetime": 1.5} if how == "lifetime" else {}
    gateway = await started(config(cluster, short_dir / "egress.sock", **limits))
    node = cluster.sim_nodes[2]
    server = await asyncio.start_server(flood, node.address, DEAF_PORT)
    try:
        _, writer = await connect(gateway, f"{node.address}:{DEAF_PORT}", "tcp")
        uploading = asyncio.create_task(upload(writer, [0]))
        try:
            await wait_for(lambda: not gateway_side(gateway).is_reading(), 20, "the client held back")
            splice = gateway_side(gateway).get_protocol()
            assert isinstance(splice, SpliceProtocol)
            await wait_for(lambda: splice.client_full, 20, "the client's transport full")
            chan = splice.stream._chan  # type: ignore[union-attr]  # the ChannelStream's asyncssh channel
            assert chan.get_write_buffer_size() <= 64 * 1024 + 256 * 1024  # its mark and one read from the client
            if how == "node_stops":
                await node.stop()
            assert await asyncio.wait_for(uploading, 10) in ("ConnectionResetError", "BrokenPipeError")
        finally:
            uploading.cancel()
            await asyncio.gather(uploading, return_exceptions=True)
        writer.close()
        await all_released(gateway)
    finally:
        for w in node_writers:
            w.transport.abort()
        server.close()
        await gateway.stop()


async def test_a_client_that_half_closes_and_never_reads_stalls_the_node_until_the_idle_bound(
        cluster: DevCluster, short_dir: Path, node_servers: NodeServers) -> None:
    gateway = await started(config(cluster, short_dir / "egress.sock", stream_idle_timeout=1.0))
    try:
        reader, writer = await connect(gateway, f"{cluster.sim_nodes[0].address}:{SOURCE_PORT}", "tcp")
        writer.write_eof()
        await wait_for(lambda: gateway.egress.connections == 0, 10, "the stream ended at its idle bound")
        assert node_servers.source_written[0] < 64 * MiB  # the node was stalled, not drained into the gateway
        assert await outcome(reader) == "reset"
        writer.close()
        await all_released(gateway)
    finally:
        await gateway.stop()


async def test_many_streams_cut_at_random_give_everything_back(gw: Gateway, cluster: DevCluster,
                                                              node_servers: NodeServers) -> None:
    rnd = random.Random(7)
    before = SPLICES["callbacks"]

    async def one(i: int) -> None:
        node = cluster.sim_nodes[i % 3]
        reader, writer = await connect(gw, f"{node.address}:{ECHO_PORT if i % 2 else SOURCE_PORT}",
                                       rnd.choice(["tcp", "unix"]))
        how = rnd.choice(["reset", "close", "half-close", "abort"])
        try:
            writer.write(b"d" * rnd.randint(0, 2 * MiB))
            if rnd.random() < 0.5:
                await asyncio.wait_for(reader.read(rnd.randint(1, MiB)), 10)
            if how == "reset" and writer.get_extra_info("socket").family == socket.AF_INET:
                writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                           struct.pack("ii", 1, 0))
            elif how == "close":
                writer.close()
            elif how == "half-close":
                writer.write_eof()
                await asyncio.wait_for(reader.read(rnd.randint(1, 4 * MiB)), 10)
        except ConnectionError:
            pass
        writer.transport.abort()

    await asyncio.gather(*(one(i) for i in range(60)))
    assert SPLICES["callbacks"] == before + 60
    await all_released(gw)


@pytest.mark.both_loops
async def test_the_last_bytes_a_client_does_not_take_are_still_bounded_by_the_idle_timeout(
        cluster: DevCluster, short_dir: Path) -> None:
    """The node answers in one burst and ends; the client, which half-closed, never reads: the splice has nothing
    left to wait for, but its last bytes are still on their way, and the client must neither hold its connection
    beyond the stream's idle bound nor see an end of data for a stream it did not receive."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(-1)
        writer.write(b"a" * 200_000)  # one burst, all of it passed to the client's transport
        with contextlib.suppress(AssertionError):
            await wait_for(lambda: getattr(gateway_side_of(gateway, "egress").get_protocol(), "client_full", False), 10,
                           "the client's transport full")
        writer.close()  # then the end

    node = cluster.sim_nodes[0]
    server = await asyncio.start_server(answer, node.address, HALF_PORT)
    gateway = await started(config(cluster, short_dir / "egress.sock", stream_idle_timeout=1.0))
    try:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.egress.ports[0]))
        reader, writer = await asyncio.open_connection(sock=sock)
        await wait_for(lambda: len(gateway.egress._writers) == 1, 10, "the gateway accepted the connection")
        gateway_sock = gateway_side_of(gateway, "egress").get_extra_info("socket")
        gateway_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # a congested link, as in the 101 test
        writer.write(f"CONNECT {node.address}:{HALF_PORT} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        writer.write_eof()
        await wait_for(lambda: gateway.egress.connections == 0, 10, "the connection given back at the idle bound")
        assert await outcome(reader) == "reset"
        writer.close()
        await all_released(gateway)
    finally:
        await gateway.stop()
        server.close()

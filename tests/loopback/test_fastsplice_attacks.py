"""The callback splice (:mod:`proxy.fastsplice`) through the gateway, against what is easy to get wrong: bytes the
node sent with its 101 that a congested client does not take, a node that ends and closes its channel while the
client is held back."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.fastsplice import BATCH, HIGH_WATER, SpliceProtocol
from tunneld.app import Gateway
from tunneld.dev.cluster import DevCluster

from ..proxyauth import bearer_of
from ..waiting import wait_for
from .conftest import source_stalls, started
from .test_fastsplice import DEAF_PORT, PACKET, UPGRADE_PORT, MiB, config, connect, gateway_side
from .test_stream_ends import all_released


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


def gateway_side_of(gw: Gateway) -> asyncio.Transport:
    """The gateway's transport of the one client connection on the proxy front."""
    writers = list(gw.proxy._writers)
    assert len(writers) == 1
    transport = writers[0].transport
    assert isinstance(transport, asyncio.Transport)
    return transport

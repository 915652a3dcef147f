"""The gRPC egress front (Konnectivity's ``ProxyService.Proxy``) against the dev cluster's nodes, with an
apiserver-shaped client (tests/konnectivity.py): every packet type, refusals, flow control and clean-up."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from proxy.dialer import Stream
from proxy.grpcfront import GRPCLimits, KonnectivityFront
from proxy.konnectivity_pb2 import DATA, DIAL_REQ, Data, DialRequest, Packet
from proxy.policy import Policy, PolicyDialer, PortSet
from tunneld.app import Gateway
from tunneld.dev.cluster import DevCluster

from ..konnectivity import Client, DialFailed
from ..waiting import wait_for
from .conftest import ECHO_PORT, SOURCE_PORT, NodeServers, source_stalls, started
from .test_egress import egress_config

MiB = 1024 * 1024


def grpc_config(cluster: DevCluster, sock: Path):  # type: ignore[no-untyped-def]
    cfg = egress_config(cluster, None)
    return replace(cfg, egress=replace(cfg.egress, grpc_socket=sock))


def settled(gw: Gateway) -> bool:
    return gw.grpc_front.streams == 0 and all(t.counters.open_channels == 0 for t in gw.pool.tunnels.values())


@pytest.mark.both_loops
async def test_byte_exact_both_ways_and_a_clean_end(cluster: DevCluster, node_servers: NodeServers,
                                                    short_dir: Path) -> None:
    sock = short_dir / "grpc.sock"
    gw = await started(grpc_config(cluster, sock))
    client = Client(sock)
    try:
        assert sock.stat().st_mode & 0o777 == 0o600
        node = cluster.sim_nodes[0]
        # Download 64 MiB from the node's source: every byte in order, then CLOSE_RSP with an empty error.
        conn = await client.dial(f"{node.address}:{SOURCE_PORT}")
        data, error = await conn.read_all()
        assert error == ""
        assert hashlib.sha256(data).digest() == hashlib.sha256(
            b"".join(bytes([i]) * MiB for i in range(64))).digest()
        # Upload 64 MiB through the echo while reading it back.
        conn = await client.dial(f"{node.address}:{ECHO_PORT}")
        blob = bytes(range(256)) * (64 * MiB // 256)
        got = hashlib.sha256()
        received = 0

        async def send() -> None:
            for i in range(0, len(blob), 256 * 1024):
                await conn.write(blob[i:i + 256 * 1024])

        sender = asyncio.create_task(send())
        async with asyncio.timeout(120):
            while received < len(blob):
                chunk = await conn.read()
                got.update(chunk)
                received += len(chunk)
        await sender
        assert got.digest() == hashlib.sha256(blob).digest()
        assert await conn.close() == ""  # CLOSE_REQ is answered with CLOSE_RSP
        await wait_for(lambda: settled(gw), 5, "streams and channels released")
        assert gw.pool.tunnels[node.name].counters.channels_total >= 2
    finally:
        await client.close()
        await gw.stop()


async def test_refusals_are_dial_responses_with_a_reason(cluster: DevCluster, short_dir: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    sock = short_dir / "grpc.sock"
    gw = await started(grpc_config(cluster, sock))
    client = Client(sock)
    try:
        node = cluster.sim_nodes[0]
        cases = [
            ("127.0.0.53:53", "not a node, pod or service"),
            (f"{node.address}:22", "policy.node_ports"),
            ("nonsense", "invalid address"),
            ("10.0.0.1:99999", "is not a port"),
        ]
        with caplog.at_level(logging.INFO, logger="proxy.audit"):
            for address, reason in cases:
                with pytest.raises(DialFailed, match=reason):
                    await client.dial(address)
        refusals = [r for r in caplog.records if r.name == "proxy.audit" and "grpc dial refused" in r.message]
        assert len(refusals) == len(cases)
        assert all(r.levelno == logging.WARNING for r in refusals)  # 403/400 are warnings
        # A first packet that is not DIAL_REQ ends the stream without an answer.
        call = client.call()
        await call.write(Packet(type=DATA, data=Data(connectID=1, data=b"x")))
        assert await call.read() is grpc.aio.EOF
        # udp is not offered.
        call = client.call()
        await call.write(Packet(type=DIAL_REQ, dialRequest=DialRequest(protocol="udp", address=f"{node.address}:53",
                                                                       random=5)))
        answer = await call.read()
        assert answer.dialResponse.random == 5 and "not supported" in answer.dialResponse.error
        await wait_for(lambda: settled(gw), 5, "nothing left open")
    finally:
        await client.close()
        await gw.stop()


async def test_a_broken_tunnel_is_a_close_with_an_error(cluster: DevCluster, node_servers: NodeServers,
                                                        short_dir: Path) -> None:
    sock = short_dir / "grpc.sock"
    gw = await started(grpc_config(cluster, sock))
    client = Client(sock)
    try:
        node = cluster.sim_nodes[1]
        conn = await client.dial(f"{node.address}:{ECHO_PORT}")
        await conn.write(b"hello")
        assert await conn.read() == b"hello"
        await node.stop()  # the node's sshd goes away mid-stream
        _, error = await asyncio.wait_for(conn.read_all(), 30)
        assert error, "a stream cut by tunnel loss must not end with an empty CLOSE_RSP error"
        await wait_for(lambda: gw.grpc_front.streams == 0, 5, "the stream released")
    finally:
        await client.close()
        await gw.stop()


async def test_a_client_that_stops_reading_stops_the_node(cluster: DevCluster, node_servers: NodeServers,
                                                          short_dir: Path) -> None:
    sock = short_dir / "grpc.sock"
    gw = await started(grpc_config(cluster, sock))
    client = Client(sock)
    try:
        node = cluster.sim_nodes[0]
        conn = await client.dial(f"{node.address}:{SOURCE_PORT}")
        last = await source_stalls(lambda: node_servers.source_written[0])
        assert last < 24 * MiB, f"{last} bytes buffered for a client that reads nothing"
        data, error = await asyncio.wait_for(conn.read_all(), 60)
        assert len(data) == 64 * MiB and error == ""
    finally:
        await client.close()
        await gw.stop()


async def test_a_thousand_concurrent_dials(cluster: DevCluster, node_servers: NodeServers, short_dir: Path) -> None:
    sock = short_dir / "grpc.sock"
    gw = await started(grpc_config(cluster, sock))
    client = Client(sock)
    try:
        async def one(i: int) -> bytes:
            node = cluster.sim_nodes[i % len(cluster.sim_nodes)]
            conn = await client.dial(f"{node.address}:{ECHO_PORT}")
            await conn.write(b"%d" % i)
            got = await conn.read()
            assert await conn.close() == ""
            return got

        async with asyncio.timeout(90):
            results = await asyncio.gather(*(one(i) for i in range(1000)))
        assert results == [b"%d" % i for i in range(1000)]
        await wait_for(lambda: settled(gw), 10, "every stream and channel released")
    finally:
        await client.close()
        await gw.stop()


async def test_clients_that_vanish_mid_dial_and_mid_stream_leak_nothing(cluster: DevCluster,
                                                                        node_servers: NodeServers,
                                                                        short_dir: Path) -> None:
    sock = short_dir / "grpc.sock"
    gw = await started(grpc_config(cluster, sock))
    try:
        node = cluster.sim_nodes[2]
        for _ in range(20):
            client = Client(sock)
            conn = await client.dial(f"{node.address}:{SOURCE_PORT}")
            await conn.read()
            await client.close()  # gone mid-stream, without CLOSE_REQ
            client = Client(sock)
            call = client.call()
            await call.write(Packet(type=DIAL_REQ, dialRequest=DialRequest(
                protocol="tcp", address=f"{node.address}:{ECHO_PORT}", random=9)))
            await client.close()  # gone mid-dial
        await wait_for(lambda: settled(gw), 10, "every stream and channel released")
    finally:
        await gw.stop()


class _SlowDialer:
    """A dialer whose dials wait until released (to hold a dial pending); counts the dials it saw cancelled."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0
        self.cancelled = 0

    async def dial(self, host: str, port: int) -> Stream:
        self.started += 1
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("never released in these tests")


async def test_dial_cls_drops_a_pending_dial_and_pending_dials_are_bounded(short_dir: Path) -> None:
    dialer = _SlowDialer()
    front = KonnectivityFront(PolicyDialer(dialer, Policy(node_hosts={"10.1.1.1": 10250},
                                                          node_ports=PortSet.parse([]))),
                              GRPCLimits(max_streams=64, max_pending_dials=3, first_packet_timeout=1.0))
    sock = short_dir / "grpc.sock"
    await front.listen_unix(sock, 0o600)
    client = Client(sock)
    try:
        assert await client.dial_and_cancel("10.1.1.1:10250") is grpc.aio.EOF
        await wait_for(lambda: dialer.cancelled == 1 and front.pending_dials == 0 and front.streams == 0, 5,
                       "the dial dropped")
        # Three dials pending fill the bound; the fourth is refused at once with a reason.
        calls = []
        for rid in (1, 2, 3):
            call = client.call()
            await call.write(Packet(type=DIAL_REQ, dialRequest=DialRequest(protocol="tcp", address="10.1.1.1:10250",
                                                                           random=rid)))
            calls.append(call)
        await wait_for(lambda: front.pending_dials == 3, 5, "three dials pending")
        with pytest.raises(DialFailed, match="too many dials pending"):
            await client.dial("10.1.1.1:10250")
        for call in calls:
            call.cancel()
        await wait_for(lambda: front.pending_dials == 0 and front.streams == 0 and dialer.cancelled == 4, 5,
                       "pending dials dropped when their clients left")
        # A client that never sends its DIAL_REQ is dropped after first_packet_timeout.
        call = client.call()
        async with asyncio.timeout(5):
            assert await call.read() is grpc.aio.EOF
    finally:
        await client.close()
        await front.close()

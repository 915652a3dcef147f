"""What the policy checks is what the node's sshd is asked for (through the real fronts, the real gateway, its SSH
tunnels and the dev cluster's simulated sshd, which records every ``direct-tcpip`` destination exactly as sent).

``NODE-1:7777``, ``node-1.:7777`` and ``<address>.:7777`` pass the policy in their normal form; the gateway must ask
the node for that normal form, never the raw string (a resolver reads ``127.0.0.1.`` as a DNS name). And the first
address of a node's pod CIDR (its bridge: the node itself) is not a pod unless ``policy.allow_pod_gateway``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from tunneld.app import Gateway
from tunneld.config import Config, EgressSettings, PolicySettings, ProxySettings
from tunneld.dev.cluster import DevCluster

from .. import rawhttp
from ..proxyauth import proxy_get
from .conftest import fast_config, started

PORT = 7777


class Target:
    """A raw target on each node address: records the request head it got and answers with it as the body."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.servers: list[asyncio.Server] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            self.heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(head), head))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def target(cluster: DevCluster) -> AsyncIterator[Target]:
    t = Target()
    for sim in cluster.sim_nodes:
        t.servers.append(await asyncio.start_server(t.handle, sim.address, PORT))
    try:
        yield t
    finally:
        for server in t.servers:
            server.close()


def config(cluster: DevCluster, short_dir: Path, **policy: object) -> Config:
    return replace(fast_config(cluster), egress=EgressSettings(socket=short_dir / "egress.sock"),
                   proxy=ProxySettings(listen="127.0.0.1:0", pods_refresh=60),
                   policy=PolicySettings(node_ports=(str(PORT),), **policy))  # type: ignore[arg-type]


async def connect(gw: Gateway, authority: str) -> tuple[int, bytes]:
    """CONNECT through the egress socket, then one HTTP request through the tunnel; (status, what came back)."""
    assert gw.config.egress.socket is not None
    reader, writer = await asyncio.open_unix_connection(str(gw.config.egress.socket))
    try:
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            return status, head + await asyncio.wait_for(reader.read(4096), 10)
        writer.write(b"GET /through HTTP/1.1\r\nHost: x\r\n\r\n")
        return status, await asyncio.wait_for(reader.read(-1), 10)
    finally:
        writer.close()


async def test_connect_asks_the_node_for_the_normal_form(cluster: DevCluster, target: Target,
                                                         short_dir: Path) -> None:
    gw = await started(config(cluster, short_dir))
    try:
        sim = cluster.sim_nodes[0]
        for authority, asked in [("NODE-1:7777", "node-1"), ("node-1.:7777", "node-1"), ("Node-1.:7777", "node-1"),
                                 (f"{sim.address}.:{PORT}", sim.address)]:
            sim.requested.clear()
            status, got = await connect(gw, authority)
            assert status == 200, (authority, got)
            assert got.endswith(b"GET /through HTTP/1.1\r\nHost: x\r\n\r\n"), got
            assert list(sim.requested) == [(asked, PORT)], authority
        for hostile in ("node-1..:7777", "node-1\n:7777", "[fe80::1%eth0]:7777", f"{sim.address}..:{PORT}"):
            sim.requested.clear()
            status, got = await connect(gw, hostile.replace("\n", "%0A") if "\n" in hostile else hostile)
            assert status in (400, 403), (hostile, got)
            assert not sim.requested, hostile
    finally:
        await gw.stop()


async def test_proxy_url_asks_the_node_for_its_address(cluster: DevCluster, target: Target, short_dir: Path) -> None:
    gw = await started(config(cluster, short_dir))
    try:
        sim = cluster.sim_nodes[1]
        sim.requested.clear()
        r = await proxy_get(gw, f"/api/v1/nodes/{sim.name}:{PORT}/proxy/x")
        assert r.status == 200, r
        assert list(sim.requested) == [(sim.address, PORT)]
        assert f"\r\nhost: {sim.address}:{PORT}\r\n".encode() in target.heads[-1].lower()
    finally:
        await gw.stop()


@pytest.mark.parametrize("allow", [False, True])
async def test_pod_cidr_bridge_is_not_a_pod_unless_allowed(cluster: DevCluster, target: Target, short_dir: Path,
                                                           allow: bool) -> None:
    sim, kubelet = cluster.sim_nodes[0], cluster.kubelets[0]
    bridge = "10.244.1.1"  # node-1's pod CIDR is 10.244.1.0/24
    # node-1's kubelet lists a pod at the bridge address (a pod may say anything about itself).
    kubelet.extra_items = [{"metadata": {"name": "bridge", "namespace": "default"},
                            "spec": {"nodeName": sim.name, "containers": [{"name": "app"}]},
                            "status": {"podIP": bridge}}]
    gw = await started(config(cluster, short_dir, allow_pod_gateway=allow))
    try:
        await gw.api_front.pods.refresh()
        assert not gw.api_front.pods.unlisted
        sim.requested.clear()
        status, got = await connect(gw, f"{bridge}:{PORT}")
        r = await proxy_get(gw, f"/api/v1/namespaces/default/pods/bridge:{PORT}/proxy/")
        pod_status, _, _, pod_writer = await rawhttp.open_egress(short_dir / "egress.sock", "10.244.1.10", 8080)
        pod_writer.close()  # a pod address of the same network
        if not allow:
            assert status == 403 and b"allow_pod_gateway" in got, got
            assert r.status == 403 and b"allow_pod_gateway" in r.body, r
            assert (bridge, PORT) not in sim.requested
        else:
            # Allowed by policy: the node is asked (the simulated node has nothing there, so it refuses: 502).
            assert status == 502 and r.status == 502, (got, r)
            assert list(sim.requested).count((bridge, PORT)) == 2
        assert pod_status == 200  # other addresses of the pod network are pods as before
    finally:
        await gw.stop()

"""Every front through dial-in tunnels: the same tests as test_fronts_sshd.py (CONNECT to kubelets, proxy URLs,
logs follow, exec and port-forward upgrades, curl, Konnectivity gRPC), but each node's namespace runs no sshd and
drops new connections from outside (iptables), and its tunnel is the real OpenSSH client running the command
``tunneld node ssh-command`` printed. Plus 64 MiB each way through CONNECT, byte-exact."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.dialinbed import DialinBed
from tests.nodeagent import pattern
from tests.sshbed import IP
from tests.system.test_fronts_sshd import (  # noqa: F401 - the tests run here again, with this module's gw
    Cluster,
    _config,
    cluster,
    test_apiserver_style_https_to_kubelet_through_connect,
    test_curl_through_both_connect_listeners_reaches_a_kubelet,
    test_konnectivity_grpc_through_real_sshd,
    test_proxy_urls_logs_exec_and_portforward_over_real_sshd,
)
from tunneld.app import Gateway
from tunneld.config import load_config

MiB = 1024 * 1024


def _isolate(netns: str) -> None:
    """No sshd, and no new connection into the namespace from outside: the gateway cannot dial this node."""
    subprocess.run([IP, "netns", "exec", netns, "iptables", "-A", "INPUT", "-i", "eth0", "-m", "conntrack",
                    "--ctstate", "NEW", "-j", "DROP"], check=True, timeout=10)


@pytest.fixture
async def gw(cluster: Cluster) -> AsyncIterator[Gateway]:  # noqa: F811 - replaces test_fronts_sshd's gw
    hosts = [n.host_address for n in cluster.nodes]
    assert all(hosts)
    bed = DialinBed(cluster.workdir, gateway_host="0.0.0.0", principals=",".join(str(h) for h in hosts))
    path = _config(cluster)
    text = path.read_text()
    for node in cluster.nodes:
        node.kill_sshd()  # before it is replaced below
        assert node.netns is not None
        _isolate(node.netns)
        text = text.replace(f'name = "{node.name}"\n', f'name = "{node.name}"\nmode = "dial-in"\n')
    dialin = bed.config_text([]).split("[dialin]", 1)[1]
    text += f"\n[policy]\nnode_ports = [\"{cluster.nodes[0].app_port}\"]\n\n[dialin]{dialin}"
    path.write_text(text)
    gateway = Gateway(load_config(path))
    await gateway.start()
    try:
        assert gateway.dialin is not None
        for node in cluster.nodes:  # the gateway cannot reach the node
            with pytest.raises(OSError):
                socket.create_connection((node.address, 22), timeout=1).close()
            argv, line = bed.ssh_command(path, node.name, gateway.dialin.port, bed.node_key(node.name),
                                         gateway_host=node.host_address)
            proc = bed.start_ssh(argv, line, node.name, netns=node.netns)
            # The shared tests' "the node's sshd killed mid-stream" is, for a dial-in node, its ssh killed.
            node.kill_sshd = proc.kill  # type: ignore[method-assign]
        deadline = time.monotonic() + 30
        while not all(t.state.value == "up" for t in gateway.pool.tunnels.values()):
            logs = {n.name: bed.ssh_log(n.name) for n in cluster.nodes}
            assert time.monotonic() < deadline, f"dial-in tunnels did not come up: {logs}"
            await asyncio.sleep(0.1)
        assert {t["mode"] for t in gateway.pool.snapshot()} == {"dial-in"}
        await gateway.api_front.pods.refresh()
        assert not gateway.api_front.pods.unlisted
        yield gateway
    finally:
        await gateway.stop()
        bed.close()


async def _connect(sock_path: Path, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(str(sock_path), limit=4 * MiB)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def test_connect_carries_64_mib_each_way_byte_exact(cluster: Cluster, gw: Gateway) -> None:  # noqa: F811
    node = cluster.nodes[0]
    target = f"{node.address}:{node.app_port}"
    upload = pattern(7, 4 * MiB, 0) * 16
    reader, writer = await _connect(cluster.egress, target)
    writer.write(f"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: {len(upload)}\r\nConnection: close\r\n\r\n"
                 .encode())
    for i in range(0, len(upload), MiB):
        writer.write(upload[i:i + MiB])
        await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 120)
    assert answer.rstrip().endswith(f"{len(upload)} {hashlib.sha256(upload).hexdigest()}".encode()), answer[-200:]
    writer.close()

    reader, writer = await _connect(cluster.egress, target)
    writer.write(b"GET /stream?chunks=64&size=1048576&seed=3 HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    for i in range(64):
        size = int((await asyncio.wait_for(reader.readline(), 30)).strip(), 16)
        assert size == MiB
        chunk = await asyncio.wait_for(reader.readexactly(size + 2), 30)
        assert chunk[:-2] == pattern(3, MiB, i), f"chunk {i} differs"
    assert (await asyncio.wait_for(reader.readline(), 30)).strip() == b"0"
    writer.close()

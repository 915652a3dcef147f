"""The fronts end to end over real OpenSSH: apiserver-like clients -> gateway -> sshd in a node's network namespace
-> a kubelet (the simulated one, `python -m tunneld.dev.kubelet`, run inside the namespace) and its pods.

Each node's namespace gets a pod IP on its loopback (10.250.<i>.10); the kubelet's serving certificate comes from a
test kubelet CA and names the node, the pods' from a test pod CA. The gateway verifies both.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.sshbed import IP, SshBed, SshNode
from tests.waiting import wait_for
from tunneld.app import Gateway
from tunneld.config import load_config
from tunneld.dev.pki import DevCA
from tunneld.dev.podapps import ECHO_PORT

from ..curl import curl
from ..konnectivity import Client, DialFailed
from ..proxyauth import HEADER, auth_section
from ..relay import unix_relay
from ..wsclient import read_channel, recv_until_closed, status_of
from .conftest import write_config

AUTH = ": ".join(HEADER)
KUBELET_HEALTHZ = 10247  # the bed's node agent already serves 10248 inside each namespace
MiB = 1024 * 1024


@dataclass
class Cluster:
    bed: SshBed
    workdir: Path
    kubelet_ca: Path
    pod_ca: Path
    egress: Path
    nodes: list[SshNode] = field(default_factory=list)
    kubelets: list[subprocess.Popen[str]] = field(default_factory=list)

    def pod_ip(self, i: int, host: int = 10) -> str:
        return f"10.250.{i + 1}.{host}"


def _start_kubelet(c: Cluster, node: SshNode, i: int, kca: DevCA, pca: DevCA) -> subprocess.Popen[str]:
    d = c.workdir / node.name
    d.mkdir()
    kca.issue_serving(node.name, [node.name, node.address]).write(d / "kubelet.crt", d / "kubelet.key")
    pca.issue_serving(f"web-{i}", [c.pod_ip(i), f"web-{i}"]).write(d / "pod.crt", d / "pod.key")
    assert node.netns is not None
    for ip in (c.pod_ip(i), c.pod_ip(i, 11)):
        subprocess.run([IP, "netns", "exec", node.netns, IP, "addr", "add", f"{ip}/32", "dev", "lo"],
                       check=True, timeout=10)
    proc = subprocess.Popen(
        [IP, "netns", "exec", node.netns, sys.executable, "-m", "tunneld.dev.kubelet", "--node", node.name,
         "--address", node.address, "--healthz-port", str(KUBELET_HEALTHZ), "--cert", str(d / "kubelet.crt"),
         "--key", str(d / "kubelet.key"), "--pod-cert", str(d / "pod.crt"), "--pod-key", str(d / "pod.key"),
         "--pod", f"default/web-{i}/{c.pod_ip(i)}", "--pod", f"kube-system/agent-{i}/{c.pod_ip(i, 11)}/agent,sidecar"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    line = proc.stdout.readline() if ready else ""
    if line.strip() != "ready":
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"kubelet of {node.name} did not start: {line!r} {err}")
    return proc


@pytest.fixture
def cluster(bed: SshBed) -> Iterator[Cluster]:
    if bed.mode != "netns":
        pytest.skip("needs network namespaces (pod IPs live on each node's own loopback)")
    workdir = bed.workdir / "fronts"
    workdir.mkdir()
    kca, pca, eca = DevCA("test kubelet CA"), DevCA("test pod CA"), DevCA("test egress CA")
    c = Cluster(bed, workdir, workdir / "kubelet-ca.crt", workdir / "pod-ca.crt", workdir / "egress.sock")
    c.kubelet_ca.write_bytes(kca.cert_pem)
    c.pod_ca.write_bytes(pca.cert_pem)
    (workdir / "egress-ca.crt").write_bytes(eca.cert_pem)
    eca.issue_serving("egress", ["127.0.0.1"]).write(workdir / "egress.crt", workdir / "egress.key")
    eca.issue_client("kube-apiserver").write(workdir / "client.crt", workdir / "client.key")
    try:
        for i in range(2):
            node = bed.add_node(f"node-{i}")
            c.nodes.append(node)
            c.kubelets.append(_start_kubelet(c, node, i, kca, pca))
        yield c
    finally:
        for proc in c.kubelets:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _config(c: Cluster) -> Path:
    path = write_config(c.bed, [n.name for n in c.nodes], c.workdir / "tunneld.toml")
    text = path.read_text()
    for i, node in enumerate(c.nodes):  # give each node its pod CIDR
        text = text.replace(f'name = "{node.name}"\n', f'name = "{node.name}"\npod_cidr = "10.250.{i + 1}.0/24"\n')
    text = text.replace("[status]", (
        f'[kubelet]\ncertificate_authority = "{c.kubelet_ca}"\n\n'
        f'[egress]\nsocket = "{c.egress}"\ngrpc_socket = "{c.workdir / "grpc.sock"}"\n'
        f'listen = "127.0.0.1:0"\ntls_cert = "{c.workdir / "egress.crt"}"\n'
        f'tls_key = "{c.workdir / "egress.key"}"\nclient_ca = "{c.workdir / "egress-ca.crt"}"\n\n'
        f'[proxy]\nlisten = "127.0.0.1:0"\ntarget_certificate_authority = "{c.pod_ca}"\npods_refresh = 1\n\n'
        + auth_section(c.workdir) +
        '[[services]]\nnamespace = "default"\nname = "web"\n'
        f'endpoints = ["{c.pod_ip(0)}", "{c.pod_ip(1)}"]\n'
        'ports = [{name = "http", port = 80, target_port = 8080}]\n\n'
        "[status]"
    ))
    path.write_text(text)
    return path


@pytest.fixture
async def gw(cluster: Cluster) -> AsyncIterator[Gateway]:
    gateway = Gateway(load_config(_config(cluster)))
    await gateway.start()
    try:
        await wait_for(lambda: all(t.state.value == "up" for t in gateway.pool.tunnels.values()), 30,
                       "tunnels up", interval=0.1)
        await gateway.api_front.pods.refresh()
        assert not gateway.api_front.pods.unlisted
        yield gateway
    finally:
        await gateway.stop()


def base(gw: Gateway) -> str:
    return f"127.0.0.1:{gw.proxy.ports[0]}"


class _UnixHTTPS(http.client.HTTPSConnection):
    """HTTPS through a CONNECT tunnel on a unix socket: what kube-apiserver does to reach a kubelet via egress."""

    def __init__(self, path: Path, context: ssl.SSLContext) -> None:
        super().__init__("localhost", timeout=15, context=context)
        self._path = str(path)

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)
        self._tunnel()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._tunnel_host)


@pytest.mark.both_loops
async def test_apiserver_style_https_to_kubelet_through_connect(cluster: Cluster, gw: Gateway) -> None:
    node = cluster.nodes[1]
    ctx = ssl.create_default_context(cafile=str(cluster.kubelet_ca))

    def get() -> tuple[int, bytes]:
        conn = _UnixHTTPS(cluster.egress, ctx)
        conn.set_tunnel(node.address, 10250)
        try:
            conn.request("GET", "/pods")
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    status, body = await asyncio.get_running_loop().run_in_executor(None, get)
    assert status == 200
    assert {p["metadata"]["name"] for p in json.loads(body)["items"]} == {"web-1", "agent-1"}


@pytest.mark.both_loops
async def test_proxy_urls_logs_exec_and_portforward_over_real_sshd(cluster: Cluster, gw: Gateway) -> None:
    r = await curl("-H", AUTH, f"http://{base(gw)}/api/v1/nodes/node-0/proxy/healthz")
    assert r.stdout == b"ok", r
    r = await curl("-H", AUTH, f"http://{base(gw)}/api/v1/namespaces/default/pods/https:web-1:8443/proxy/x?y=1")
    seen = json.loads(r.stdout)
    assert (seen["pod"], seen["node"], seen["path"]) == ("web-1", "node-1", "/x?y=1")
    r = await curl("-H", AUTH, f"http://{base(gw)}/api/v1/namespaces/default/pods/web-0/proxy/plain")
    assert json.loads(r.stdout)["pod"] == "web-0"
    follow = await asyncio.create_subprocess_exec(
        "curl", "-sSN", "--max-time", "30", "-H", AUTH,
        f"http://{base(gw)}/api/v1/namespaces/default/pods/web-1/log?follow=true&tailLines=1",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert follow.stdout is not None
    try:
        async with asyncio.timeout(20):
            lines = [(await follow.stdout.readline()).decode().strip() for _ in range(3)]
    finally:
        follow.terminate()
        await follow.wait()
    assert lines == [f"node-1/web-1/app line {n}" for n in (19, 20, 21)]
    r = await curl("-H", AUTH,
                   f"http://{base(gw)}/api/v1/namespaces/kube-system/pods/agent-0/log?container=sidecar&tailLines=2")
    assert r.stdout.decode().splitlines() == ["node-0/agent-0/sidecar line 18", "node-0/agent-0/sidecar line 19"]
    r = await curl("-H", AUTH, f"http://{base(gw)}/api/v1/namespaces/default/services/web/proxy/")
    assert json.loads(r.stdout)["pod"] in ("web-0", "web-1")

    async with connect(f"ws://{base(gw)}/api/v1/namespaces/default/pods/web-0/exec?command=cat&stdin=true"
                       "&stdout=true", subprotocols=["v5.channel.k8s.io"], max_size=None,  # type: ignore[list-item]
                       open_timeout=10, additional_headers=[HEADER]) as conn:
        data = os.urandom(MiB)
        reader = asyncio.create_task(read_channel(conn, 1, len(data)))
        for i in range(0, len(data), 60_000):
            await conn.send(b"\x00" + data[i:i + 60_000])
        assert await reader == data
        await conn.send(bytes([255, 0]))
        assert status_of(await recv_until_closed(conn))["status"] == "Success"

    async with connect(f"ws://{base(gw)}/api/v1/namespaces/default/pods/web-1/portforward?ports={ECHO_PORT}",
                       subprotocols=["v4.channel.k8s.io"], max_size=None,  # type: ignore[list-item]
                       open_timeout=10, additional_headers=[HEADER]) as conn:
        assert len([await conn.recv(), await conn.recv()]) == 2  # port preambles
        data = os.urandom(16 * MiB)
        reader = asyncio.create_task(read_channel(conn, 0, len(data), timeout=60))
        for i in range(0, len(data), 64 * 1024):
            await conn.send(b"\x00" + data[i:i + 64 * 1024])
        assert hashlib.sha256(await reader).digest() == hashlib.sha256(data).digest()


@pytest.mark.both_loops
async def test_curl_through_both_connect_listeners_reaches_a_kubelet(cluster: Cluster, gw: Gateway) -> None:
    node, w = cluster.nodes[0], cluster.workdir
    url = f"https://{node.address}:10250/healthz"
    async with unix_relay(cluster.egress) as port:
        r = await curl("-p", "-x", f"http://127.0.0.1:{port}", "--cacert", str(cluster.kubelet_ca), url)
    assert r.stdout == b"ok", r
    r = await curl("-p", "-x", f"https://127.0.0.1:{gw.egress.ports[0]}", "--proxy-cacert", str(w / "egress-ca.crt"),
                   "--proxy-cert", str(w / "client.crt"), "--proxy-key", str(w / "client.key"),
                   "--cacert", str(cluster.kubelet_ca), url)
    assert r.stdout == b"ok", r
    r = await curl("-p", "-x", f"https://127.0.0.1:{gw.egress.ports[0]}", "--proxy-cacert", str(w / "egress-ca.crt"),
                   "--cacert", str(cluster.kubelet_ca), url)
    assert r.returncode != 0 and r.stdout == b""  # no client certificate


async def test_a_dead_node_fails_fast_and_the_other_keeps_serving(cluster: Cluster, gw: Gateway) -> None:
    cluster.nodes[0].kill_sshd()
    tunnel = gw.pool.tunnels["node-0"]
    await wait_for(lambda: tunnel.state.value != "up", 15, "node-0's tunnel to notice", interval=0.1)
    started = time.monotonic()
    r = await curl("-H", AUTH, "-i", f"http://{base(gw)}/api/v1/nodes/node-0/proxy/healthz")
    # down and reconnecting: 503 (retry later); 502 is kept for a node whose host key or login is refused
    assert r.stdout.startswith(b"HTTP/1.1 503") and b"tunnel to node node-0" in r.stdout, r.stdout
    assert time.monotonic() - started < 5
    r = await curl("-H", AUTH, f"http://{base(gw)}/api/v1/nodes/node-1/proxy/healthz")
    assert r.stdout == b"ok"


@pytest.mark.both_loops
async def test_konnectivity_grpc_through_real_sshd(cluster: Cluster, gw: Gateway) -> None:
    """An apiserver-shaped gRPC client: a pod's echo byte-exact both ways, the kubelet's TLS, refusals, tunnel loss."""
    client = Client(cluster.workdir / "grpc.sock")
    try:
        conn = await client.dial(f"{cluster.pod_ip(1)}:{ECHO_PORT}")
        blob = os.urandom(16 * MiB)
        sent = asyncio.create_task(_send_all(conn, blob))
        got = bytearray()
        async with asyncio.timeout(60):
            while len(got) < len(blob):
                got += await conn.read()
        await sent
        assert hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
        assert await conn.close() == ""
        with pytest.raises(DialFailed, match="not a node, pod or service"):
            await client.dial("198.51.100.7:443")
        # The kubelet's TLS through the stream (its certificate names the node and chains to the kubelet CA).
        node = cluster.nodes[0]
        conn = await client.dial(f"{node.address}:10250")
        ctx = ssl.create_default_context(cafile=str(cluster.kubelet_ca))
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname=node.address)
        async with asyncio.timeout(30):
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        await conn.write(outgoing.read())
                    incoming.write(await conn.read())
        assert tls.version() is not None
        # The node's sshd killed mid-stream: CLOSE_RSP carries an error, never a clean end.
        conn = await client.dial(f"{cluster.pod_ip(0)}:{ECHO_PORT}")
        await conn.write(b"ping")
        assert await conn.read() == b"ping"
        node.kill_sshd()
        _, error = await asyncio.wait_for(conn.read_all(), 30)
        assert error
    finally:
        await client.close()


async def _send_all(conn: object, blob: bytes) -> None:
    for i in range(0, len(blob), 256 * 1024):
        await conn.write(blob[i:i + 256 * 1024])  # type: ignore[attr-defined]

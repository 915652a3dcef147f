"""The egress front (HTTP CONNECT, as kube-apiserver's egress selector uses it) against the dev cluster's nodes.

Clients are real: Python's http.client tunnelling through the unix socket, curl through the mutual-TLS listener, and
raw sockets where the exact bytes on the wire are the point (the apiserver's contract).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from certs.files import write_secret
from tunneld.cli.localapi import UnixHTTPConnection
from tunneld.config import Config, EgressSettings, PolicySettings, TLSServerSettings
from tunneld.dev.cluster import HEALTHZ_PORT, DevCluster
from tunneld.dev.pki import DevCA

from ..curl import curl
from ..relay import unix_relay
from .conftest import ECHO_PORT, SOURCE_PORT, NodeServers, fast_config, source_stalls, started, wait_for

MiB = 1024 * 1024
T = TypeVar("T")


def egress_config(cluster: DevCluster, sock: Path | None, **egress: object) -> Config:
    cfg = fast_config(cluster)
    return replace(cfg, egress=EgressSettings(socket=sock, **egress),  # type: ignore[arg-type]
                   policy=PolicySettings(node_ports=(str(ECHO_PORT), str(SOURCE_PORT), str(HEALTHZ_PORT))))


async def connect_raw(sock: Path, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a CONNECT as the apiserver does; return the stream and the response head (through the blank line)."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: egress-test\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer, head


async def refused(sock: Path, request: bytes) -> tuple[bytes, bytes]:
    """Send ``request`` raw; return (status line, body) of the answer, which must end with the connection."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    try:
        writer.write(request)
        data = await asyncio.wait_for(reader.read(-1), 10)  # EOF: the front closes after a failure
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], body


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


@pytest.mark.both_loops
async def test_http_client_tunnels_through_unix_socket_to_kubelet_healthz(cluster: DevCluster,
                                                                          short_dir: Path) -> None:
    sock = short_dir / "egress.sock"
    gw = await started(egress_config(cluster, sock))
    try:
        assert sock.stat().st_mode & 0o777 == 0o600
        node = cluster.sim_nodes[1]

        def get() -> tuple[int, bytes]:
            conn = UnixHTTPConnection(str(sock), timeout=10)
            conn.set_tunnel(node.address, HEALTHZ_PORT)
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                return resp.status, resp.read()
            finally:
                conn.close()

        assert await in_thread(get) == (200, b"ok")
        tunnel = gw.pool.tunnels[node.name]
        assert tunnel.counters.channels_total >= 1  # it went through that node's tunnel
    finally:
        await gw.stop()


async def test_connect_reply_is_exactly_the_status_line(cluster: DevCluster, node_servers: NodeServers,
                                                        short_dir: Path) -> None:
    """The apiserver reads the reply head and then expects the tunnel: no headers, nothing else."""
    sock = short_dir / "egress.sock"
    gw = await started(egress_config(cluster, sock))
    try:
        node = cluster.sim_nodes[0]
        reader, writer, head = await connect_raw(sock, f"{node.address}:{ECHO_PORT}")
        assert head == b"HTTP/1.1 200 Connection established\r\n\r\n"
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        writer.close()
    finally:
        await gw.stop()


@pytest.mark.both_loops
async def test_connect_large_transfer_with_half_close_is_byte_exact(cluster: DevCluster, node_servers: NodeServers,
                                                                    short_dir: Path) -> None:
    sock = short_dir / "egress.sock"
    gw = await started(egress_config(cluster, sock))
    try:
        node = cluster.sim_nodes[2]
        reader, writer, head = await connect_raw(sock, f"{node.address}:{ECHO_PORT}")
        assert head.startswith(b"HTTP/1.1 200 ")
        sent, got = hashlib.sha256(), hashlib.sha256()
        size = 24 * MiB

        async def send() -> None:
            for i in range(size // MiB):
                chunk = os.urandom(MiB) if i % 4 == 0 else bytes([i]) * MiB
                sent.update(chunk)
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()  # half-close: the echo must still send everything back, then end

        async def receive() -> int:
            n = 0
            while data := await reader.read(256 * 1024):
                got.update(data)
                n += len(data)
            return n

        _, received = await asyncio.wait_for(asyncio.gather(send(), receive()), 60)
        assert received == size
        assert got.hexdigest() == sent.hexdigest()
        writer.close()
        tunnel = gw.pool.tunnels[node.name]
        await wait_for(lambda: tunnel.counters.open_channels == 0, what="channel closed")
    finally:
        await gw.stop()


async def test_slow_reader_stops_the_sender_instead_of_growing_buffers(cluster: DevCluster,
                                                                       node_servers: NodeServers,
                                                                       short_dir: Path) -> None:
    sock = short_dir / "egress.sock"
    gw = await started(egress_config(cluster, sock))
    try:
        node = cluster.sim_nodes[0]
        reader, writer, head = await connect_raw(sock, f"{node.address}:{SOURCE_PORT}")
        assert head.startswith(b"HTTP/1.1 200 ")
        # Do not read: the source may fill the socket buffers, the SSH window and one read chunk, then must stall.
        last = await source_stalls(lambda: node_servers.source_written[0])
        assert last < 24 * MiB, f"{last} bytes buffered for a reader that reads nothing"
        # Then everything arrives, in order and intact.
        expected = hashlib.sha256(b"".join(bytes([i]) * MiB for i in range(64))).hexdigest()
        got, n = hashlib.sha256(), 0
        async with asyncio.timeout(60):
            while data := await reader.read(256 * 1024):
                got.update(data)
                n += len(data)
        assert n == 64 * MiB and got.hexdigest() == expected
        writer.close()
    finally:
        await gw.stop()


@pytest.mark.both_loops
async def test_refusals_have_a_status_line_and_reason(cluster: DevCluster, short_dir: Path) -> None:
    sock = short_dir / "egress.sock"
    gw = await started(egress_config(cluster, sock))
    try:
        node = cluster.sim_nodes[0]
        cases: list[tuple[bytes, bytes, bytes]] = [
            # not part of the cluster: never dialed
            (b"CONNECT 127.0.0.53:53 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b"403", b"not a node, pod or service"),
            # a node, but a port the policy does not allow
            (f"CONNECT {node.address}:22 HTTP/1.1\r\nHost: x\r\n\r\n".encode(), b"403", b"policy.node_ports"),
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"405", b"only supports CONNECT"),
            (b"CONNECT nonsense HTTP/1.1\r\nHost: x\r\n\r\n", b"400", b"invalid CONNECT target"),
            (b"CONNECT 10.0.0.1:99999 HTTP/1.1\r\nHost: x\r\n\r\n", b"400", b"is not a port"),
            (b"NOT HTTP AT ALL\r\n\r\n", b"400", b"malformed"),
        ]
        for request, status, reason in cases:
            line, body = await refused(sock, request)
            assert line.split(b" ")[1] == status, (request, line, body)
            assert reason in body, (request, body)
    finally:
        await gw.stop()


async def test_tunnel_down_is_503_with_the_reason(cluster: DevCluster, short_dir: Path) -> None:
    sock = short_dir / "egress.sock"
    gw = await started(egress_config(cluster, sock))
    try:
        node = cluster.sim_nodes[1]
        await node.stop()
        tunnel = gw.pool.tunnels[node.name]
        await wait_for(lambda: tunnel.state.value in ("down", "connecting"), what="tunnel down")
        line, body = await refused(sock, f"CONNECT {node.address}:{HEALTHZ_PORT} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert line.startswith(b"HTTP/1.1 503 Service Unavailable"), line
        assert f"tunnel to node {node.name}".encode() in body
        # the other nodes still work
        _, writer, head = await connect_raw(sock, f"{cluster.sim_nodes[0].address}:{HEALTHZ_PORT}")
        assert head.startswith(b"HTTP/1.1 200 ")
        writer.close()
    finally:
        await gw.stop()


@pytest.fixture
def mtls(short_dir: Path) -> dict[str, Path]:
    """A client CA with one client certificate, a server certificate, and a certificate from a foreign CA."""
    ca, other = DevCA("egress client CA"), DevCA("someone else")
    files: dict[str, Path] = {}

    def put(name: str, data: bytes, secret: bool = False) -> None:
        path = short_dir / name
        write_secret(path, data) if secret else path.write_bytes(data)
        files[name] = path

    put("ca.crt", ca.cert_pem)
    server = ca.issue_serving("tunneld egress", ["127.0.0.1", "localhost"])
    put("server.crt", server.cert_pem)
    put("server.key", server.key_pem, True)
    client = ca.issue_client("kube-apiserver", ("system:masters",))
    put("client.crt", client.cert_pem)
    put("client.key", client.key_pem, True)
    foreign = other.issue_client("kube-apiserver")
    put("foreign.crt", foreign.cert_pem)
    put("foreign.key", foreign.key_pem, True)
    return files


@pytest.mark.both_loops
async def test_curl_through_the_unix_socket_reaches_a_kubelet(cluster: DevCluster, short_dir: Path) -> None:
    sock = short_dir / "egress.sock"
    gw = await started(egress_config(cluster, sock))
    try:
        node = cluster.sim_nodes[2]
        async with unix_relay(sock) as port:
            r = await curl("-p", "-x", f"http://127.0.0.1:{port}", "--cacert",
                           str(cluster.workdir / "kubelet-ca.crt"), f"https://{node.address}:10250/pods", timeout=15)
        # curl verified the kubelet's certificate itself: the tunnel is end to end
        assert r.returncode == 0, r.stderr
        assert b'"web-3"' in r.stdout and b'"agent-node-3"' in r.stdout
    finally:
        await gw.stop()


@pytest.mark.both_loops
async def test_curl_through_mutual_tls_listener(cluster: DevCluster, mtls: dict[str, Path],
                                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="proxy.audit")
    tls = TLSServerSettings(mtls["server.crt"], mtls["server.key"], mtls["ca.crt"])
    gw = await started(egress_config(cluster, None, listen="127.0.0.1:0", tls=tls))
    try:
        port = gw.egress.ports[0]
        node = cluster.sim_nodes[0]
        url = f"https://{node.address}:10250/healthz"
        proxy = ["-p", "-x", f"https://127.0.0.1:{port}", "--proxy-cacert", str(mtls["ca.crt"]),
                 "--cacert", str(cluster.workdir / "kubelet-ca.crt")]
        ok = await curl(*proxy, "--proxy-cert", str(mtls["client.crt"]), "--proxy-key", str(mtls["client.key"]), url,
                        timeout=15)
        assert ok.returncode == 0 and ok.stdout == b"ok", ok.stderr
        # no client certificate: the TLS handshake is refused, nothing is proxied
        def kubelet_dials() -> int:  # channels asked of the node for its kubelet port (health probes go elsewhere)
            return sum(1 for _host, port in node.requested if port == 10250)

        before = kubelet_dials()
        anon = await curl(*proxy, url, timeout=15)
        assert anon.returncode != 0 and anon.stdout == b""
        # a certificate from another CA: refused the same way
        foreign = await curl(*proxy, "--proxy-cert", str(mtls["foreign.crt"]), "--proxy-key",
                             str(mtls["foreign.key"]), url, timeout=15)
        assert foreign.returncode != 0 and foreign.stdout == b""
        assert kubelet_dials() == before
        # both refusals are in the audit log, with the peer and the reason
        refused = [r for r in caplog.records if r.name == "proxy.audit" and "TLS handshake refused" in r.getMessage()]
        assert len(refused) == 2 and all(r.levelno == logging.WARNING for r in refused), refused
        assert all(getattr(r, "peer", "").startswith("127.0.0.1:") for r in refused)
        reasons = " ".join(r.getMessage() for r in refused)
        assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reasons and "CERTIFICATE_VERIFY_FAILED" in reasons, reasons
        # a bare TCP connect and close (a port scan, a load balancer's check) is noted at info, not warned about
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.close()
        await wait_for(lambda: len([r for r in caplog.records if "TLS handshake refused" in r.getMessage()]) == 3,
                       what="the third refusal logged")
        third = [r for r in caplog.records if "TLS handshake refused" in r.getMessage()][2]
        assert third.levelno == logging.INFO, third.getMessage()
    finally:
        await gw.stop()

"""What a CONNECT client sees when its stream breaks, and what a stalled stream costs, under real OpenSSH sshd.

Each broken-stream shape runs two clients side by side, one on the egress front's mutual-TLS TCP listener and one on
its unix socket, reading raw bytes through the tunnel (a paced /stream of the node agent) and then until the end:

    shape               TCP client   unix-socket client
    target reset        EOF          EOF        (sshd passes the target's reset on as an ordinary channel EOF)
    sshd killed         reset        EOF        (the tunnel is lost; a unix socket has no reset)
    tunnel partition    reset        EOF        (keepalive declares the tunnel lost)

The memory test measures, with tracemalloc, what the gateway (the only Python code in this process on the data
path: sshd and the target are other processes) holds for clients that never read a large download.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
import tracemalloc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from certs.files import write_secret
from tests.sshbed import SshBed, SshNode
from tunneld.app import Gateway
from tunneld.config import load_config
from tunneld.dev.pki import DevCA
from tunneld.tunnels.ssh import CHANNEL_WINDOW

from .conftest import wait_for, write_config

pytestmark = pytest.mark.system

KiB, MiB = 1024, 1024 * 1024
STREAM = "/stream?chunks=2000&size=4096&delay=0.005&seed=3"  # ~10 s, paced: a fault lands mid-stream


async def _gateway(bed: SshBed, node: SshNode) -> tuple[Gateway, ssl.SSLContext]:
    ca = DevCA("egress client CA")
    d = bed.workdir
    server, client = ca.issue_serving("egress", ["127.0.0.1"]), ca.issue_client("kube-apiserver")
    (d / "eca.crt").write_bytes(ca.cert_pem)
    (d / "es.crt").write_bytes(server.cert_pem)
    write_secret(d / "es.key", server.key_pem)
    (d / "ec.crt").write_bytes(client.cert_pem)
    write_secret(d / "ec.key", client.key_pem)
    path = write_config(bed, [node.name])
    path.write_text(path.read_text() + (
        f'[egress]\nsocket = "{d / "egress.sock"}"\nlisten = "127.0.0.1:0"\n'
        f'tls_cert = "{d / "es.crt"}"\ntls_key = "{d / "es.key"}"\nclient_ca = "{d / "eca.crt"}"\n\n'
        f"[policy]\nnode_ports = [{node.app_port}]\n"
    ))
    gw = Gateway(load_config(path))
    await gw.start()
    await wait_for(lambda: gw.pool.tunnels[node.name].state.value == "up", what="tunnel up")
    tls = ssl.create_default_context(cafile=str(d / "eca.crt"))
    tls.load_cert_chain(str(d / "ec.crt"), str(d / "ec.key"))
    return gw, tls


@pytest.fixture
async def node(bed: SshBed) -> SshNode:
    return bed.add_node("node-0")


@pytest.fixture
async def gw(bed: SshBed, node: SshNode) -> AsyncIterator[tuple[Gateway, ssl.SSLContext]]:
    gateway, tls = await _gateway(bed, node)
    try:
        yield gateway, tls
    finally:
        await gateway.stop()


async def tunnel(gw: Gateway, tls: ssl.SSLContext | None, node: SshNode, request: str = STREAM,
                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """CONNECT over TCP (``tls``) or the unix socket, then send a raw GET through the tunnel."""
    if tls is not None:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.egress.ports[0], ssl=tls,
                                                       server_hostname="127.0.0.1")
    else:
        assert gw.config.egress.socket is not None
        reader, writer = await asyncio.open_unix_connection(str(gw.config.egress.socket))
    writer.write(f"CONNECT {node.address}:{node.app_port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200 "), head
    writer.write(f"GET {request} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
    return reader, writer


async def read_to_end(reader: asyncio.StreamReader, started: asyncio.Event, timeout: float = 30) -> tuple[str, int]:
    """Raw bytes until the connection ends: (``reset`` or ``eof``, bytes read); ``started`` is set after 64 KiB."""
    n = 0
    try:
        async with asyncio.timeout(timeout):
            while data := await reader.read(64 * KiB):
                n += len(data)
                if n >= 64 * KiB:
                    started.set()
    except ConnectionResetError:
        return "reset", n
    except ssl.SSLError as exc:
        return f"tls error {exc.reason}", n
    return "eof", n


async def both_clients(gw: Gateway, tls: ssl.SSLContext, node: SshNode, fault: object,
                       request: str = STREAM) -> dict[str, str]:
    tcp_started, unix_started = asyncio.Event(), asyncio.Event()
    tcp_r, tcp_w = await tunnel(gw, tls, node, request)
    unix_r, unix_w = await tunnel(gw, None, node, request)
    tcp = asyncio.create_task(read_to_end(tcp_r, tcp_started))
    unix = asyncio.create_task(read_to_end(unix_r, unix_started))
    async with asyncio.timeout(15):
        await tcp_started.wait()
        await unix_started.wait()
    if callable(fault):
        fault()
    (tcp_seen, tcp_n), (unix_seen, unix_n) = await asyncio.gather(tcp, unix)
    total = 2000 * 4096
    assert 64 * KiB <= tcp_n < total and 64 * KiB <= unix_n < total, (tcp_n, unix_n)
    for w in (tcp_w, unix_w):
        w.close()
    await wait_for(lambda: gw.pool.open_channels == 0 and gw.egress.connections == 0, 10, "released")
    return {"tcp": tcp_seen, "unix": unix_seen}


@pytest.mark.slow
async def test_target_reset_reaches_the_client_as_an_eof(gw: tuple[Gateway, ssl.SSLContext], node: SshNode) -> None:
    # The target resets after 100 chunks; sshd reads ECONNRESET and sends the channel's EOF: the gateway cannot tell.
    seen = await both_clients(*gw, node, None, STREAM + "&reset=100")
    assert seen == {"tcp": "eof", "unix": "eof"}


@pytest.mark.slow
async def test_sshd_killed_mid_stream_is_a_reset_over_tcp(gw: tuple[Gateway, ssl.SSLContext], node: SshNode) -> None:
    seen = await both_clients(*gw, node, node.kill_sshd)
    assert seen == {"tcp": "reset", "unix": "eof"}


@pytest.mark.slow
async def test_tunnel_partition_mid_stream_is_a_reset_over_tcp(bed: SshBed, gw: tuple[Gateway, ssl.SSLContext],
                                                              node: SshNode) -> None:
    if bed.mode != "netns":
        pytest.skip("needs network namespaces for iptables")

    def partition() -> None:
        for chain in ("INPUT", "OUTPUT"):
            node.run(["iptables", "-I", chain, "-j", "DROP"], check=True)

    try:
        seen = await both_clients(*gw, node, partition)
    finally:
        for chain in ("INPUT", "OUTPUT"):
            node.run(["iptables", "-D", chain, "-j", "DROP"], check=False)
    assert seen == {"tcp": "reset", "unix": "eof"}


async def stalled_client(egress: Path, node: SshNode, request: str) -> socket.socket:
    """A raw socket that sends CONNECT and a GET, reads the CONNECT answer byte by byte, and then nothing: no Python
    buffer in this process holds its data (an asyncio client would read ahead into its StreamReader)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, str(egress))
    await loop.sock_sendall(sock, f"CONNECT {node.address}:{node.app_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = b""
    async with asyncio.timeout(10):
        while not head.endswith(b"\r\n\r\n") and len(head) < 1024:
            head += await loop.sock_recv(sock, 1)
    assert head.startswith(b"HTTP/1.1 200 "), head
    await loop.sock_sendall(sock, f"GET {request} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
    return sock


@pytest.mark.slow
async def test_stalled_downloads_hold_at_most_a_window_and_a_read_each(gw: tuple[Gateway, ssl.SSLContext],
                                                                      node: SshNode) -> None:
    gateway, _ = gw
    clients = 8
    big = "/stream?chunks=16384&size=65536&seed=5"  # 1 GiB each, as fast as the reader takes it
    gc.collect()
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        assert gateway.config.egress.socket is not None
        conns = [await stalled_client(gateway.config.egress.socket, node, big) for _ in range(clients)]

        def traced() -> int:
            return tracemalloc.get_traced_memory()[0] - baseline

        # Wait until the streams have stalled: the traced figure stops growing.
        last, steady = -1, 0
        async with asyncio.timeout(60):
            while steady < 10:  # 10 x 0.2 s without growth
                await asyncio.sleep(0.2)
                now = traced()
                steady = steady + 1 if now <= last + 64 * KiB else 0
                last = max(last, now)
        per_stream = traced() / clients
        bound = CHANNEL_WINDOW + 64 * KiB
        print(f"{clients} stalled streams: {per_stream / MiB:.2f} MiB each (bound {bound / MiB:.2f} MiB)")
        assert per_stream >= CHANNEL_WINDOW / 2, "the streams never filled up: the test measures nothing"
        assert per_stream <= bound, f"{per_stream / MiB:.2f} MiB per stalled stream"

        for sock in conns:
            sock.close()
        await wait_for(lambda: gateway.pool.open_channels == 0 and gateway.egress.connections == 0, 10,
                       "streams closed")
        gc.collect()
        await wait_for(lambda: traced() <= 1 * MiB, 10, "traced memory back within 1 MiB of its baseline")
    finally:
        tracemalloc.stop()


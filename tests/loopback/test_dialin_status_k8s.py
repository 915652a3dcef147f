"""Dial-in nodes from the Kubernetes node source (the label or annotation ``tunneld.io/mode``, through the fake API
server), and what ``tunneld status`` shows for them as an operator runs it: ``waiting`` with the mode in the
ADDRESS column, ``up`` with the peer once the real ssh logged in, ``Mode: dial-in`` in the detail, and a node
whose label flips back to dial-out becoming a dial-out tunnel (its dial-in connection closed)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.dialinbed import SSH, DialinBed, wait_exit
from tests.k8sapi import FakeKubeAPI, node_object
from tests.loopback.test_dialin import bed  # noqa: F401
from tests.waiting import wait_for
from tunneld.app import Gateway
from tunneld.config import load_checked
from tunneld.tunnels.k8s_nodes import SkipNode, node_from_object
from tunneld.tunnels.state import State

pytestmark = pytest.mark.skipif(not os.access(SSH, os.X_OK), reason="the OpenSSH client is missing")

ROOT = Path(__file__).resolve().parents[2]


def annotated(obj: dict, mode: str) -> dict:  # type: ignore[type-arg]
    obj["metadata"]["annotations"] = {"tunneld.io/mode": mode}
    return obj


def test_the_mode_comes_from_the_label_or_the_annotation() -> None:
    assert node_from_object(node_object("a", "10.0.0.1")).mode == "dial-out"
    assert node_from_object(node_object("a", "10.0.0.1", labels={"tunneld.io/mode": "dial-in"})).mode == "dial-in"
    assert node_from_object(annotated(node_object("a", "10.0.0.1"), "dial-in")).mode == "dial-in"
    both = annotated(node_object("a", "10.0.0.1", labels={"tunneld.io/mode": "dial-in"}), "dial-in")
    assert node_from_object(both).mode == "dial-in"
    with pytest.raises(SkipNode, match="disagree"):
        node_from_object(annotated(node_object("a", "10.0.0.1", labels={"tunneld.io/mode": "dial-in"}), "dial-out"))
    with pytest.raises(SkipNode, match=r"tunneld.io/mode 'sideways\?' is not one of dial-out, dial-in"):
        node_from_object(node_object("a", "10.0.0.1", labels={"tunneld.io/mode": "sideways\x1b"}))


@pytest.fixture
async def kapi(bed: DialinBed) -> AsyncIterator[FakeKubeAPI]:  # noqa: F811
    api = FakeKubeAPI(bed.dir / "k8s")
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


async def status(sock: Path, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunneld", "status", "--socket", str(sock), "--color", "never", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200"))
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def rows(table: str) -> dict[str, str]:
    return {line.split()[0]: line for line in table.splitlines()[1:] if line.strip()}


async def test_kubernetes_dial_in_nodes_in_tunneld_status(bed: DialinBed, kapi: FakeKubeAPI) -> None:  # noqa: F811
    sock = bed.dir / "status.sock"
    kapi.add_node(node_object("edge-1", "127.0.0.1", labels={"tunneld.io/mode": "dial-in"}))
    kapi.add_node(annotated(node_object("edge-2", "127.0.0.2"), "dial-in"))
    kapi.add_node(node_object("core-1", "127.0.0.3"))  # dial-out (nothing listens: it keeps retrying)
    kapi.add_node(node_object("odd-1", "127.0.0.4", labels={"tunneld.io/mode": "sideways"}))
    text = bed.config_text([]).replace('[status]\nsocket = ""', f'[status]\nsocket = "{sock}"')
    text += f'\n[inventory]\nsource = "kubernetes"\nkubeconfig = "{kapi.write_kubeconfig()}"\nssh_port = 1\n'
    path = bed.write_config(text)
    gw = Gateway(load_checked(path))
    await gw.start()
    try:
        assert gw.dialin is not None
        await wait_for(lambda: set(gw.pool.tunnels) == {"edge-1", "edge-2", "core-1"}, 10, "the API's nodes")
        table = await status(sock)
        assert table.splitlines()[0].split()[:3] == ["NODE", "ADDRESS", "STATE"]
        r = rows(table)
        assert "odd-1" not in r
        assert r["edge-1"].split()[1:4] == ["127.0.0.1", "dial-in", "waiting"], table
        assert r["edge-2"].split()[1:4] == ["127.0.0.2", "dial-in", "waiting"], table
        assert r["core-1"].split()[1] == "127.0.0.3:1" and "dial-in" not in r["core-1"], table

        argv, line = bed.ssh_command(path, "edge-1", gw.dialin.port, bed.node_key("edge-1"),
                                     extra=("--address", "127.0.0.1"))
        proc = bed.start_ssh(argv, line, "edge-1")
        await wait_for(lambda: gw.pool.tunnels["edge-1"].state is State.UP, 20, f"edge-1 up: {bed.ssh_log('edge-1')}")
        r = rows(await status(sock))
        peer = next(t["peer"] for t in gw.pool.snapshot() if t["node"] == "edge-1")
        fields = r["edge-1"].split()
        assert fields[1:4] == ["127.0.0.1", "dial-in", "from"] and fields[4].startswith("127.0.0.1:"), r["edge-1"]
        assert fields[5] == "up", r["edge-1"]
        assert fields[4] == peer
        assert r["edge-2"].split()[3] == "waiting"
        detail = await status(sock, "edge-1")
        assert any(line.split()[:2] == ["Mode", "dial-in"] for line in detail.splitlines()), detail
        doc = json.loads(await status(sock, "-o", "json"))
        modes = {t["node"]: (t["mode"], t["state"]) for t in doc["tunnels"]}
        assert modes["edge-1"] == ("dial-in", "up") and modes["edge-2"] == ("dial-in", "waiting")
        assert modes["core-1"][0] == "dial-out"

        # the label flips back: the node becomes dial-out and its dial-in connection is closed
        kapi.modify_node("edge-1", node_object("edge-1", "127.0.0.1", labels={"tunneld.io/mode": "dial-out"}))
        assert await wait_exit(proc, 15) == 255
        await wait_for(lambda: gw.pool.tunnels["edge-1"].node.mode == "dial-out", 10, "edge-1 dial-out")
        assert "dial-in" not in rows(await status(sock))["edge-1"]
    finally:
        await gw.stop(1)

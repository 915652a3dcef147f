"""The pool, dialer and status API against the dev cluster's simulated nodes (real asyncssh servers, loopback)."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import ClientSession, UnixConnector

from proxy.dialer import ChannelRefused, NoTunnel, TunnelDown
from tunneld.app import Gateway
from tunneld.dev.cluster import HEALTHZ_PORT, DevCluster
from tunneld.dev.sshnode import SSHMaterial
from tunneld.tunnels.probe import http_get

from .conftest import all_up, fast_config, started, states, wait_for


@pytest.mark.both_loops
async def test_tunnels_come_up_and_status_api_reports_them(cluster: DevCluster, short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    gw = await started(fast_config(cluster, socket=sock))
    try:
        await wait_for(lambda: all(t.last_probe is not None for t in gw.pool.tunnels.values()), what="probes")
        assert sock.stat().st_mode & 0o777 == 0o660
        async with ClientSession(connector=UnixConnector(path=str(sock))) as http:
            async with http.get("http://localhost/tunnels") as resp:
                assert resp.status == 200
                data = await resp.json()
            async with http.get("http://localhost/tunnels/nope") as resp:
                assert resp.status == 404
        tunnels = {t["node"]: t for t in data["tunnels"]}
        assert sorted(tunnels) == ["node-1", "node-2", "node-3"]
        for t in tunnels.values():
            assert t["state"] == "up" and t["connects"] == 1 and t["last_error"] is None
            assert t["last_probe"]["ok"] is True and t["last_probe"]["detail"] == "ok"
            assert t["bytes_in"] > 0 and t["bytes_out"] > 0, "the probe's bytes are counted"
        assert data["gateway"]["host_key_check"] == "strict"
        assert all(sim.logins == 1 and sim.active == 1 for sim in cluster.sim_nodes), "one SSH connection per node"
    finally:
        await gw.stop()
    assert not sock.exists()


@pytest.mark.both_loops
async def test_dial_routes_by_address_and_pod_cidr(cluster: DevCluster) -> None:
    gw = await started(fast_config(cluster))
    try:
        n1, n2 = gw.pool.nodes["node-1"], gw.pool.nodes["node-2"]
        for node in (n1, n2):
            status, body = await http_get(gw.unchecked_dialer.dial, node.address, HEALTHZ_PORT, "/healthz", 5)
            assert (status, body) == (200, b"ok")
            status, _ = await http_get(gw.unchecked_dialer.dial, node.name, HEALTHZ_PORT, "/healthz", 5)
            assert status == 200
        # Pod IPs route to the node owning the pod CIDR; the simulated node refuses anything beyond itself,
        # and its refusal names it, which shows which tunnel carried the dial.
        for pod_ip, owner in (("10.244.1.10", "node-1"), ("10.244.2.99", "node-2")):
            with pytest.raises(ChannelRefused) as exc:
                await gw.unchecked_dialer.dial(pod_ip, 80)
            assert exc.value.status == 502
            assert f"node {owner} refused" in str(exc.value) and f"reachable from {owner}" in str(exc.value)
    finally:
        await gw.stop()


async def test_random_fallback_and_refusal(cluster: DevCluster) -> None:
    cfg = fast_config(cluster)
    gw = await started(replace(cfg, health=replace(cfg.health, enabled=False)))  # no probes: only our dials
    try:
        # 127.0.0.1 belongs to no node: each dial goes through a healthy tunnel picked at random, and lands on that
        # node's loopback. 30 dials over 3 tunnels: every node gets some (a node missed by chance: p < 2e-5).
        for sim in cluster.sim_nodes:
            sim.requested.clear()
        for _ in range(30):
            stream = await gw.unchecked_dialer.dial("127.0.0.1", HEALTHZ_PORT)
            await stream.close()
        spread = {sim.name: sum(1 for r in sim.requested if r == ("127.0.0.1", HEALTHZ_PORT))
                  for sim in cluster.sim_nodes}
        assert sum(spread.values()) == 30, spread
        assert all(n >= 1 for n in spread.values()), f"the fallback always picks the same tunnels: {spread}"
    finally:
        await gw.stop()
    cfg = fast_config(cluster)
    gw = await started(replace(cfg, dial=replace(cfg.dial, random_fallback=False)))
    try:
        with pytest.raises(NoTunnel) as exc:
            await gw.unchecked_dialer.dial("127.0.0.1", HEALTHZ_PORT)
        assert exc.value.status == 503 and "random_fallback is off" in str(exc.value)
    finally:
        await gw.stop()


@pytest.mark.both_loops
async def test_node_down_and_back(cluster: DevCluster) -> None:
    gw = await started(fast_config(cluster))
    try:
        sim = cluster.sim_nodes[0]
        await sim.stop()
        await wait_for(lambda: states(gw)["node-1"] in ("down", "connecting"), what="node-1 down")
        assert states(gw)["node-2"] == "up" and states(gw)["node-3"] == "up"
        with pytest.raises(TunnelDown) as exc:
            await gw.unchecked_dialer.dial(sim.address, HEALTHZ_PORT)
        assert exc.value.status == 503 and "node-1" in str(exc.value)  # down and reconnecting: retry later
        assert gw.pool.tunnels["node-1"].machine.last_error
        await sim.start()
        await wait_for(lambda: states(gw)["node-1"] == "up", what="node-1 back up")
        assert gw.pool.tunnels["node-1"].machine.connects == 2
        assert gw.pool.tunnels["node-2"].machine.connects == 1, "other tunnels untouched"
        status, _ = await http_get(gw.unchecked_dialer.dial, sim.address, HEALTHZ_PORT, "/healthz", 5)
        assert status == 200
    finally:
        await gw.stop()


async def test_unhealthy_kubelet_degrades_tunnel(cluster: DevCluster) -> None:
    gw = await started(fast_config(cluster))
    try:
        cluster.kubelets[1].healthy = False
        await wait_for(lambda: states(gw)["node-2"] == "degraded", what="node-2 degraded")
        assert "answered 500" in (gw.pool.tunnels["node-2"].machine.last_error or "")
        assert [t.node.name for t in gw.pool.healthy()] == ["node-1", "node-3"]
        cluster.kubelets[1].healthy = True
        await wait_for(lambda: states(gw)["node-2"] == "up", what="node-2 recovered")
    finally:
        await gw.stop()


async def test_host_key_from_another_ca_is_refused_before_login(cluster: DevCluster, short_dir: Path) -> None:
    other = SSHMaterial.generate(short_dir)  # a CA the nodes' host keys are NOT signed by
    kh = short_dir / "other_known_hosts"
    kh.write_text(other.known_hosts_line("*"))
    cfg = fast_config(cluster)
    gw = Gateway(replace(cfg, ssh=replace(cfg.ssh, known_hosts=kh)))
    await gw.start()
    try:
        await wait_for(lambda: set(states(gw).values()) == {"refused"}, what="every tunnel refused")
        for t in gw.pool.tunnels.values():
            assert "host key" in (t.machine.last_error or "") and "not trusted" in (t.machine.last_error or "")
            assert t.machine.connects == 0 and t.machine.connect_failures == 1, "refused at the first attempt"
            assert t.next_retry is None, "parked: no retry is scheduled"
        with pytest.raises(TunnelDown) as exc:
            await gw.unchecked_dialer.dial(cluster.sim_nodes[0].address, HEALTHZ_PORT)
        assert exc.value.status == 502 and "is refused" in str(exc.value)
        # RETRY (what a reload sends) makes one new attempt, refused again: the count restarted at 0.
        assert gw.pool.retry_parked() == ["node-1", "node-2", "node-3"]
        assert gw.pool.retry_parked() == [], "only parked tunnels take RETRY"
        await wait_for(lambda: set(states(gw).values()) == {"refused"}, what="refused again")
        assert all(t.machine.connect_failures == 1 for t in gw.pool.tunnels.values())
        assert all(sim.logins == 0 for sim in cluster.sim_nodes), "no login may happen with an untrusted host"
    finally:
        await gw.stop()


async def test_insecure_skip_warns_on_every_connect(cluster: DevCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tunneld")
    cfg = fast_config(cluster, insecure_skip_host_key_check=True)
    gw = await started(replace(cfg, ssh=replace(cfg.ssh, known_hosts=None)))
    try:
        assert gw.info()["host_key_check"] == "disabled"
        await cluster.sim_nodes[0].stop()
        await wait_for(lambda: states(gw)["node-1"] != "up", what="node-1 down")
        await cluster.sim_nodes[0].start()
        await wait_for(lambda: states(gw)["node-1"] == "up", what="node-1 up again")
    finally:
        await gw.stop()
    warnings = [r for r in caplog.records if "NOT verified" in r.getMessage()]
    per_node = [getattr(r, "node", None) for r in warnings]
    assert per_node.count("node-1") >= 2, "one warning per connect attempt, including the reconnect"
    assert per_node.count("node-2") == 1 and per_node.count("node-3") == 1


async def test_channel_bytes_and_open_channels_are_counted(cluster: DevCluster) -> None:
    cfg = fast_config(cluster)
    gw = await started(replace(cfg, health=replace(cfg.health, enabled=False)))
    try:
        t = gw.pool.tunnels["node-3"]
        stream = await gw.unchecked_dialer.dial(t.node.address, HEALTHZ_PORT)
        assert t.counters.open_channels == 1
        req = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        await stream.write(req)
        got = b""
        while chunk := await stream.read():
            got += chunk
        await stream.close()
        await stream.close()  # idempotent
        assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok")
        assert (t.counters.bytes_out, t.counters.bytes_in) == (len(req), len(got))
        assert t.counters.open_channels == 0 and t.counters.channels_total == 1
    finally:
        await gw.stop()


async def test_reload_applies_inventory_diff_without_touching_unchanged(cluster: DevCluster, short_dir: Path) -> None:
    assert cluster.config_path is not None
    original = cluster.config_path.read_text()
    # Write a config that keeps node-1, drops node-3, changes node-2's kubelet port and adds nothing yet.
    text = original.replace('name = "node-3"', 'name = "node-3-gone"')
    head, _, rest = text.partition("[[nodes]]")
    nodes = ["[[nodes]]" + block for block in rest.split("[[nodes]]")]
    kept = [b for b in nodes if "node-3-gone" not in b]
    kept[1] = kept[1].replace("kubelet_port = 10250", "kubelet_port = 10251")
    cfg = fast_config(cluster)
    gw = await started(cfg)
    try:
        link1 = gw.pool.tunnels["node-1"].link
        cluster.config_path.write_text(head + "".join(kept))
        change = await gw.reload()
        assert [n.name for n in change.removed] == ["node-3"]
        assert [n.name for n in change.changed] == ["node-2"]
        assert change.unchanged == ("node-1",) and not change.added
        assert gw.pool.tunnels["node-1"].link is link1, "unchanged tunnel keeps its connection"
        await wait_for(lambda: sorted(gw.pool.tunnels) == ["node-1", "node-2"] and all_up(gw), what="reload")
        await wait_for(lambda: cluster.sim_nodes[2].active == 0, what="node-3's connection closed")
        # Put node-3 back: it is added and connects; node-1 still on its first connection.
        cluster.config_path.write_text(original)
        change = await gw.reload()
        assert [n.name for n in change.added] == ["node-3"]
        await wait_for(lambda: all_up(gw) and len(gw.pool.tunnels) == 3, what="node-3 back")
        assert gw.pool.tunnels["node-1"].link is link1 and cluster.sim_nodes[0].logins == 1
    finally:
        await gw.stop()


async def test_status_cli_against_running_gateway(cluster: DevCluster, short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    gw = await started(fast_config(cluster, socket=sock))
    try:
        proc = await asyncio.create_subprocess_exec(
            "tunneld", "status", "--socket", str(sock), "-o", "json", stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0
        assert sorted(t["node"] for t in json.loads(out)["tunnels"]) == ["node-1", "node-2", "node-3"]
        await cluster.sim_nodes[1].stop()
        await wait_for(lambda: states(gw)["node-2"] != "up", what="node-2 down")
        proc = await asyncio.create_subprocess_exec(
            "tunneld", "status", "--socket", str(sock), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        lines = out.decode().splitlines()
        assert lines[0].split()[:3] == ["NODE", "ADDRESS", "STATE"]
        assert lines[1].split()[0] == "node-2", "unhealthy first"
        assert lines[1].split()[2] in ("down", "connecting")
    finally:
        await gw.stop()
    proc = await asyncio.create_subprocess_exec(
        "tunneld", "status", "--socket", str(sock), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1 and b"cannot reach the daemon" in err

"""``/metrics`` (Prometheus text format) and ``/livez``, ``/readyz``, ``/healthz`` of a gateway, fetched with curl."""

from __future__ import annotations

import asyncio
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.dialer import NoTunnel
from tunneld.dev.cluster import HEALTHZ_PORT, DevCluster
from tunneld.tunnels.probe import http_get

from .conftest import fast_config, started, states, wait_for


def curl(sock: Path, path: str) -> tuple[int, str]:
    proc = subprocess.run(
        ["curl", "-sS", "--max-time", "10", "--unix-socket", str(sock), "-w", "\n%{http_code}", f"http://localhost{path}"],
        capture_output=True, text=True, timeout=20,
    )
    assert proc.returncode == 0, proc.stderr
    body, _, code = proc.stdout.rpartition("\n")
    return int(code), body


async def acurl(sock: Path, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(curl, sock, path)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_follow_the_pool(cluster: DevCluster, short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    cfg = fast_config(cluster, socket=sock)
    gw = await started(replace(cfg, dial=replace(cfg.dial, random_fallback=False)))
    try:
        await wait_for(lambda: all(t.last_probe is not None for t in gw.pool.tunnels.values()), what="probes")
        for node in cluster.sim_nodes:
            status, _ = await http_get(gw.unchecked_dialer.dial, node.address, HEALTHZ_PORT, "/healthz", 5)
            assert status == 200
        with pytest.raises(NoTunnel):
            await gw.unchecked_dialer.dial("192.0.2.200", 80)

        code, text = await acurl(sock, "/metrics")
        assert code == 200
        m = samples(text)
        assert m[("tunneld_tunnels", (("state", "up"),))] == 3
        assert m[("tunneld_tunnels", (("state", "down"),))] == 0
        assert m[("tunneld_tunnel_connects_total", ())] == 3
        assert m[("tunneld_tunnel_connect_failures_total", ())] == 0
        assert m[("tunneld_dial_duration_seconds_count", ())] == 3
        assert 0 < m[("tunneld_dial_duration_seconds_sum", ())] < 30
        assert m[("tunneld_dial_errors_total", (("error", "NoTunnel"),))] == 1
        assert m[("tunneld_health_probes", (("result", "ok"),))] == 3
        for t in gw.pool.tunnels.values():
            node = t.node.name
            assert m[("tunneld_health_probe_success", (("node", node),))] == 1
            assert m[("tunneld_tunnel_bytes_total", (("direction", "in"), ("node", node)))] > 0
            assert m[("tunneld_open_channels", (("node", node),))] == t.counters.open_channels
            assert m[("tunneld_channels_total", (("node", node),))] >= 2

        await cluster.sim_nodes[0].stop()
        failures = "tunneld_tunnel_connect_failures_total"
        await wait_for(lambda: (gw.metrics.registry.get_sample_value(failures) or 0) >= 1, what="a failed reconnect")
        m = samples((await acurl(sock, "/metrics"))[1])
        assert m[("tunneld_tunnels", (("state", "up"),))] == 2
        assert m[("tunneld_tunnel_disconnects_total", ())] == 1
        assert m[("tunneld_tunnel_connect_failures_total", ())] >= 1
        assert m[("tunneld_tunnels", (("state", "gave-up"),))] == 0
        settings = gw.pool.settings
        gw.pool.configure(replace(settings.ssh, max_reconnect_attempts=1), settings.health)
        await wait_for(lambda: states(gw)["node-1"] == "gave-up", what="node-1 gives up")
        m = samples((await acurl(sock, "/metrics"))[1])
        assert m[("tunneld_tunnels", (("state", "gave-up"),))] == 1
        assert m[("tunneld_tunnels", (("state", "refused"),))] == 0
        assert m[("tunneld_tunnels", (("state", "up"),))] == 2
    finally:
        await gw.stop()


async def test_health_endpoints_and_tunnel_sync(cluster: DevCluster, short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    cfg = fast_config(cluster, socket=sock)
    cfg = replace(cfg, health=replace(cfg.health, sync_max_age=1.0))
    gw = await started(cfg)
    try:
        assert await acurl(sock, "/readyz") == (200, "ok")
        code, text = await acurl(sock, "/readyz?verbose")
        assert code == 200
        assert text.splitlines() == ["[+]ping ok", "[+]tunnel-sync ok", "[+]shutdown ok", "readyz check passed"]
        assert (await acurl(sock, "/livez?verbose"))[1].splitlines() == ["[+]ping ok", "livez check passed"]
        assert (await acurl(sock, "/healthz/nope"))[0] == 404

        for node in cluster.sim_nodes:  # every node gone: no tunnel syncs any more
            await node.stop()
        await wait_for(lambda: all(s != "up" for s in states(gw).values()), what="all tunnels down")
        await asyncio.sleep(1.3)
        code, text = await acurl(sock, "/readyz")
        assert code == 500
        assert "[-]tunnel-sync failed: no tunnel has been up for" in text and "readyz check failed" in text
        assert (await acurl(sock, "/healthz"))[0] == 500
        assert (await acurl(sock, "/healthz/tunnel-sync"))[0] == 500
        assert await acurl(sock, "/livez") == (200, "ok"), "liveness does not depend on the nodes"
        assert await acurl(sock, "/readyz?exclude=tunnel-sync") == (200, "ok")

        await cluster.sim_nodes[1].start()
        await wait_for(lambda: states(gw)["node-2"] == "up", what="node-2 back")
        assert await acurl(sock, "/readyz") == (200, "ok")
    finally:
        gw.health.stopping = True
        code, text = await acurl(sock, "/readyz?verbose")
        assert code == 500 and "[-]shutdown failed" in text
        await gw.stop()

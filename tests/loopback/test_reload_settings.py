"""A reload applies every [ssh] and [health] key to the tunnels that already exist, from their next attempt, probe or
connection: the backoff, the attempt limit, the probe threshold, period and target, the connect bound and the
settings handed to the SSH connector. The log line names exactly the keys that changed."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from tunneld.app import Gateway
from tunneld.config import Node, SSHSettings, load_config
from tunneld.dev.cluster import DevCluster
from tunneld.tunnels import ssh
from tunneld.tunnels.pool import Tunnel

from .conftest import next_base, wait_for

FAST_SSH = {"keepalive_interval": 1, "keepalive_count_max": 2, "connect_timeout": 3, "backoff_initial": 0.1,
            "backoff_max": 0.2, "backoff_jitter": 0}
FAST_HEALTH = {"period": 0.3, "timeout": 2}
DEV_SSH = "keepalive_interval = 5\nkeepalive_count_max = 3\nbackoff_initial = 0.5\nbackoff_max = 10\n"
DEV_HEALTH = "[health]\nperiod = 2\ntimeout = 2\n"


def write_config(cluster: DevCluster, path: Path, ssh_keys: dict[str, object], health: dict[str, object]) -> Path:
    """The dev cluster's config with these [ssh] timing keys and [health] keys."""
    assert cluster.config_path is not None
    text = cluster.config_path.read_text()
    assert DEV_SSH in text and DEV_HEALTH in text
    text = text.replace(DEV_SSH, "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in ssh_keys.items()))
    text = text.replace(DEV_HEALTH, "[health]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"')
                                                             for k, v in health.items()))
    path.write_text(text)
    return path


async def reload(gw: Gateway, caplog: pytest.LogCaptureFixture) -> list[str]:
    """Reload; returns the 'settings changed' log lines it wrote."""
    caplog.clear()
    await gw.reload()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("settings changed")]


async def test_backoff_and_attempt_limit_apply_to_a_retrying_tunnel(cluster: DevCluster,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunneld")
    cfg = write_config(cluster, cluster.workdir / "t.toml", FAST_SSH, FAST_HEALTH)
    gw = Gateway(load_config(cfg))
    gw.pool.rng = lambda: 0.5
    await gw.start()
    try:
        await wait_for(lambda: all(t.state.value == "up" for t in gw.pool.tunnels.values()), what="all up")
        t = gw.pool.tunnels["node-1"]
        await cluster.sim_nodes[0].stop()
        await wait_for(lambda: t.machine.connect_failures >= 1, what="node-1 failing")

        write_config(cluster, cfg, {**FAST_SSH, "max_reconnect_attempts": 1}, FAST_HEALTH)
        assert await reload(gw, caplog) == [
            "settings changed: ssh.max_reconnect_attempts; each applies to every tunnel from its next connection "
            "attempt, probe or connection"
        ]
        await wait_for(lambda: t.state.value == "gave-up", what="node-1 gives up at the new limit")

        # New backoff: 0.4 * 3^(n-1) capped at 1.0, shortened by jitter 0.5 * rng 0.5 = 25 %.
        new = {**FAST_SSH, "backoff_initial": 0.4, "backoff_max": 1.0, "backoff_multiplier": 3, "backoff_jitter": 0.5}
        write_config(cluster, cfg, new, FAST_HEALTH)
        assert await reload(gw, caplog) == [
            "settings changed: ssh.backoff_initial, ssh.backoff_max, ssh.backoff_multiplier, ssh.backoff_jitter, "
            "ssh.max_reconnect_attempts; each applies to every tunnel from its next connection attempt, probe or "
            "connection"
        ]
        delays: dict[int, float] = {}

        def record() -> bool:
            if t.state.value == "down" and t.next_retry is not None:
                delays.setdefault(t.machine.connect_failures, t.next_retry - t.machine.since)
            return {1, 2, 3} <= delays.keys()

        await wait_for(record, what="three retries with the new backoff")
        assert delays[1] == pytest.approx(0.3, abs=0.02)
        assert delays[2] == pytest.approx(0.75, abs=0.02)  # 0.4 * 3 = 1.2, capped at 1.0
        assert delays[3] == pytest.approx(0.75, abs=0.02)
        assert t.state.value == "down", "max_reconnect_attempts = 0 again: retrying forever"
        assert await reload(gw, caplog) == [], "nothing changed, nothing said"
    finally:
        await gw.stop()


async def test_probe_threshold_period_and_target_apply_to_a_connected_tunnel(
        cluster: DevCluster, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunneld")
    cfg = write_config(cluster, cluster.workdir / "t.toml", FAST_SSH, {**FAST_HEALTH, "failure_threshold": 1000})
    gw = Gateway(load_config(cfg))
    await gw.start()
    try:
        await wait_for(lambda: all(t.state.value == "up" for t in gw.pool.tunnels.values()), what="all up")
        n2, n3 = gw.pool.tunnels["node-2"], gw.pool.tunnels["node-3"]
        links = {name: t.link for name, t in gw.pool.tunnels.items()}
        cluster.kubelets[1].healthy = False
        await wait_for(lambda: n2.machine.probe_failures >= 3, what="node-2's probe failing")
        assert n2.state.value == "up", "under the threshold"
        write_config(cluster, cfg, FAST_SSH, {**FAST_HEALTH, "failure_threshold": 2})
        assert await reload(gw, caplog) == ["settings changed: health.failure_threshold; each applies to every "
                                            "tunnel from its next connection attempt, probe or connection"]
        await wait_for(lambda: n2.state.value == "degraded", what="node-2 degraded at the new threshold")

        write_config(cluster, cfg, FAST_SSH, {**FAST_HEALTH, "failure_threshold": 2, "path": "/other"})
        await reload(gw, caplog)
        await wait_for(lambda: n3.last_probe is not None and "/other" in n3.last_probe.detail, what="new path")

        times: list[float] = []

        def probe_times(t: Tunnel = n3) -> list[float]:
            if t.last_probe is not None and (not times or times[-1] != t.last_probe.at):
                times.append(t.last_probe.at)
            return times

        await wait_for(lambda: len(probe_times()) >= 2, what="two probes")
        assert times[-1] - times[-2] < 1.0, "period 0.3"
        write_config(cluster, cfg, FAST_SSH, {**FAST_HEALTH, "failure_threshold": 2, "path": "/other", "period": 2})
        await reload(gw, caplog)
        times.clear()
        await wait_for(lambda: len(probe_times()) >= 3, timeout=10, what="probes at the new period")
        assert times[2] - times[1] >= 1.9
        assert {name: t.link for name, t in gw.pool.tunnels.items()} == links, "no connection was touched"
    finally:
        await gw.stop()


async def test_concurrent_connects_are_bounded_by_the_setting_and_reload_resizes(
        short_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """max_concurrent_connects is what bounds the attempts (no test-made semaphore), before and after a reload that
    changes it; the reconnections after the reload use the new [ssh] settings."""
    caplog.set_level(logging.INFO, logger="tunneld")
    cluster = DevCluster(nodes=12, base_address=next_base(), ssh_port=2222, workdir=short_dir / "dev", proxy_port=0)
    await cluster.start()
    in_flight = peak = 0
    used: list[SSHSettings] = []

    async def counting(node: Node, settings: SSHSettings, counters: ssh.Counters) -> ssh.SSHLink:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        used.append(settings)
        try:
            await asyncio.sleep(0.3)  # hold the slot long enough for every attempt to contend
            return await ssh.connect(node, settings, counters)
        finally:
            in_flight -= 1

    cfg = write_config(cluster, cluster.workdir / "t.toml", {**FAST_SSH, "max_concurrent_connects": 3}, FAST_HEALTH)
    gw = Gateway(load_config(cfg))
    gw.pool.connector = counting
    try:
        await gw.start()
        await wait_for(lambda: len(gw.pool.tunnels) == 12 and all(t.state.value == "up"
                                                                  for t in gw.pool.tunnels.values()), what="12 up")
        assert peak == 3
        write_config(cluster, cfg, {**FAST_SSH, "max_concurrent_connects": 5, "keepalive_interval": 7}, FAST_HEALTH)
        assert await reload(gw, caplog) == [
            "settings changed: ssh.keepalive_interval, ssh.max_concurrent_connects; each applies to every tunnel "
            "from its next connection attempt, probe or connection"
        ]
        peak = 0
        used.clear()
        await asyncio.gather(*(sim.stop() for sim in cluster.sim_nodes))
        await asyncio.gather(*(sim.start() for sim in cluster.sim_nodes))
        await wait_for(lambda: all(t.machine.connects == 2 for t in gw.pool.tunnels.values()), what="12 back up")
        assert peak == 5
        assert used and all(s == gw.config.ssh and s.keepalive_interval == 7 for s in used)
    finally:
        await gw.stop()
        await cluster.stop()

"""A gateway restarted under 1,000 dial-in nodes: a real ``tunneld serve`` process, and 1,000 simulated nodes in one
helper process (:mod:`bench.simdialin`: asyncssh clients that each log in with their own user certificate and hold
the forward exactly as ``ssh -N -R 1080`` does, reconnecting after a random sleep like ``tunneld-node@.service``).
After the restart every tunnel is up again within 60 s, and the status API's p99 stays under 100 ms meanwhile."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import procs
from bench.dialgw import DialinGateway, SimDialin, material, nodes
from bench.openssh import free_port
from bench.scale import _StatusProbe
from tests.waiting import wait_sync

pytestmark = pytest.mark.slow

N = 1000
JITTER = 10.0  # the node unit sleeps 0-30 s; 10 s keeps the test short and makes the reconnect storm denser


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    procs.raise_nofile()
    material(tmp_path)
    yield tmp_path


def wait_all_up(gw: DialinGateway, timeout: float) -> float:
    """Seconds until all N tunnels are up, or a failure with the state counts (polled every second: the list of
    1,000 is itself a load on the status API)."""
    start = time.monotonic()
    wait_sync(lambda: gw.states().get("up", 0) == N, timeout, f"all {N} dial-in tunnels up", interval=1.0)
    return time.monotonic() - start


@pytest.mark.timeout(240)
def test_a_restarted_gateway_gets_1000_dial_in_nodes_back_within_60_s(workdir: Path) -> None:
    port = free_port()
    gw = DialinGateway(workdir, port, nodes(N))
    sim: SimDialin | None = None
    try:
        gw.start()
        assert gw.states() == {"waiting": N}
        sim = SimDialin(workdir, port, N, jitter=JITTER)
        wait_all_up(gw, 90)
        snapshot = gw.get("/tunnels")["tunnels"]
        assert {t["mode"] for t in snapshot} == {"dial-in"}

        gw.stop()  # SIGTERM: every node's connection ends with it
        gw.start()
        probe = _StatusProbe(gw, "/tunnels/sim-00000")  # as bench.scale measures it
        probe.start()
        try:
            seconds = wait_all_up(gw, 60)
        finally:
            latency = probe.finish()
        print(f"all {N} up again {seconds:.1f} s after the restart; status API {latency}")
        assert seconds < 60
        assert latency["errors"] == 0 and latency["n"] >= 50, latency
        assert latency["p99_ms"] < 100, latency
        assert gw.states() == {"up": N}
    finally:
        if sim is not None:
            sim.stop()
        gw.stop()

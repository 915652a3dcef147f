"""The real ``tunneld serve`` tunes CPython's garbage collector once it has started, and says so: the status API
(``GET /gateway``, ``gc``) and the metrics show the frozen start-up objects, generation 2's threshold out of
allocation's reach, and the scheduled full collections coming round; ``[gc] full_collection_interval = 0`` leaves
CPython's defaults (so these tests fail if the tuning is removed or never started)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

from tests.waiting import wait_value
from tunneld.dev.cluster import DevCluster
from tunneld.ops.collector import NEVER


class _UnixHTTP(HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=5)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(self._path))


def _get(sock: Path, path: str) -> bytes:
    conn = _UnixHTTP(sock)
    try:
        conn.request("GET", path)
        return conn.getresponse().read()
    finally:
        conn.close()


async def _serve(cluster: DevCluster, short_dir: Path, gc_table: str) -> tuple[asyncio.subprocess.Process, Path]:
    assert cluster.config_path is not None
    status = short_dir / "gc.sock"
    cfg = cluster.workdir / "gc.toml"
    cfg.write_text(cluster.config_path.read_text().replace(
        f'socket = "{cluster.workdir / "tunneld.sock"}"', f'socket = "{status}"') + gc_table)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tunneld", "serve", "--config", str(cfg),
                                                "--grace", "1", stderr=asyncio.subprocess.DEVNULL,
                                                env=dict(os.environ, TUNNELD_LOOP="asyncio"))
    return proc, status


async def _gc_facts(status: Path) -> dict[str, Any] | None:
    try:
        facts: dict[str, Any] = json.loads(await asyncio.to_thread(_get, status, "/gateway"))["gc"]
        return facts
    except OSError:
        return None  # not listening yet


def _sample(metrics: str, name: str) -> float:
    return float(next(line for line in metrics.splitlines() if line.startswith(f"{name} ")).split()[1])


async def _stop(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 30) == 0


async def test_serve_freezes_start_up_and_schedules_full_collections(cluster: DevCluster, short_dir: Path) -> None:
    proc, status = await _serve(cluster, short_dir, "\n[gc]\nfull_collection_interval = 0.3\n")
    try:
        facts = await wait_value(lambda: _gc_facts(status), lambda f: f is not None and f["tuned"], timeout=30,
                                 what="the collector tuned")
        assert facts is not None
        assert facts["thresholds"][2] == NEVER
        assert facts["frozen_objects"] > 10_000  # the daemon's modules and what it built at start-up
        assert facts["full_collection_interval"] == 0.3
        # Full collections still happen: on the schedule, timed.
        later = await wait_value(lambda: _gc_facts(status),
                                 lambda f: f is not None and f["scheduled_full_collections"] >= 3, timeout=15,
                                 what="three scheduled full collections")
        assert later is not None and later["full_collections"] >= 3 and later["full_collection_seconds"] > 0
        metrics = (await asyncio.to_thread(_get, status, "/metrics")).decode()
        assert _sample(metrics, "tunneld_gc_tuned") == 1
        assert _sample(metrics, 'tunneld_gc_threshold{generation="2"}') == NEVER
        assert _sample(metrics, "tunneld_gc_frozen_objects") > 10_000
    finally:
        await _stop(proc)


async def test_interval_zero_keeps_cpythons_collector(cluster: DevCluster, short_dir: Path) -> None:
    proc, status = await _serve(cluster, short_dir, "\n[gc]\nfull_collection_interval = 0\n")
    try:
        facts = await wait_value(lambda: _gc_facts(status), lambda f: f is not None, timeout=30,
                                 what="the status API")
        assert facts is not None
        assert facts["tuned"] is False and facts["thresholds"][2] == 10 and facts["frozen_objects"] == 0
        metrics = (await asyncio.to_thread(_get, status, "/metrics")).decode()
        assert _sample(metrics, "tunneld_gc_tuned") == 0
    finally:
        await _stop(proc)

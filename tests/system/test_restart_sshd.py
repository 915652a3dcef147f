"""Gateway restart: ``tunneld serve`` as a real process, SIGTERM with streams in flight, then start again.

In-flight streams finish within the grace period (and are cut, never ended cleanly, past it); new connections are
refused as soon as the drain starts; files on disk (config, keys, known_hosts, the CA's state when configured) are
the same bytes and modes afterwards, and the restarted gateway serves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests import rawhttp
from tests.sshbed import SshBed
from tests.waiting import wait_for

from .test_faults_sshd import expected_sha, fronts_config

pytestmark = [pytest.mark.system, pytest.mark.slow]


class Daemon:
    """``python -m tunneld serve`` started (and stopped) by PID."""

    def __init__(self, config: Path, grace: float, log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tunneld", "serve", "--config", str(config), "--grace", str(grace)],
                stdout=out, stderr=out, stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    async def tunnels(self, status_socket: Path) -> dict[str, str]:
        conn = aiohttp.UnixConnector(path=str(status_socket))
        async with aiohttp.ClientSession(connector=conn) as session:
            async with session.get("http://status/tunnels", timeout=aiohttp.ClientTimeout(total=3)) as resp:
                data = json.loads(await resp.text())
        return {t["node"]: t["state"] for t in data["tunnels"]}

    async def wait_up(self, status_socket: Path, node: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            with contextlib.suppress(OSError, aiohttp.ClientError, TimeoutError):
                if (await self.tunnels(status_socket)).get(node) == "up":
                    return
            await asyncio.sleep(0.1)
        raise AssertionError(f"gateway did not bring {node} up:\n{self.log.read_text()[-3000:]}")

    async def wait_exit(self, timeout: float) -> int:
        with contextlib.suppress(AssertionError):  # still running after timeout: -1
            await wait_for(lambda: self.proc.poll() is not None, timeout, "the gateway to exit")
        return -1 if self.proc.poll() is None else self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


def disk_state(paths: list[Path]) -> dict[str, tuple[str, int]]:
    """SHA-256 and mode of every regular file under ``paths``."""
    state: dict[str, tuple[str, int]] = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for f in files:
            state[str(f)] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mode & 0o7777)
    return state


async def test_sigterm_drains_in_flight_streams_and_restart_keeps_disk_state(bed: SshBed) -> None:
    n0 = bed.add_node("node-0")
    cfg = fronts_config(bed, ["node-0"])
    assert cfg.path is not None and cfg.egress.socket is not None and cfg.status.socket is not None
    egress, status = cfg.egress.socket, cfg.status.socket
    gateway_files = [cfg.path, bed.client_key, Path(f"{bed.client_key}.pub"), bed.known_hosts]
    before = disk_state(gateway_files)
    assert before[str(bed.client_key)][1] == 0o600

    daemon = Daemon(cfg.path, grace=8, log=bed.workdir / "serve-1.log")
    try:
        await daemon.wait_up(status, "node-0")
        code, head, reader, writer = await rawhttp.open_egress(egress, n0.address, n0.app_port)
        assert code == 200, head
        progress = asyncio.Event()
        stream = asyncio.create_task(rawhttp.exchange(
            reader, writer, "GET", "/stream?chunks=25&size=32768&delay=0.1&seed=11", progress=progress,
            progress_after=2 * 32768,
        ))
        await asyncio.wait_for(progress.wait(), 10)
        daemon.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        # Draining: the listener is gone at once, so nothing new starts.
        await asyncio.sleep(0.5)
        assert daemon.proc.poll() is None, "exited before the in-flight stream finished"
        with pytest.raises(OSError):
            await rawhttp.open_egress(egress, n0.address, n0.app_port, timeout=2)
        result = await asyncio.wait_for(stream, 15)
        assert result.complete and result.body_bytes == 25 * 32768, result.error
        assert result.sha256 == expected_sha(11, 32768, 25)
        rc = await daemon.wait_exit(10)
        took = time.monotonic() - sent
        assert rc == 0, daemon.log.read_text()[-3000:]
        assert took < 8, f"drain took {took:.1f}s, beyond the grace period"
    finally:
        daemon.kill()

    assert disk_state(gateway_files) == before, "the gateway changed files it must only read"
    assert not egress.exists() and not status.exists(), "sockets are removed on exit"

    # Start again: same config, same keys; it serves. Now a stream longer than a short grace is cut, not ended.
    daemon = Daemon(cfg.path, grace=1, log=bed.workdir / "serve-2.log")
    try:
        await daemon.wait_up(status, "node-0")
        assert n0.accepted_logins() == 2
        code, head, reader, writer = await rawhttp.open_egress(egress, n0.address, n0.app_port)
        assert code == 200, head
        progress = asyncio.Event()
        stream = asyncio.create_task(rawhttp.exchange(
            reader, writer, "GET", "/stream?chunks=100&size=4096&delay=0.1", progress=progress, progress_after=4096,
        ))
        await asyncio.wait_for(progress.wait(), 10)
        daemon.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        rc = await daemon.wait_exit(10)
        assert rc == 0 and time.monotonic() - sent < 4, daemon.log.read_text()[-3000:]
        result = await asyncio.wait_for(stream, 10)
        assert not result.complete and result.error in ("reset", "truncated"), result
    finally:
        daemon.kill()
    assert disk_state(gateway_files) == before

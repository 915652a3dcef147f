"""A tunnel that gave up is parked, and a SIGHUP to the real ``tunneld serve`` (same file, same node) retries it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import ClientError, ClientSession, UnixConnector

from tunneld.dev.cluster import DevCluster

from .conftest import wait_for


async def _tunnels(sock: Path) -> dict[str, dict[str, Any]]:
    """The status API's tunnels by node name; empty while the daemon is not answering yet."""
    try:
        async with ClientSession(connector=UnixConnector(path=str(sock))) as http:
            async with http.get("http://localhost/tunnels") as resp:
                data = await resp.json()
    except (ClientError, OSError):
        return {}
    return {t["node"]: t for t in data["tunnels"]}


async def test_gave_up_node_connects_again_after_sighup(cluster: DevCluster, short_dir: Path) -> None:
    assert cluster.config_path is not None
    sock = short_dir / "s.sock"
    cfg = cluster.workdir / "serve.toml"
    cfg.write_text(
        cluster.config_path.read_text()
        .replace(f'socket = "{cluster.workdir / "tunneld.sock"}"', f'socket = "{sock}"')
        .replace("backoff_initial = 0.5\nbackoff_max = 10\n",
                 "backoff_initial = 0.05\nbackoff_max = 0.1\nmax_reconnect_attempts = 2\n")
    )
    sim = cluster.sim_nodes[0]
    await sim.stop()  # node-1's sshd is not there when the daemon starts
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunneld", "serve", "--config", str(cfg), "--grace", "1",
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    seen: dict[str, dict[str, Any]] = {}
    try:
        async def poll() -> dict[str, dict[str, Any]]:
            seen.update(await _tunnels(sock))
            return seen

        async def until(cond: Any, what: str) -> None:
            for _ in range(300):  # bounded: 300 x 0.1 s
                assert proc.returncode is None, "the daemon exited"
                tunnels = await poll()
                if tunnels and cond(tunnels):
                    return
                await asyncio.sleep(0.1)
            raise AssertionError(f"timed out waiting for {what}: {seen}")

        await until(lambda t: t["node-1"]["state"] == "gave-up", "node-1 to give up")
        assert seen["node-1"]["connect_failures"] == 2 and seen["node-1"]["next_retry"] is None
        assert seen["node-2"]["state"] == "up"
        await sim.start()  # the node is back, but a parked tunnel makes no attempt on its own
        proc.send_signal(signal.SIGHUP)  # the same file: the inventory diff calls node-1 unchanged
        await until(lambda t: t["node-1"]["state"] == "up", "node-1 up after SIGHUP")
        assert seen["node-1"]["connects"] == 1 and sim.logins == 1
        assert seen["node-2"]["connects"] == 1, "the up tunnels were not touched"
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = err.decode()
    assert "giving up on node after 2 failed attempts; reload to retry" in log
    assert "retrying tunnels that gave up or were refused: node-1" in log
    await wait_for(lambda: sim.active == 0, what="node-1's connection closed")

"""The CLI as a user runs it: `tunneld dev --check`, and `tunneld serve` with SIGHUP reload and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tunneld.dev.cluster import DevCluster

from ..waiting import wait_value
from .conftest import next_base


def test_dev_check_prints_status_and_healthz(short_dir: Path) -> None:
    base = next_base()
    proc = subprocess.run(
        ["tunneld", "dev", "--nodes", "2", "--base-address", base, "--check", "--workdir", str(short_dir / "w")],
        capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    rows = [line.split() for line in out.splitlines() if line.startswith("node-")]
    assert [(r[0], r[2]) for r in rows] == [("node-1", "up"), ("node-2", "up")]
    assert out.count("/healthz via node-") == 2 and out.count(": ok") == 2
    assert "all 2 nodes up" in out


async def _status(sock: Path) -> dict:
    proc = await asyncio.create_subprocess_exec(
        "tunneld", "status", "--socket", str(sock), "-o", "json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    if proc.returncode != 0:
        return {"error": err.decode()}
    return json.loads(out)


async def _wait_status(sock: Path, cond, what: str, timeout: float = 20) -> dict:
    return await wait_value(lambda: _status(sock),
                            lambda data: "tunnels" in data and cond({t["node"]: t for t in data["tunnels"]}),
                            timeout, what, interval=0.2)


async def test_serve_reloads_on_sighup_and_exits_on_sigterm(cluster: DevCluster, short_dir: Path) -> None:
    assert cluster.config_path is not None
    sock = short_dir / "serve.sock"
    text = cluster.config_path.read_text()
    text = text.replace(f'socket = "{cluster.workdir / "tunneld.sock"}"', f'socket = "{sock}"')
    head, _, rest = text.partition("[[nodes]]")
    blocks = ["[[nodes]]" + b for b in rest.split("[[nodes]]")]
    cfg = cluster.workdir / "serve.toml"
    cfg.write_text(head + "".join(blocks[:2]))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunneld", "serve", "--config", str(cfg), "--grace", "2",
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    try:
        data = await _wait_status(sock, lambda t: sorted(t) == ["node-1", "node-2"] and
                                  all(x["state"] == "up" for x in t.values()), "two nodes up")
        since_1 = {t["node"]: t for t in data["tunnels"]}["node-1"]["since"]
        cfg.write_text(head + blocks[0] + blocks[2])  # drop node-2, add node-3
        proc.send_signal(signal.SIGHUP)
        data = await _wait_status(sock, lambda t: sorted(t) == ["node-1", "node-3"] and
                                  all(x["state"] == "up" for x in t.values()), "reloaded inventory")
        node1 = {t["node"]: t for t in data["tunnels"]}["node-1"]
        assert node1["since"] == since_1 and node1["connects"] == 1, "node-1's tunnel was not touched"
        # A broken file is refused on reload and the daemon keeps running with what it had.
        cfg.write_text("[ssh\n")
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert sorted(t["node"] for t in (await _status(sock))["tunnels"]) == ["node-1", "node-3"]
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
        assert proc.returncode == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    log = (await proc.stderr.read()).decode()
    assert "reload refused" in log and "invalid TOML" in log
    assert "inventory applied: 1 added, 1 removed, 0 changed, 1 unchanged" in log
    assert not sock.exists()


def test_check_config_reports_errors(short_dir: Path) -> None:
    bad = short_dir / "bad.toml"
    bad.write_text('[ssh]\nprivate_key = "k"\n[[nodes]]\nname = "n"\n')
    proc = subprocess.run(["tunneld", "check-config", str(bad)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert f"error: {bad}: ssh.known_hosts: required" in proc.stderr
    assert f"error: {bad}: nodes[0] (n).address: required" in proc.stderr
    proc = subprocess.run(["tunneld", "serve", "--config", str(bad)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "ssh.known_hosts: required" in proc.stderr

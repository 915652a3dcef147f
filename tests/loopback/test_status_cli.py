"""``tunneld status`` as an operator runs it against a running gateway: table, colour, JSON, detail, --watch."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

from tunneld.dev.cluster import DevCluster

from .conftest import fast_config, started, states, wait_for

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RED = re.compile(r"\x1b\[(?:[0-9;]*;)?31m")
GREEN = re.compile(r"\x1b\[(?:[0-9;]*;)?32m")


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "tunneld", "status", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(os.environ, **(env or {})),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_table_colour_json_and_detail(cluster: DevCluster, short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    gw = await started(fast_config(cluster, socket=sock))
    try:
        await wait_for(lambda: all(t.last_probe for t in gw.pool.tunnels.values()), what="first probes")
        code, out, _ = await cli("--socket", str(sock))
        assert code == 0 and not ANSI.search(out), "plain text when piped"
        rows = [line.split() for line in out.splitlines()]
        assert rows[0][:4] == ["NODE", "ADDRESS", "STATE", "SINCE"] and "LAST" in rows[0]
        assert [(r[0], r[2]) for r in rows[1:]] == [("node-1", "up"), ("node-2", "up"), ("node-3", "up")]
        assert rows[1][1] == f"{cluster.sim_nodes[0].address}:2222" and rows[1][7] == "lean" and rows[1][8] == "ok"

        await cluster.sim_nodes[1].stop()
        await wait_for(lambda: states(gw)["node-2"] != "up", what="node-2 down")
        await wait_for(lambda: gw.pool.tunnels["node-2"].machine.last_error is not None, what="an error")
        for _ in range(50):  # node-2 flips between down (waiting to retry) and connecting: catch it down
            code, out, _ = await cli("--socket", str(sock), "--color", "always")
            lines = out.splitlines()
            plain = [ANSI.sub("", line).split() for line in lines]
            assert plain[1][0] == "node-2" and plain[1][2] in ("down", "connecting"), "unhealthy first"
            if plain[1][2] == "down":
                break
        assert plain[1][2] == "down"
        assert RED.search(lines[1]), repr(lines[1])
        assert GREEN.search(lines[2]) and not RED.search(lines[2]), repr(lines[2])

        code, out, _ = await cli("--socket", str(sock), "-o", "json")
        data = json.loads(out)
        assert sorted(t["node"] for t in data["tunnels"]) == ["node-1", "node-2", "node-3"]
        assert data["gateway"]["nodes"] == 3
        by_state = data["gateway"]["states"]  # the counts agree with the list they summarise
        assert sum(by_state.values()) == 3 and by_state.get("up") == 2
        assert by_state == {s: sum(1 for t in data["tunnels"] if t["state"] == s) for s in by_state}

        code, out, _ = await cli("--socket", str(sock), "node-2")
        fields = {line[:12].strip(): line[12:].strip() for line in out.splitlines()}
        assert fields["Node"] == "node-2" and fields["State"] in ("down", "connecting")
        assert fields["Last error"] not in ("", "-")
        assert fields["Address"] == f"{cluster.sim_nodes[1].address}:2222"
        code, out, _ = await cli("--socket", str(sock), "node-1", "-o", "json")
        assert json.loads(out)["node"] == "node-1" and json.loads(out)["state"] == "up"
        code, _, err = await cli("--socket", str(sock), "nope")
        assert code == 1 and "no node named 'nope'" in err
    finally:
        await gw.stop()


async def test_watch_refreshes_until_ctrl_c(cluster: DevCluster, short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    gw = await started(fast_config(cluster, socket=sock))
    proc = await asyncio.create_subprocess_exec(
        "tunneld", "status", "--socket", str(sock), "--watch", "--interval", "0.2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        out = b""
        deadline = time.monotonic() + 20
        while out.count(b"Every 0.2s") < 3:
            assert time.monotonic() < deadline, out
            out += await asyncio.wait_for(proc.stdout.read(4096), 20)
        proc.send_signal(signal.SIGINT)
        rest, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await gw.stop()
    frames = (out + rest).decode().split("Every 0.2s: tunneld status")[1:]
    assert len(frames) >= 3
    for frame in frames[:3]:
        assert [line.split()[0] for line in frame.splitlines() if line.startswith("node-")] == [
            "node-1", "node-2", "node-3"]
    assert b"Traceback" not in err

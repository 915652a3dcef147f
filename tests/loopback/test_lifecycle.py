"""The real ``tunneld serve`` under a test notify socket: READY -> RELOADING -> READY -> STOPPING, and watchdog pings.

The test plays the service manager: it binds a unix datagram socket, starts the daemon with ``NOTIFY_SOCKET`` and
``WATCHDOG_USEC`` pointing at it, and reads what the daemon says while it sends SIGHUP and SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

from tests.waiting import wait_for, wait_value
from tunneld.dev.cluster import DevCluster


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


async def _recv(sock: socket.socket, want: str, timeout: float, seen: list[dict[str, str]]) -> dict[str, str]:
    """Read datagrams (recording them) until one carries ``want``; bounded by ``timeout``."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while True:
            msg = _fields(await loop.sock_recv(sock, 4096))
            seen.append(msg)
            if want in msg:
                return msg


def _status_now(sock_path: Path) -> dict:
    import http.client

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect(str(sock_path))

    conn = Conn("localhost", timeout=5)
    try:
        conn.request("GET", "/tunnels")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


async def test_ready_reloading_ready_stopping_sequence(cluster: DevCluster, short_dir: Path) -> None:
    assert cluster.config_path is not None
    status_sock = short_dir / "s.sock"
    cfg = cluster.workdir / "serve.toml"
    cfg.write_text(cluster.config_path.read_text().replace(
        f'socket = "{cluster.workdir / "tunneld.sock"}"', f'socket = "{status_sock}"'))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short_dir / "notify"))
    notify.setblocking(False)
    env = dict(os.environ, NOTIFY_SOCKET=str(short_dir / "notify"), WATCHDOG_USEC="200000", PYTHONUNBUFFERED="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunneld", "serve", "--config", str(cfg), "--grace", "2",
        stderr=asyncio.subprocess.PIPE, env=env,
    )
    seen: list[dict[str, str]] = []
    try:
        ready = await _recv(notify, "READY", 30, seen)
        assert ready["READY"] == "1"
        # READY only once the listeners are bound and the inventory is loaded: the status socket answers now,
        # listing every node of the file.
        data = _status_now(status_sock)
        assert sorted(t["node"] for t in data["tunnels"]) == ["node-1", "node-2", "node-3"]

        # Watchdog pings come from the loop every WATCHDOG_USEC/2 = 0.1 s.
        start = len(seen)
        await asyncio.sleep(1.0)
        while True:
            try:
                seen.append(_fields(notify.recv(4096)))
            except BlockingIOError:
                break
        pings = sum(1 for m in seen[start:] if m.get("WATCHDOG") == "1")
        assert 3 <= pings <= 30, pings

        t0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        proc.send_signal(signal.SIGHUP)
        reloading = await _recv(notify, "RELOADING", 10, seen)
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) >= t0
        assert (await _recv(notify, "READY", 10, seen))["READY"] == "1"

        proc.send_signal(signal.SIGTERM)
        assert (await _recv(notify, "STOPPING", 10, seen))["STOPPING"] == "1"
        await asyncio.wait_for(proc.wait(), 20)
        assert proc.returncode == 0
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        assert proc.stderr is not None
        print("daemon stderr:\n" + (await proc.stderr.read()).decode()[-4000:])
        raise
    finally:
        notify.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    order = [k for m in seen for k in ("READY", "RELOADING", "STOPPING") if k in m]
    assert order == ["READY", "RELOADING", "READY", "STOPPING"], order


async def test_json_logs_carry_context_and_never_the_key(cluster: DevCluster, short_dir: Path) -> None:
    """A debug-level run that logs in with the private key: every line is one JSON event, none holds the key."""
    assert cluster.config_path is not None
    status_sock = short_dir / "s.sock"
    cfg = cluster.workdir / "serve.toml"
    cfg.write_text(cluster.config_path.read_text().replace(
        f'socket = "{cluster.workdir / "tunneld.sock"}"', f'socket = "{status_sock}"')
        + '\n[log]\nlevel = "debug"\nformat = "json"\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunneld", "serve", "--config", str(cfg), "--grace", "1",
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    try:
        def all_up() -> bool:
            assert proc.returncode is None, "the daemon exited"
            if not status_sock.exists():
                return False
            data = _status_now(status_sock)
            return bool(data["tunnels"]) and all(t["state"] == "up" for t in data["tunnels"])

        await wait_for(all_up, 30, "the daemon to bring the tunnels up", interval=0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    events = [json.loads(line) for line in err.decode().splitlines()]  # every line is one JSON event
    assert all({"ts", "level", "logger", "msg"} <= e.keys() for e in events)
    ups = [e for e in events if e["msg"] == "tunnel up"]
    assert sorted(e["node"] for e in ups) == ["node-1", "node-2", "node-3"]
    key = (cluster.workdir / "gateway_ed25519").read_text()
    body = [line for line in key.splitlines() if line and not line.startswith("-----")]
    assert body and not any(line in err.decode() for line in body)



async def _connect_through(egress: Path, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A CONNECT to ``target`` through the egress socket, or None if not (yet) possible."""
    try:
        reader, writer = await asyncio.open_unix_connection(str(egress))
    except OSError:
        return None
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (asyncio.IncompleteReadError, ConnectionError):
        head = b""
    if head.startswith(b"HTTP/1.1 200"):
        return reader, writer
    writer.close()
    return None


async def test_sigterm_drains_open_streams_and_second_sigterm_exits_now(cluster: DevCluster) -> None:
    """SIGTERM: new connections are refused while open CONNECT streams keep working; a second SIGTERM ends the
    daemon at once (status 1), long before the 60 s grace period."""
    assert cluster.config_path is not None
    egress = cluster.workdir / "egress.sock"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tunneld", "serve", "--config", str(cluster.config_path), "--grace", "60",
        stderr=asyncio.subprocess.PIPE, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    echo = "10.244.1.10:7777"  # a TCP echo in a pod of node-1
    try:
        async def through() -> object:
            assert proc.returncode is None, "the daemon exited"
            return await _connect_through(egress, echo)

        first = await wait_value(through, lambda c: c is not None, 30, "the daemon to come up", interval=0.2)
        second = await _connect_through(egress, echo)
        assert second is not None

        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert proc.returncode is None, "draining the open streams"
        reader, writer = first
        writer.write(b"still there?")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"still there?", "an open stream still works"
        assert await _connect_through(egress, echo) is None, "no new connections while draining"
        await asyncio.sleep(0.3)
        assert proc.returncode is None, "still waiting for the second stream"

        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)
        assert proc.returncode == 1 and time.monotonic() - started < 5
        second[1].close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

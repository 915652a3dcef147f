"""An sshd that says goodbye with ANSI/OSC escapes in its DISCONNECT message: ``tunneld status`` shows the text,
never the escapes, piped and on a terminal, with and without colour; LAST ERROR is cut between words."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import asyncssh
import pytest

from netnames.text import printable
from tunneld.app import Gateway
from tunneld.config import Node
from tunneld.dev.cluster import DevCluster

from .conftest import fast_config, next_base, wait_for

HOSTILE = ("closing\x1b]0;owned by the node\x07\x1b[2J\x1b[31m\u202e now: this sshd is going down for maintenance "
           "of the whole rack, come back tomorrow")
CONTROL = ("\x1b", "\x07", "\u202e")


class _Hostile(asyncssh.SSHServer):
    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn

    def begin_auth(self, username: str) -> bool:
        self._conn.disconnect(asyncssh.DISC_BY_APPLICATION, HOSTILE)
        return True


@pytest.fixture
async def hostile_sshd() -> AsyncIterator[tuple[str, int]]:
    host = next_base()
    server = await asyncssh.create_server(_Hostile, host, 0,
                                          server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")])
    port = server.sockets[0].getsockname()[1]
    try:
        yield host, port
    finally:
        server.close()
        await server.wait_closed()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "TERM")}
    return dict(env, **extra)


def _piped(*args: str) -> str:
    done = subprocess.run(["tunneld", "status", *args], capture_output=True, timeout=30, env=_env(), check=True)
    return done.stdout.decode()


def _in_tty(*args: str) -> str:
    """``tunneld status`` with its stdout on a pseudo-terminal 200 columns wide; everything it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    proc = subprocess.Popen(["tunneld", "status", *args], stdout=slave, stderr=slave, stdin=subprocess.DEVNULL,
                            env=_env(TERM="xterm-256color"))
    os.close(slave)
    out = b""
    try:
        for _ in range(1000):  # bounded: ends at EOF (EIO on Linux) or after 30 s of silence
            ready, _, _ = select.select([master], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(30) == 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return out.decode()


async def test_escapes_from_an_sshd_never_reach_the_terminal(cluster: DevCluster, short_dir: Path,
                                                             hostile_sshd: tuple[str, int]) -> None:
    host, port = hostile_sshd
    sock = short_dir / "s.sock"
    cfg = fast_config(cluster, socket=sock)
    gw = Gateway(replace(cfg, nodes=(*cfg.nodes, Node("evil-1", host, ssh_port=port)),
                         ssh=replace(cfg.ssh, insecure_skip_host_key_check=True)))
    await gw.start()
    try:
        evil = gw.pool.tunnels["evil-1"]
        await wait_for(lambda: "closing" in (evil.machine.last_error or ""), what="the sshd's goodbye")
        error = evil.machine.last_error or ""
        assert "\x1b]0;owned" in error, "the gateway keeps the peer's words (the JSON API escapes them)"
        shown = printable(error)

        for args in (["--color", "never"], ["--color", "auto"], []):
            out = await asyncio.to_thread(_piped, "--socket", str(sock), *args)
            assert not any(c in out for c in CONTROL), (args, out)
            header, *rows = out.splitlines()
            assert header.split()[0] == "NODE"
            row = next(r for r in rows if r.startswith("evil-1"))
            cell = row[header.index("LAST ERROR"):]
            assert cell.endswith("...") and len(cell) <= 80, cell
            kept = cell[:-3]
            assert shown.startswith(kept) and shown[len(kept)] == " ", f"cut mid-word: {cell!r}"
            assert "\\x1b]0;owned" in cell, "the escape is shown as text"

        detail = await asyncio.to_thread(_piped, "--socket", str(sock), "evil-1", "--color", "never")
        assert not any(c in detail for c in CONTROL)
        assert shown in detail.replace("\n", ""), "the detail view shows the whole error"

        raw = await asyncio.to_thread(_piped, "--socket", str(sock), "-o", "json")
        assert not any(c in raw for c in CONTROL)
        data = json.loads(raw)
        assert next(t for t in data["tunnels"] if t["node"] == "evil-1")["last_error"].startswith("ssh to ")

        never = await asyncio.to_thread(_in_tty, "--socket", str(sock), "--color", "never")
        assert "evil-1" in never and "\\x1b]0;owned" in never
        assert "\x1b" not in never and "\x07" not in never, "--color never on a terminal: no escape at all"
        detail_tty = await asyncio.to_thread(_in_tty, "--socket", str(sock), "evil-1", "--color", "never")
        assert "\x1b" not in detail_tty and "owned by the node" in detail_tty

        coloured = await asyncio.to_thread(_in_tty, "--socket", str(sock))
        assert "\x1b[" in coloured, "colour on a terminal"
        assert "\x1b]" not in coloured and "\x07" not in coloured and "\x1b[2J" not in coloured
        assert "\u202e" not in coloured and "\\x1b]0;owned" in coloured
    finally:
        await gw.stop()

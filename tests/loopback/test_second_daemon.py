"""A second `tunneld serve` that cannot start (its status or egress socket is another daemon's, live) exits with one
line and leaves the running daemon's sockets in place: `tunneld status` and `tunneld csr` still reach it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.certs_daemon import Daemon, cli, free_port, write_config

from .conftest import next_base


def run_tunneld(*args: str) -> subprocess.CompletedProcess[str]:
    """This checkout's tunneld (not whichever one is installed)."""
    env = dict(os.environ, TUNNELD_LOOP="asyncio")
    return subprocess.run([sys.executable, "-m", "tunneld", *args], capture_output=True, text=True, timeout=60,
                          env=env)


def inode(path: Path) -> int:
    return os.stat(path).st_ino


async def test_second_daemon_leaves_the_first_ones_sockets(short_dir: Path) -> None:
    egress = short_dir / "egress.sock"
    cfg = write_config(short_dir / "m", next_base(), extra=f'[egress]\nsocket = "{egress}"\n\n')
    assert cli("ca", "init", "--config", str(cfg.path)).returncode == 0
    first = Daemon(cfg)
    await first.start()
    try:
        status_ino, egress_ino = inode(cfg.socket), inode(egress)
        text = cfg.path.read_text()
        same_status = short_dir / "same-status.toml"  # another API port and egress socket; the same status socket
        same_status.write_text(text.replace(f":{cfg.port}\"", f":{free_port(cfg.host)}\"")
                               .replace(str(egress), str(short_dir / "egress2.sock")))
        same_egress = short_dir / "same-egress.toml"  # the same egress socket; its own status socket
        same_egress.write_text(text.replace(f":{cfg.port}\"", f":{free_port(cfg.host)}\"")
                               .replace(str(cfg.socket), str(short_dir / "status2.sock")))
        for second, taken in ((same_status, cfg.socket), (same_egress, egress)):
            out = await asyncio.to_thread(run_tunneld, "serve", "--config", str(second), "--grace", "0")
            assert out.returncode == 1, out.stderr
            assert f"error: cannot start: {taken} is in use by a running process" in out.stderr
            assert "Traceback" not in out.stderr
            assert (inode(cfg.socket), inode(egress)) == (status_ino, egress_ino), "the first daemon's sockets stay"
            status = await asyncio.to_thread(run_tunneld, "status", "--socket", str(cfg.socket))
            assert status.returncode in (0, 1) and "node-1" in status.stdout, status.stderr
            csr = await asyncio.to_thread(run_tunneld, "csr", "list", "--config", str(cfg.path))
            assert csr.returncode == 0, csr.stderr
        assert not (short_dir / "egress2.sock").exists() and not (short_dir / "status2.sock").exists(), \
            "the second daemon removed the sockets it did bind"
    finally:
        assert await first.stop() == 0
    assert not cfg.socket.exists() and not egress.exists(), "the first daemon removes its own at stop"

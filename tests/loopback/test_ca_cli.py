"""`tunneld ca init` run twice shows the CA that is there (same pin, exit 0); `tunneld ca pin` prints it;
`token create --node` warns about a node the inventory does not have."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.certs_daemon import write_config

from .conftest import next_base


def tunneld(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunneld", *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ))


def pin_of(out: str) -> str:
    found = re.search(r"CA pin:\s+(sha256:[0-9a-f]{64})", out)
    assert found, out
    return found.group(1)


def test_ca_init_twice_and_ca_pin(short_dir: Path) -> None:
    cfg = write_config(short_dir / "m", next_base())
    first = tunneld("ca", "init", "--config", str(cfg.path))
    assert first.returncode == 0, first.stderr
    pin = pin_of(first.stdout)
    key = (short_dir / "m" / "ca.key").read_bytes()
    again = tunneld("ca", "init", "--config", str(cfg.path))
    assert again.returncode == 0, again.stderr
    assert "CA exists, kept" in again.stdout and pin_of(again.stdout) == pin
    assert "known_hosts:    @cert-authority * ssh-ed25519 " in again.stdout
    assert (short_dir / "m" / "ca.key").read_bytes() == key, "nothing replaced"
    shown = tunneld("ca", "pin", "--config", str(cfg.path))
    assert shown.returncode == 0 and shown.stdout.strip() == pin, shown.stderr


def test_token_for_unknown_node_warns(short_dir: Path) -> None:
    cfg = write_config(short_dir / "m", next_base())
    assert tunneld("ca", "init", "--config", str(cfg.path)).returncode == 0
    unknown = tunneld("token", "create", "--config", str(cfg.path), "--node", "node-9")
    assert unknown.returncode == 0
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}\n", unknown.stdout), "still only the token on stdout"
    assert unknown.stderr.startswith("warning: node 'node-9' is not in the inventory of ")
    known = tunneld("token", "create", "--config", str(cfg.path), "--node", "node-1")
    assert known.returncode == 0 and known.stderr == ""

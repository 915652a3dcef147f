"""Fixtures for system tests: real OpenSSH sshd per node, each in its own network namespace (tests/sshbed.py)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests import sshbed, waiting
from tests.leakcheck import gateways_give_back, released  # noqa: F401  (autouse: every test gives back)
from tunneld.config import Config, load_config


@pytest.fixture
def bed() -> Iterator[sshbed.SshBed]:
    if not os.access(sshbed.SSHD, os.X_OK):
        pytest.skip(f"{sshbed.SSHD} is missing (install openssh-server)")
    workdir = Path(tempfile.mkdtemp(prefix="tdbed", dir="/tmp"))
    b = sshbed.SshBed(workdir)
    if b.mode != "netns":
        print(f"sshbed: running in {b.mode} mode (network namespaces unavailable): nodes on 127.0.x.y addresses")
    try:
        yield b
    finally:
        b.close()
        shutil.rmtree(workdir, ignore_errors=True)


def write_config(bed: sshbed.SshBed, names: list[str], path: Path | None = None) -> Path:
    """A gateway config for ``names`` of the bed's nodes, with test-friendly timings."""
    path = path or bed.workdir / "tunneld.toml"
    nodes = [bed.nodes[n] for n in names]
    text = (
        "[ssh]\n"
        f'user = "{bed.user}"\nprivate_key = "{bed.client_key}"\nknown_hosts = "{bed.known_hosts}"\n'
        "keepalive_interval = 1\nkeepalive_count_max = 2\nconnect_timeout = 5\n"
        "backoff_initial = 0.2\nbackoff_max = 1\n\n"
        f'[health]\nperiod = 0.5\ntimeout = 3\nhost = "{bed.node_local_host}"\n'
        f"port = {nodes[0].healthz_port if nodes else 10248}\n\n"
        '[status]\nsocket = ""\n\n'
    )
    for node in nodes:
        text += f'[[nodes]]\nname = "{node.name}"\naddress = "{node.address}"\nssh_port = {node.port}\n\n'
    path.write_text(text)
    return path


def config_for(bed: sshbed.SshBed, names: list[str]) -> Config:
    return load_config(write_config(bed, names))


async def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> float:
    """Poll ``cond`` (bounded by ``timeout``); returns the seconds it took."""
    return await waiting.wait_for(cond, timeout, what)

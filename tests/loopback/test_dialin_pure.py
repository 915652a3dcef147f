"""A pure dial-in gateway: no ``[ssh] private_key`` or ``known_hosts`` when it can never dial out (a ``[dialin]``
listener, every node of the file dial-in, no Kubernetes node source). Anything that could add a dial-out node
(a dial-out node in the file, at start or on reload; the Kubernetes source) still requires them, with a message
saying why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dialinbed import SSH, DialinBed
from tests.loopback.test_dialin import NODE_ADDR, Targets, bed, targets, up_node  # noqa: F401
from tunneld.app import Gateway
from tunneld.config import load_checked, load_config
from tunneld.errors import ConfigError
from tunneld.tunnels.state import State

pytestmark = pytest.mark.skipif(not os.access(SSH, os.X_OK), reason="the OpenSSH client is missing")

ROOT = Path(__file__).resolve().parents[2]


def without_ssh_keys(text: str) -> str:
    """The bed's config with ``[ssh]`` reduced to its backoffs (no private_key, no known_hosts)."""
    head, rest = text.split("[ssh]\n", 1)
    body, tail = rest.split("\n\n", 1)
    kept = [line for line in body.splitlines() if not line.startswith(("private_key", "known_hosts"))]
    return head + "[ssh]\n" + "\n".join(kept) + "\n\n" + tail


async def test_a_pure_dial_in_gateway_needs_no_ssh_client_key(bed: DialinBed, targets: Targets) -> None:  # noqa: F811
    text = without_ssh_keys(bed.config_text([("node-1", NODE_ADDR, "dial-in"), ("node-2", "127.0.0.2", "dial-in")]))
    assert "private_key" not in text and "known_hosts" not in text
    path = bed.write_config(text)
    config = load_checked(path)
    assert config.ssh.private_key is None and config.ssh.known_hosts is None
    gw = Gateway(config)
    await gw.start()
    try:
        await up_node(bed, gw, path, "node-1")
        stream = await gw.dialer.dial(NODE_ADDR, targets.echo_port)
        await stream.write(b"no client key")
        assert await stream.read() == b"no client key"
        await stream.close()

        # a reload that adds a dial-out node is refused (the running gateway is untouched)
        path.write_text(without_ssh_keys(bed.config_text([("node-1", NODE_ADDR, "dial-in"),
                                                          ("node-3", "127.0.0.3", "dial-out")])))
        with pytest.raises(ConfigError) as refused:
            await gw.reload()
        message = str(refused.value)
        assert "ssh.private_key: required" in message and "ssh.known_hosts: required" in message
        assert "nodes node-3 are dial-out" in message
        assert set(gw.pool.tunnels) == {"node-1", "node-2"} and gw.pool.tunnels["node-1"].state is State.UP
    finally:
        await gw.stop(1)


def test_what_may_dial_out_still_needs_the_keys(bed: DialinBed, tmp_path: Path) -> None:  # noqa: F811
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text("{}")
    cases = {
        "the Kubernetes node source may add dial-out nodes": without_ssh_keys(bed.config_text([]))
        + f'\n[inventory]\nsource = "kubernetes"\nkubeconfig = "{kubeconfig}"\n',
        "nodes node-2 are dial-out": without_ssh_keys(bed.config_text([("node-1", NODE_ADDR, "dial-in"),
                                                                        ("node-2", "127.0.0.2", "dial-out")])),
        "(the key the gateway logs in to nodes with)\n": without_ssh_keys(bed.config_text([])).split("[dialin]")[0]
        + '[[nodes]]\nname = "node-2"\naddress = "127.0.0.2"\n',
    }
    for why, text in cases.items():
        path = bed.write_config(text)
        with pytest.raises(ConfigError) as refused:
            load_config(path)
        assert "ssh.private_key: required" in str(refused.value) + "\n", text
        assert why in str(refused.value) + "\n", str(refused.value)
    # and a dial-in gateway with no nodes yet (they come with a reload) is fine
    load_config(bed.write_config(without_ssh_keys(bed.config_text([]))))
    path = bed.write_config(without_ssh_keys(bed.config_text([("node-1", NODE_ADDR, "dial-in")])))
    check = subprocess.run([sys.executable, "-m", "tunneld", "check-config", str(path)], capture_output=True,
                           text=True, timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert check.returncode == 0, check.stderr

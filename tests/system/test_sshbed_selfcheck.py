# Self-check of the SSH test bed (tests/sshbed.py), using only the system OpenSSH client.
#
# Proves, in netns mode (when available) and in loopback mode, that: a node whose host certificate is signed
# by the bed CA accepts a strictly checked login; a node signed by another CA is refused; the node agent's
# echo and healthz servers are reachable through an SSH tunnel (ssh -W); kill_sshd drops live connections
# and closes the port while start_sshd brings it back; close() leaves no namespace, veth or process behind.
"""System self-check for tests/sshbed.py (real sshd per node, system ssh client only)."""

from __future__ import annotations

import os
import secrets
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests import sshbed
from tests.waiting import wait_sync

pytestmark = pytest.mark.system

if not os.access(sshbed.SSHD, os.X_OK):
    pytest.skip(f"{sshbed.SSHD} is missing (install openssh-server)", allow_module_level=True)
if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
    pytest.skip("the OpenSSH client tools (ssh, ssh-keygen) are missing", allow_module_level=True)

SSH_TIMEOUT = 30.0


def ssh_argv(bed: sshbed.SshBed, node: sshbed.SshNode, *extra: str, command: tuple[str, ...] = ()) -> list[str]:
    """System ssh command line trusting only the bed CA, with strict host key checking.

    extra: additional ssh options (before the destination); command: remote command (after it).
    """
    return [
        "ssh", "-F", "/dev/null",
        "-o", f"UserKnownHostsFile={bed.known_hosts}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", "UpdateHostKeys=no",
        "-o", "BatchMode=yes",
        "-o", "IdentitiesOnly=yes",
        "-o", "IdentityAgent=none",
        "-o", "ControlMaster=no",
        "-o", "ControlPath=none",
        "-o", "ConnectTimeout=5",
        "-i", str(bed.client_key),
        "-p", str(node.port),
        *extra,
        f"{bed.user}@{node.address}",
        *command,
    ]


def local_host(bed: sshbed.SshBed, node: sshbed.SshNode) -> str:
    """The host to dial through the tunnel to reach the node's own services."""
    return node.address if bed.node_local_host == "@node" else bed.node_local_host


def run_ssh(argv: list[str], data: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run ssh with bounded time, feeding data on stdin."""
    return subprocess.run(argv, input=data, capture_output=True, timeout=SSH_TIMEOUT, check=False)


def port_refuses(host: str, port: int) -> bool:
    """True if a TCP connect to host:port is refused."""
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


def read_exactly(stream: IO[bytes], n: int, timeout: float) -> bytes:
    """Read n bytes from a pipe with a deadline."""
    fd = stream.fileno()
    buf = b""
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        if len(buf) >= n or time.monotonic() > deadline:
            break
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                break
            buf += chunk
    return buf


@pytest.fixture(scope="module", params=["auto", "loopback"])
def bed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[sshbed.SshBed]:
    """A bed (netns mode when possible, and forced loopback mode) with one signed and one unsigned node."""
    workdir = tmp_path_factory.mktemp(f"sshbed-{request.param}")
    os.chmod(workdir, 0o700)
    with sshbed.SshBed(workdir / "bed", mode=request.param) as b:
        b.add_node("signed-1")
        b.add_node("rogue-1", signed=False)
        yield b


def test_bed_layout(bed: sshbed.SshBed) -> None:
    """Keys, known_hosts and addresses look like the API promises."""
    assert bed.known_hosts.read_text().splitlines() == [f"@cert-authority * {bed.ca_public_key}"]
    assert bed.client_key.stat().st_mode & 0o777 == 0o600
    assert bed.ca_key.exists()
    node = bed.nodes["signed-1"]
    if bed.mode == "netns":
        assert node.address.startswith("198.18.") or node.address.startswith("198.19.")
        assert node.port == 22
        assert bed.node_local_host == "127.0.0.1"
        out = node.run(["ip", "-o", "-4", "addr", "show"]).stdout
        assert node.address in out and "127.0.0.1" in out
    else:
        assert node.address.startswith("127.0.")
        assert node.port >= 2222
        assert bed.node_local_host == "@node"


def test_signed_node_accepts_login(bed: sshbed.SshBed) -> None:
    """Strict host checking against the CA-only known_hosts accepts the CA-signed node."""
    node = bed.nodes["signed-1"]
    before = node.accepted_logins()
    cp = run_ssh(ssh_argv(bed, node, command=("true",)))
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")
    assert node.accepted_logins() == before + 1


def test_unsigned_node_is_refused(bed: sshbed.SshBed) -> None:
    """A node whose host key is not certified by the bed CA fails strict host key checking."""
    node = bed.nodes["rogue-1"]
    cp = run_ssh(ssh_argv(bed, node, command=("true",)))
    assert cp.returncode != 0
    assert b"Host key verification failed" in cp.stderr, cp.stderr
    assert node.accepted_logins() == 0


def test_echo_and_healthz_through_tunnel(bed: sshbed.SshBed) -> None:
    """ssh -W reaches the agent's echo (with half-close) and healthz servers on the node."""
    node = bed.nodes["signed-1"]
    host = local_host(bed, node)
    payload = secrets.token_bytes(8 * 1024 * 1024)
    cp = run_ssh(ssh_argv(bed, node, "-W", f"{host}:{node.echo_port}"), payload)
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")
    assert len(cp.stdout) == len(payload) and cp.stdout == payload

    request = b"GET /healthz HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"
    cp = run_ssh(ssh_argv(bed, node, "-W", f"{host}:{node.healthz_port}"), request)
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")
    assert cp.stdout.startswith(b"HTTP/1.1 200 OK\r\n"), cp.stdout
    assert b"Content-Length: 2\r\n" in cp.stdout and cp.stdout.endswith(b"\r\n\r\nok")

    request = b"GET /nope HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n"
    cp = run_ssh(ssh_argv(bed, node, "-W", f"{host}:{node.healthz_port}"), request)
    assert cp.stdout.startswith(b"HTTP/1.1 404 "), cp.stdout


def test_kill_sshd_drops_connections_and_restart(bed: sshbed.SshBed) -> None:
    """kill_sshd kills live sessions and closes the port; start_sshd brings the node back."""
    node = bed.nodes["signed-1"]
    host = local_host(bed, node)
    proc = subprocess.Popen(ssh_argv(bed, node, "-W", f"{host}:{node.echo_port}"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"ping\n")
        proc.stdin.flush()
        assert read_exactly(proc.stdout, 5, 10.0) == b"ping\n"
        old_pid = node.sshd_pid
        assert old_pid is not None
        children = sshbed._descendants(old_pid)
        assert children, "sshd should have forked a per-connection child"

        node.kill_sshd()
        assert node.sshd_pid is None
        assert proc.wait(timeout=10.0) != 0, "the tunnel must drop when sshd is killed"
        assert port_refuses(node.address, node.port)
        assert not sshbed.pid_alive(old_pid)
        assert not any(sshbed.pid_alive(p) for p in children)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10.0)

    node.start_sshd()
    assert node.sshd_pid is not None and node.sshd_pid != old_pid
    cp = run_ssh(ssh_argv(bed, node, command=("true",)))
    assert cp.returncode == 0, cp.stderr.decode(errors="replace")


def test_extra_sshd_config_overrides_defaults(bed: sshbed.SshBed) -> None:
    """extra_sshd_config wins over the defaults (here: forwarding disabled makes -W fail)."""
    node = bed.add_node("noforward-1", extra_sshd_config="AllowTcpForwarding no")
    try:
        cp = run_ssh(ssh_argv(bed, node, "-W", f"{local_host(bed, node)}:{node.echo_port}"), b"x")
        assert cp.returncode != 0
        assert node.accepted_logins() == 1
        assert run_ssh(ssh_argv(bed, node, command=("true",))).returncode == 0
    finally:
        bed.remove_node("noforward-1")
    assert "noforward-1" not in bed.nodes


def _netns_names() -> list[str]:
    """Names from `ip netns list`."""
    cp = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    """Interface names in the root namespace."""
    cp = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10, check=False)
    return [line.split(":")[1].strip().split("@")[0] for line in cp.stdout.splitlines() if ":" in line]


@pytest.mark.parametrize("mode", ["auto", "loopback"])
def test_close_cleans_everything(tmp_path: Path, mode: str) -> None:
    """remove_node and close() leave no namespace, veth or started process behind; close is idempotent."""
    os.chmod(tmp_path, 0o700)
    bed = sshbed.SshBed(tmp_path / "bed", mode=mode)
    try:
        a = bed.add_node("a")
        b = bed.add_node("b", signed=False)
        c = bed.add_node("c")
        if bed.mode == "netns":
            assert len({a.address, b.address, c.address}) == 3
            assert all(n.netns and n.netns.startswith(bed.prefix) for n in (a, b, c))
            assert c.netns in _netns_names()
        c_pids = [c.sshd_pid, c.agent_pid]
        bed.remove_node("c")
        assert "c" not in bed.nodes
        assert c.netns not in _netns_names() and c.veth not in _link_names()
        assert not any(p is not None and sshbed.pid_alive(p) for p in c_pids)

        # a live session whose per-connection sshd children must also be stopped by close()
        proc = subprocess.Popen(ssh_argv(bed, a, command=("sleep", "60")), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_sync(lambda: a.accepted_logins() >= 1, 10.0, "the session's login", interval=0.02)
        assert a.sshd_pid is not None
        session_pids = sshbed._descendants(a.sshd_pid)
        assert session_pids
        started = list(bed.started_pids)
    finally:
        bed.close()
    try:
        assert proc.wait(timeout=10.0) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5.0)
    bed.close()  # idempotent
    assert not [n for n in _netns_names() if n.startswith(bed.prefix)]
    assert not [n for n in _link_names() if n.startswith(bed.prefix)]
    alive = [p for p in [*started, *session_pids] if sshbed.pid_alive(p)]
    assert not alive, f"processes still alive after close(): {alive}"
    with pytest.raises(sshbed.SshBedError):
        bed.add_node("late")


def test_invalid_sshd_config_is_reported_and_cleaned_up(bed: sshbed.SshBed) -> None:
    """A config sshd -t rejects raises SshBedError with sshd's output; the half-built node is removed."""
    names_before = set(_netns_names())
    with pytest.raises(sshbed.SshBedError, match="sshd rejected the config"):
        bed.add_node("broken-1", extra_sshd_config="ThisIsNotAnOption yes")
    assert "broken-1" not in bed.nodes
    assert set(_netns_names()) <= names_before

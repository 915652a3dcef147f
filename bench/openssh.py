"""The OpenSSH side of the comparison: ``ssh -N -L`` client processes, one per node, as a user would run them.

Same trust as the gateway (the bed's ``@cert-authority`` known_hosts, strict checking), same key, same cipher
(``-c``), no user or system ssh_config (``-F /dev/null``), keepalives like the gateway's (``ServerAliveInterval``).
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from bench import procs

SSH = "ssh"


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class SSHForward:
    """``ssh -N -L lport:target:port ...`` to one node; ``ports`` maps a target port to its local port."""

    def __init__(self, *, user: str, address: str, ssh_port: int, key: Path, known_hosts: Path, cipher: str,
                 targets: list[tuple[str, int]], log: Path, keepalive: float = 30.0) -> None:
        self.ports = {(host, port): free_port() for host, port in targets}
        argv = [SSH, "-N", "-F", "/dev/null", "-i", str(key), "-p", str(ssh_port), "-c", cipher,
                "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", "ExitOnForwardFailure=yes", "-o", "CheckHostIP=no", "-o", f"ServerAliveInterval={keepalive:g}",
                "-o", "ServerAliveCountMax=3"]
        for (host, port), lport in self.ports.items():
            argv += ["-L", f"127.0.0.1:{lport}:{host}:{port}"]
        argv.append(f"{user}@{address}")
        self.argv = argv
        self.proc = procs.spawn(argv, log=log)

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until every local port accepts (ssh binds them after authentication)."""
        deadline = time.monotonic() + timeout
        pending = set(self.ports.values())
        while pending and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ssh exited with {self.proc.returncode}: {' '.join(self.argv)}")
            for lport in list(pending):
                try:
                    socket.create_connection(("127.0.0.1", lport), timeout=1).close()
                    pending.discard(lport)
                except OSError:
                    pass
            time.sleep(0.05)
        if pending:
            raise RuntimeError(f"ssh -L ports {pending} not ready within {timeout}s")

    def usage(self) -> procs.Usage:
        return procs.usage(self.proc.pid)

    def stop(self) -> None:
        procs.stop(self.proc)


def version() -> str:
    import subprocess

    cp = subprocess.run([SSH, "-V"], capture_output=True, text=True, timeout=10, check=False)
    return (cp.stderr or cp.stdout).strip()

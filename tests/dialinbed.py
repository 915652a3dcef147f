"""A dial-in test bed on loopback: the SSH host and user CAs (ssh-keygen), a gateway with a ``[dialin]`` listener,
and real OpenSSH clients (``/usr/bin/ssh -N -R``) started with the command ``tunneld node ssh-command`` prints.

Every process is started here and stopped by PID; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import subprocess
from pathlib import Path

from click.testing import CliRunner

from tunneld.cli import main as cli

SSH = "/usr/bin/ssh"
SSH_KEYGEN = "/usr/bin/ssh-keygen"


def keygen(*args: str) -> None:
    subprocess.run([SSH_KEYGEN, "-q", *args], check=True, capture_output=True, timeout=30)


class DialinBed:
    """CAs, keys and a gateway config in ``workdir``; nodes are added before :meth:`write_config`."""

    def __init__(self, workdir: Path, gateway_host: str = "127.0.0.1", principals: str | None = None) -> None:
        """``principals``: the names in the gateway's host certificate (comma-separated; default its host)."""
        self.dir = workdir
        self.gateway_host = gateway_host
        keygen("-t", "ed25519", "-N", "", "-C", "host-ca", "-f", str(workdir / "ssh_ca"))
        keygen("-t", "ed25519", "-N", "", "-C", "user-ca", "-f", str(workdir / "ssh_user_ca"))
        keygen("-t", "ed25519", "-N", "", "-f", str(workdir / "gw_host"))
        keygen("-s", str(workdir / "ssh_ca"), "-h", "-I", "gateway", "-n", principals or gateway_host, "-V", "-5m:+1d",
               str(workdir / "gw_host.pub"))
        keygen("-t", "ed25519", "-N", "", "-f", str(workdir / "gw_client"))  # [ssh] private_key (dial-out)
        (workdir / "known_hosts").write_text("")
        self.nodes: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.extra = ""

    def node_key(self, name: str, *, principal: str | None = None, validity: str = "-5m:+1d",
                 ca: str = "ssh_user_ca", key_name: str | None = None) -> Path:
        """A node key with a user certificate (``<key>-cert.pub``)."""
        key = self.dir / (key_name or f"node_{name}")
        if not key.exists():
            keygen("-t", "ed25519", "-N", "", "-f", str(key))
        keygen("-s", str(self.dir / ca), "-I", f"{name}-cert", "-n", principal or f"node:{name}", "-V", validity,
               "-O", "clear", "-O", "permit-port-forwarding", str(key) + ".pub")
        return key

    def config_text(self, nodes: list[tuple[str, str, str]], *, health: str = "enabled = false",
                    extra: str = "") -> str:
        """``nodes``: (name, address, mode)."""
        d = self.dir
        text = (
            f'[ssh]\nprivate_key = "{d / "gw_client"}"\nknown_hosts = "{d / "known_hosts"}"\n'
            "backoff_initial = 0.2\nbackoff_max = 1\n\n"
            f"[health]\n{health}\n\n"
            '[status]\nsocket = ""\n\n'
            '[policy]\nnode_ports = ["7000-7010"]\npod_ports = ["8080"]\n\n'
            f'[dialin]\nlisten = "{self.gateway_host}:0"\nhost_key = "{d / "gw_host"}"\n'
            f'host_certificate = "{d / "gw_host-cert.pub"}"\nuser_ca = "{d / "ssh_user_ca.pub"}"\n'
            "login_grace = 5\nreplace_grace = 2\nsocks_timeout = 3\nkeepalive_interval = 2\n"
            f"{extra}\n"
        )
        for name, address, mode in nodes:
            text += f'[[nodes]]\nname = "{name}"\naddress = "{address}"\nmode = "{mode}"\n\n'
        return text

    def write_config(self, text: str) -> Path:
        path = self.dir / "tunneld.toml"
        path.write_text(text)
        return path

    def ssh_command(self, config: Path, node: str, port: int, key: Path,
                    gateway_host: str | None = None, extra: tuple[str, ...] = ()) -> tuple[list[str], str]:
        """``tunneld node ssh-command``'s two lines, the command split into argv and the known_hosts line."""
        result = CliRunner().invoke(cli, [
            "node", "ssh-command", "-c", str(config), "--node", node,
            "--gateway", f"{gateway_host or self.gateway_host}:{port}",
            "--host-ca", str(self.dir / "ssh_ca.pub"), "--key", str(key),
            "--known-hosts", str(self.dir / f"node_known_hosts_{node}"), *extra,
        ])
        assert result.exit_code == 0, result.output
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 2, lines
        return shlex.split(lines[0]), lines[1]

    def start_ssh(self, argv: list[str], known_hosts_line: str, node: str, *, netns: str | None = None,
                  log: Path | None = None) -> subprocess.Popen[bytes]:
        """Run the node's ssh exactly as printed (the known_hosts file holds the printed line)."""
        (self.dir / f"node_known_hosts_{node}").write_text(known_hosts_line + "\n")
        assert argv[0] == "ssh"
        full = [SSH, *argv[1:]]
        if netns is not None:
            full = ["ip", "netns", "exec", netns, *full]
        out = open(log or self.dir / f"ssh_{node}.log", "ab")
        with out:
            proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        self.procs.append(proc)
        return proc

    def ssh_log(self, node: str) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / f"ssh_{node}.log").read_text(errors="replace")
        return ""

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """The process's exit status (bounded wait)."""
    for _ in range(int(timeout / 0.05)):
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {proc.pid} did not exit within {timeout}s")


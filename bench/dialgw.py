"""A gateway process whose nodes dial in, and the key material for it and for :mod:`bench.simdialin`.

:func:`material` writes the SSH host CA (``ssh_ca``, which signs the gateway's host key for ``127.0.0.1``) and the
separate user CA (``ssh_user_ca``, which the simulated nodes sign their own certificates with) into a work
directory; :class:`DialinGateway` is a :class:`bench.gateway.GatewayProcess` whose config has a ``[dialin]``
listener and whose inventory marks every node ``mode = "dial-in"``; :class:`SimDialin` runs the simulated nodes in
one process of their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import asyncssh

from bench import procs, simnodes
from bench.gateway import GatewayProcess, GatewaySettings, NodeEntry


def material(workdir: Path) -> None:
    """Host CA, user CA, the gateway's host key and certificate (for 127.0.0.1), a dial-out key, known_hosts."""
    for stem, comment in (("ssh_ca", "host-ca"), ("ssh_user_ca", "user-ca"), ("gw_host", "gateway"),
                          ("client", "dial-out")):
        key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
        key.write_private_key(str(workdir / stem))
        os.chmod(workdir / stem, 0o600)
        key.write_public_key(str(workdir / f"{stem}.pub"))
    ca = asyncssh.read_private_key(str(workdir / "ssh_ca"))
    host = asyncssh.read_private_key(str(workdir / "gw_host"))
    cert = ca.generate_host_certificate(host, "gateway", principals=["127.0.0.1"], valid_after="-5m",
                                        valid_before="+7d")
    cert.write_certificate(str(workdir / "gw_host-cert.pub"))
    (workdir / "known_hosts").write_text(
        f"@cert-authority * {(workdir / 'ssh_ca.pub').read_text().strip()}\n")


def nodes(count: int) -> list[NodeEntry]:
    """The inventory entries of simulated nodes 0..count-1 (names and addresses as :mod:`bench.simnodes`)."""
    return [NodeEntry(simnodes.name(i), simnodes.address(i)) for i in range(count)]


class DialinGateway(GatewayProcess):
    """``tunneld serve`` with ``[dialin] listen = 127.0.0.1:<port>`` and every inventory node dial-in."""

    def __init__(self, workdir: Path, port: int, entries: Iterable[NodeEntry], *, health: bool = False,
                 node_ports: tuple[int, ...] = (), max_concurrent_handshakes: int = 64,
                 with_dialout_key: bool = True, settings: GatewaySettings | None = None,
                 dialout: Iterable[NodeEntry] = ()) -> None:
        """``entries`` dial in; ``dialout`` nodes (with ``settings`` for their sshd) are dialled as usual."""
        settings = settings or GatewaySettings(user="bench", private_key=workdir / "client",
                                               known_hosts=workdir / "known_hosts", health_enabled=health,
                                               node_ports=node_ports)
        super().__init__(workdir, settings, ())
        self.port = port
        write_dialin_inventory(workdir / "nodes.toml", entries, dialout)
        text = self.config.read_text()
        if not with_dialout_key:
            start = text.index("[ssh]")
            text = text[:start] + text[text.index("\n\n", start) + 2:]
        text += (
            f'\n[dialin]\nlisten = "127.0.0.1:{port}"\nhost_key = "{workdir / "gw_host"}"\n'
            f'host_certificate = "{workdir / "gw_host-cert.pub"}"\nuser_ca = "{workdir / "ssh_user_ca.pub"}"\n'
            f"max_concurrent_handshakes = {max_concurrent_handshakes}\nlogin_grace = 20\nkeepalive_interval = 15\n"
        )
        self.config.write_text(text)


def write_dialin_inventory(path: Path, entries: Iterable[NodeEntry], dialout: Iterable[NodeEntry] = ()) -> None:
    """An inventory file of dial-in ``[[nodes]]`` and dial-out ones (written atomically)."""
    text = "".join(f'[[nodes]]\nname = "{n.name}"\naddress = "{n.address}"\nmode = "dial-in"\n\n' for n in entries)
    text += "".join(f'[[nodes]]\nname = "{n.name}"\naddress = "{n.address}"\nssh_port = {n.ssh_port}\n\n'
                    for n in dialout)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text or "nodes = []\n")
    os.replace(tmp, path)


class SimDialin:
    """``python -m bench.simdialin`` for nodes ``first..first+count-1``, started and stopped by PID."""

    def __init__(self, workdir: Path, port: int, count: int, *, first: int = 0, jitter: float = 30.0,
                 echo: bool = False) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        argv = [sys.executable, "-m", "bench.simdialin", "--first", str(first), "--count", str(count),
                "--gateway", f"127.0.0.1:{port}", "--workdir", str(workdir), "--jitter", str(jitter)]
        if echo:
            argv.append("--echo")
        self.proc: subprocess.Popen[bytes] = procs.spawn(argv, log=workdir / f"simdialin-{first}.log", env=env,
                                                         stdout_pipe=True)
        try:
            procs.wait_line(self.proc, b"READY", 60)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        procs.stop(self.proc, grace=10.0)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

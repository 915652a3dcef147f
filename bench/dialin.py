"""Dial-in beside dial-out on the same machine: throughput and request latency through the gateway's CONNECT front.

    python -m bench.dialin [--quick]          (part of ``python -m bench`` as ``results["dialin"]``; see :func:`run`)

One gateway process with two nodes on loopback, both served by real OpenSSH on the node side and reaching the same
targets (:mod:`bench.nodeapp`: a byte sink and a tiny HTTP server, bound to every loopback address):

- ``dial-out``: the gateway dials the node's real ``sshd`` (tests/sshbed.py in loopback mode), ``direct-tcpip``;
- ``dial-in``: the node's real ``ssh -N -R 1080`` (exactly the command ``tunneld node ssh-command`` prints, with the
  same one cipher as the sshd) dials the gateway's ``[dialin]`` listener; ``forwarded-tcpip`` plus SOCKS5.

Per path: MiB/s of one stream into the sink (best of ``repeats``, interleaved so drifting load hits both alike) and
the latency of small GETs, on one kept-alive CONNECT stream and with a new CONNECT (a new channel, plus the SOCKS
exchange for dial-in) per request.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh
import click

from bench import clients, procs
from bench.dialgw import DialinGateway, material
from bench.gateway import GatewaySettings, NodeEntry
from bench.openssh import free_port

SINK_PORT = 9000
HTTP_PORT = 9080
NODEAPP = Path(__file__).resolve().with_name("nodeapp.py")
DIALIN_NODE = NodeEntry("bench-in", "127.0.0.1")
MiB = 1024 * 1024
QUICK = {"nbytes": 128 * MiB, "repeats": 1, "requests": 300}
FULL = {"nbytes": 1024 * MiB, "repeats": 3, "requests": 2000}


def _node_key(workdir: Path) -> Path:
    """The dial-in node's key and its user certificate (``node:bench-in``, port forwarding only) from the user CA."""
    ca = asyncssh.read_private_key(str(workdir / "ssh_user_ca"))
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = workdir / "node_key"
    key.write_private_key(str(path))
    path.chmod(0o600)
    cert = ca.generate_user_certificate(key, "bench-in", principals=[f"node:{DIALIN_NODE.name}"], valid_after="-5m",
                                        valid_before="+1d", permit_port_forwarding=True, permit_pty=False,
                                        permit_agent_forwarding=False, permit_x11_forwarding=False,
                                        permit_user_rc=False)
    cert.write_certificate(str(workdir / "node_key-cert.pub"))
    return path


def _ssh_argv(gw: DialinGateway, workdir: Path, key: Path, cipher: str) -> list[str]:
    """``tunneld node ssh-command``'s command (the known_hosts file written), with the cipher pinned."""
    known_hosts = workdir / "node_known_hosts"
    out = subprocess.run(
        [sys.executable, "-m", "tunneld", "node", "ssh-command", "-c", str(gw.config), "--node", DIALIN_NODE.name,
         "--gateway", f"127.0.0.1:{gw.port}", "--host-ca", str(workdir / "ssh_ca.pub"), "--key", str(key),
         "--known-hosts", str(known_hosts)], capture_output=True, text=True, timeout=60, check=True)
    command, line = out.stdout.strip().splitlines()
    known_hosts.write_text(line + "\n")
    argv = shlex.split(command)
    return [shutil.which("ssh") or "/usr/bin/ssh", "-o", f"Ciphers={cipher}", *argv[1:]]


def run(*, cipher: str, nbytes: int, repeats: int, requests: int, log: Any) -> dict[str, Any]:
    """Measure both paths; returns the ``dialin`` results section."""
    from tests.sshbed import SshBed

    workdir = Path(tempfile.mkdtemp(prefix="tdbenchdi", dir="/tmp"))
    bed = SshBed(workdir / "bed", mode="loopback")
    gw: DialinGateway | None = None
    app = ssh = None
    try:
        node = bed.add_node("bench-out", extra_sshd_config=f"Ciphers {cipher}\n")
        app = procs.spawn([sys.executable, "-I", str(NODEAPP), "--sink-port", str(SINK_PORT), "--http-port",
                           str(HTTP_PORT)], log=workdir / "nodeapp.log", stdout_pipe=True)
        procs.wait_line(app, b"READY", 15)
        material(workdir)
        settings = GatewaySettings(user=bed.user, private_key=bed.client_key, known_hosts=bed.known_hosts,
                                   keepalive_interval=30, health_enabled=False, node_ports=(SINK_PORT, HTTP_PORT))
        gw = DialinGateway(workdir, free_port(), [DIALIN_NODE], settings=settings,
                           dialout=[NodeEntry(node.name, node.address, node.port)])
        gw.start()
        ssh = procs.spawn(_ssh_argv(gw, workdir, _node_key(workdir), cipher), log=workdir / "node-ssh.log")
        gw.wait_up(2, 30, poll=0.1)
        log(f"dial-out: sshd {node.address}:{node.port}; dial-in: ssh -R from {DIALIN_NODE.address}; cipher {cipher}")
        egress = str(gw.egress_socket)
        paths = {"dial-out": node.address, "dial-in": DIALIN_NODE.address}
        runs: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(repeats):
            for name, address in paths.items():
                seconds = clients.upload(clients.connect_via(egress, address, SINK_PORT), nbytes)
                runs[name].append(nbytes / seconds / MiB)
                log(f"  {name:8} {runs[name][-1]:8.1f} MiB/s")
        result: dict[str, Any] = {"cipher": cipher, "nbytes": nbytes, "throughput": {
            name: {"mib_per_s": round(max(v), 1), "runs": [round(x, 1) for x in v]} for name, v in runs.items()}}
        latency: dict[str, Any] = {}
        for name, address in paths.items():
            http = clients.connect_via(egress, address, HTTP_PORT)
            latency[f"{name} (keep-alive)"] = clients.latency_keepalive(http, "/healthz", requests).summary()
            latency[f"{name} (new CONNECT = new channel)"] = clients.latency_fresh(http, "/healthz",
                                                                                  requests).summary()
        for k, v in latency.items():
            log(f"  {k:40} p50 {v['p50_ms']:7.3f} ms  p99 {v['p99_ms']:7.3f} ms")
        result["latency"] = latency
        tp = result["throughput"]
        result["ratio_dialin_to_dialout_throughput"] = round(tp["dial-in"]["mib_per_s"] / tp["dial-out"]["mib_per_s"],
                                                             3)
        return result
    finally:
        procs.stop(ssh)
        if gw is not None:
            gw.stop()
        procs.stop(app)
        bed.close()
        shutil.rmtree(workdir, ignore_errors=True)


@click.command()
@click.option("--quick", is_flag=True, help=f"{QUICK['nbytes'] // MiB} MiB once, {QUICK['requests']} requests.")
@click.option("--cipher", default="aes128-gcm@openssh.com", show_default=True)
def main(quick: bool, cipher: str) -> None:
    """Dial-in beside dial-out: throughput and request latency through the gateway."""
    procs.raise_nofile()
    started = time.monotonic()
    result = run(cipher=cipher, log=lambda m: print(m, file=sys.stderr, flush=True), **(QUICK if quick else FULL))
    tp = result["throughput"]
    print(f"{'path':10} {'MiB/s':>8}   latency p50 keep-alive / new channel (ms)")
    for name in ("dial-out", "dial-in"):
        ka, fresh = result["latency"][f"{name} (keep-alive)"], result["latency"][f"{name} (new CONNECT = new channel)"]
        print(f"{name:10} {tp[name]['mib_per_s']:8.1f}   {ka['p50_ms']:7.3f} / {fresh['p50_ms']:7.3f}")
    print(f"dial-in / dial-out throughput: {result['ratio_dialin_to_dialout_throughput']} "
          f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()

"""Side by side against one real OpenSSH sshd: throughput, small-request latency, channel-open rate.

One node from the system tests' bed (tests/sshbed.py: a real sshd in its own network namespace, host key signed by
the bed's SSH CA). Its sshd is restricted to one cipher, so the gateway and ``ssh -N -L`` necessarily use the same
one. Inside the namespace runs :mod:`bench.nodeapp` (a sink and a tiny HTTP server) on all addresses. The gateway is
its own process; the OpenSSH client is one ``ssh -N -L`` process; the clients are this process.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import clients, openssh, procs
from bench.gateway import GatewayProcess, GatewaySettings, NodeEntry

SINK_PORT = 9000
HTTP_PORT = 9080
NODEAPP = Path(__file__).resolve().with_name("nodeapp.py")
MiB = 1024 * 1024


def run(*, cipher: str, nbytes: int, repeats: int, requests: int, opens_seq: int, opens_conc: int,
        concurrency: int, log: Any, keep: bool = False) -> dict[str, Any]:
    """Run the sshd comparison; returns the results section."""
    from tests.sshbed import SshBed

    workdir = Path(tempfile.mkdtemp(prefix="tdbench", dir="/tmp"))
    bed = SshBed(workdir / "bed")
    gw: GatewayProcess | None = None
    fwd: openssh.SSHForward | None = None
    app = None
    try:
        node = bed.add_node("bench-0", extra_sshd_config=f"Ciphers {cipher}\n")
        argv = [sys.executable, "-I", str(NODEAPP), "--sink-port", str(SINK_PORT), "--http-port", str(HTTP_PORT)]
        if node.netns:
            argv = ["ip", "netns", "exec", node.netns, *argv]
            # Every channel is a TCP connection sshd makes inside the node; thousands per second leave thousands of
            # TIME_WAIT sockets holding ephemeral ports, and once the range fills every connect() slows down, for
            # ssh -L and the gateway alike (first runs measured that, not the tunnels). A busy node allows reuse.
            subprocess.run(["ip", "netns", "exec", node.netns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                            "net.ipv4.ip_local_port_range=1024 65000"], check=True)
        app = procs.spawn(argv, log=workdir / "nodeapp.log", stdout_pipe=True)
        procs.wait_line(app, b"READY", 15)
        log(f"node {node.name}: sshd {node.address}:{node.port} ({bed.mode}), cipher {cipher}")

        settings = GatewaySettings(
            user=bed.user, private_key=bed.client_key, known_hosts=bed.known_hosts, keepalive_interval=30,
            health_port=node.healthz_port, node_ports=(SINK_PORT, HTTP_PORT), proxy_port=openssh.free_port(),
            proxy_token=secrets.token_urlsafe(32),
        )
        gw = GatewayProcess(workdir, settings, [NodeEntry(node.name, node.address, node.port)])
        gw.start()
        gw.wait_up(1, 30, poll=0.1)
        fwd = openssh.SSHForward(user=bed.user, address=node.address, ssh_port=node.port, key=bed.client_key,
                                 known_hosts=bed.known_hosts, cipher=cipher, log=workdir / "ssh.log",
                                 targets=[(node.address, SINK_PORT), (node.address, HTTP_PORT)])
        fwd.wait_ready()
        gw_rss_one, ssh_rss_one = gw.usage(), fwd.usage()

        direct_sink = clients.tcp(node.address, SINK_PORT)
        direct_http = clients.tcp(node.address, HTTP_PORT)
        ssh_sink = clients.tcp("127.0.0.1", fwd.ports[(node.address, SINK_PORT)])
        ssh_http = clients.tcp("127.0.0.1", fwd.ports[(node.address, HTTP_PORT)])
        egress = str(gw.egress_socket)
        gw_sink = clients.connect_via(egress, node.address, SINK_PORT)
        gw_http = clients.connect_via(egress, node.address, HTTP_PORT)
        proxy = clients.tcp("127.0.0.1", settings.proxy_port or 0)
        proxy_path = f"/api/v1/nodes/{node.name}:{HTTP_PORT}/proxy/healthz"

        # 1. throughput, interleaved so drifting background load hits both alike; best of `repeats`.
        log(f"throughput: {nbytes // MiB} MiB x {repeats} per path")
        runs: dict[str, list[float]] = {"direct": [], "ssh -L": [], "gateway": []}
        cpu: dict[str, list[float]] = {"ssh -L": [], "gateway": []}
        for _ in range(repeats):
            for name, opener, proc in (("ssh -L", ssh_sink, fwd), ("gateway", gw_sink, gw), ("direct", direct_sink,
                                                                                           None)):
                before = proc.usage() if proc else None
                seconds = clients.throughput(opener, nbytes)
                if proc is not None and before is not None:
                    cpu[name].append(proc.usage().cpu_seconds - before.cpu_seconds)
                runs[name].append(nbytes / seconds / MiB)
                log(f"  {name:8} {nbytes / seconds / MiB:8.1f} MiB/s")
        tp = {name: {"mib_per_s": round(max(v), 1), "runs": [round(x, 1) for x in v]} for name, v in runs.items()}
        for name, v in cpu.items():
            tp[name]["cpu_s_per_gib"] = round(min(v) * (1024 * MiB) / nbytes, 2)
        tp["ratio_gateway_to_ssh"] = round(tp["gateway"]["mib_per_s"] / tp["ssh -L"]["mib_per_s"], 3)

        # 2. small-request latency
        log(f"latency: {requests} sequential GETs per path")
        path = "/healthz"
        lat = {
            "direct (keep-alive)": clients.latency_keepalive(direct_http, path, requests),
            "direct (new connection)": clients.latency_fresh(direct_http, path, requests),
            "ssh -L (keep-alive)": clients.latency_keepalive(ssh_http, path, requests),
            "ssh -L (new connection = new channel)": clients.latency_fresh(ssh_http, path, requests),
            "gateway CONNECT (keep-alive)": clients.latency_keepalive(gw_http, path, requests),
            "gateway CONNECT (new CONNECT = new channel)": clients.latency_fresh(gw_http, path, requests),
            "gateway proxy URL (new channel per request)": clients.latency_keepalive(
                proxy, proxy_path, requests, headers=f"Authorization: Bearer {settings.proxy_token}\r\n"),
        }
        latency = {k: v.summary() for k, v in lat.items()}
        for k, v in latency.items():
            log(f"  {k:45} p50 {v['p50_ms']:7.3f} ms  p99 {v['p99_ms']:7.3f} ms")
        base = latency["direct (keep-alive)"]["p50_ms"]
        added_ssh = latency["ssh -L (new connection = new channel)"]["p50_ms"] - latency[
            "direct (new connection)"]["p50_ms"]
        added_ssh_ka = latency["ssh -L (keep-alive)"]["p50_ms"] - base
        added_proxy = latency["gateway proxy URL (new channel per request)"]["p50_ms"] - base
        latency_ratios = {
            "proxy_url_added_ms": round(added_proxy, 3),
            "ssh_L_new_channel_added_ms": round(added_ssh, 3),
            "ssh_L_keepalive_added_ms": round(added_ssh_ka, 3),
            "proxy_url_vs_ssh_L_new_channel": round(added_proxy / added_ssh, 2) if added_ssh > 0 else None,
            "proxy_url_vs_ssh_L_keepalive": round(added_proxy / added_ssh_ka, 2) if added_ssh_ka > 0 else None,
        }

        # 3. channel-open rate on one tunnel
        log(f"channel opens: {opens_seq} sequential, {opens_conc} with {concurrency} concurrent")
        lport = fwd.ports[(node.address, HTTP_PORT)]

        def ssh_open() -> Any:
            return clients.open_tcp("127.0.0.1", lport)

        def gw_open() -> Any:
            return clients.open_connect(egress, node.address, HTTP_PORT)

        async def rates() -> dict[str, Any]:
            out: dict[str, Any] = {}
            for name, opener in (("ssh -L", ssh_open), ("gateway CONNECT", gw_open)):
                out[name] = {
                    "sequential": await clients.channel_rate(opener, path, opens_seq, 1),
                    "concurrent": await clients.channel_rate(opener, path, opens_conc, concurrency),
                }
            return out

        channel = asyncio.run(rates())
        for name, v in channel.items():
            log(f"  {name:16} sequential {v['sequential']['per_second']:7.1f}/s  "
                f"{concurrency} concurrent {v['concurrent']['per_second']:7.1f}/s "
                f"(errors {v['sequential']['errors']}+{v['concurrent']['errors']})")
        time.sleep(0.5)
        return {
            "cipher": cipher, "sshd_mode": bed.mode, "openssh": openssh.version(), "bytes": nbytes,
            "throughput": tp, "latency": latency, "latency_added": latency_ratios, "channel_open": channel,
            "one_tunnel_memory": {"gateway_rss": gw_rss_one.rss, "ssh_rss": ssh_rss_one.rss,
                                  "ssh_pss": ssh_rss_one.pss},
        }
    finally:
        if fwd is not None:
            fwd.stop()
        if gw is not None:
            gw.stop()
        procs.stop(app)
        bed.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

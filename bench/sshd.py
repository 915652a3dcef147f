"""Side by side against real OpenSSH sshds: throughput both ways, small-request latency and CPU, channel-open rate,
one stream per tunnel over several tunnels at once, and the Konnectivity gRPC front beside CONNECT.

Nodes from the system tests' bed (tests/sshbed.py: a real sshd in its own network namespace each, host key signed by
the bed's SSH CA). Each sshd is restricted to one cipher, so the gateway and ``ssh -N -L`` necessarily use the same
one. Inside each namespace runs :mod:`bench.nodeapp` (a transfer port and a tiny HTTP server). The gateway is its own
process with one tunnel per node; OpenSSH is one ``ssh -N -L`` process per node; the clients are this process.
The single-stream and request figures use the first node; the parallel figure uses all of them.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import clients, openssh, procs
from bench import rounds as rounds_
from bench.gateway import GatewayProcess, GatewaySettings, NodeEntry

SINK_PORT = 9000
HTTP_PORT = 9080
NODEAPP = Path(__file__).resolve().with_name("nodeapp.py")
MiB = 1024 * 1024


def _start_nodeapp(node: Any, workdir: Path) -> Any:
    argv = [sys.executable, "-I", str(NODEAPP), "--sink-port", str(SINK_PORT), "--http-port", str(HTTP_PORT)]
    if node.netns:
        argv = ["ip", "netns", "exec", node.netns, *argv]
        # Every channel is a TCP connection sshd makes inside the node; thousands per second leave thousands of
        # TIME_WAIT sockets holding ephemeral ports, and once the range fills every connect() slows down, for
        # ssh -L and the gateway alike (first runs measured that, not the tunnels). A busy node allows reuse.
        subprocess.run(["ip", "netns", "exec", node.netns, "sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1",
                        "net.ipv4.ip_local_port_range=1024 65000"], check=True, timeout=30)
    app = procs.spawn(argv, log=workdir / f"nodeapp-{node.name}.log", stdout_pipe=True)
    procs.wait_line(app, b"READY", 15)
    return app


def run(*, cipher: str, nbytes: int, rounds: int, requests: int, opens_seq: int, opens_conc: int,
        concurrency: int, tunnels: int, parallel_bytes: int, log: Any, keep: bool = False) -> dict[str, Any]:
    """Run the sshd comparison (``rounds`` interleaved rounds); returns the results section."""
    from tests.sshbed import SshBed

    workdir = Path(tempfile.mkdtemp(prefix="tdbench", dir="/tmp"))
    bed = SshBed(workdir / "bed")
    gw: GatewayProcess | None = None
    forwards: list[openssh.SSHForward] = []
    apps: list[Any] = []
    try:
        if bed.mode != "netns":
            tunnels = 1  # every node's apps listen on the same ports: one node per network namespace
        nodes = [bed.add_node(f"bench-{i}", extra_sshd_config=f"Ciphers {cipher}\n") for i in range(tunnels)]
        apps = [_start_nodeapp(n, workdir) for n in nodes]
        node = nodes[0]
        log(f"{len(nodes)} nodes ({bed.mode}), each a real sshd with only {cipher}; "
            f"first at {node.address}:{node.port}")

        settings = GatewaySettings(
            user=bed.user, private_key=bed.client_key, known_hosts=bed.known_hosts, keepalive_interval=30,
            health_port=node.healthz_port, node_ports=(SINK_PORT, HTTP_PORT), proxy_port=openssh.free_port(),
            grpc=True, proxy_token=secrets.token_urlsafe(32),
        )
        gw = GatewayProcess(workdir, settings, [NodeEntry(n.name, n.address, n.port) for n in nodes])
        gw.start()
        gw.wait_up(len(nodes), 60, poll=0.1)
        for i, n in enumerate(nodes):
            forwards.append(openssh.SSHForward(
                user=bed.user, address=n.address, ssh_port=n.port, key=bed.client_key, known_hosts=bed.known_hosts,
                cipher=cipher, log=workdir / f"ssh-{i}.log", targets=[(n.address, SINK_PORT), (n.address, HTTP_PORT)]))
        for f in forwards:
            f.wait_ready()
        fwd = forwards[0]
        gw_rss_one, ssh_rss_one = gw.usage(), fwd.usage()
        egress = str(gw.egress_socket)
        paths = rounds_.Paths(
            gateway_pid=gw.pid, ssh_pid=fwd.proc.pid, ssh_pids=[f.proc.pid for f in forwards],
            direct_sink=clients.tcp(node.address, SINK_PORT), direct_http=clients.tcp(node.address, HTTP_PORT),
            ssh_sink=clients.tcp("127.0.0.1", fwd.ports[(node.address, SINK_PORT)]),
            ssh_http=clients.tcp("127.0.0.1", fwd.ports[(node.address, HTTP_PORT)]),
            gw_sink=clients.connect_via(egress, node.address, SINK_PORT),
            gw_http=clients.connect_via(egress, node.address, HTTP_PORT),
            proxy=clients.tcp("127.0.0.1", settings.proxy_port or 0),
            proxy_path=f"/api/v1/nodes/{node.name}:{HTTP_PORT}/proxy/healthz", egress=egress,
            proxy_headers=f"Authorization: Bearer {settings.proxy_token}\r\n",
            grpc_socket=str(gw.grpc_socket), sink_address=f"{node.address}:{SINK_PORT}",
            http_address=f"{node.address}:{HTTP_PORT}", ssh_http_port=fwd.ports[(node.address, HTTP_PORT)],
            http_port=HTTP_PORT, node_address=node.address,
            ssh_sinks=[clients.tcp("127.0.0.1", f.ports[(n.address, SINK_PORT)]) for f, n in zip(forwards, nodes,
                                                                                                   strict=True)]
            if len(nodes) > 1 else [],
            gw_sinks=[clients.connect_via(egress, n.address, SINK_PORT) for n in nodes] if len(nodes) > 1 else [],
        )
        log(f"{rounds} interleaved rounds: {nbytes // MiB} MiB each way per path, {requests} requests per path, "
            f"{opens_seq} + {opens_conc} channel opens, {len(paths.gw_sinks)} x {parallel_bytes // MiB} MiB parallel")
        raw = [rounds_.one_round(paths, i, nbytes=nbytes, requests=requests, opens_seq=opens_seq,
                                 opens_conc=opens_conc, concurrency=concurrency, parallel_bytes=parallel_bytes,
                                 log=log) for i in range(rounds)]
        out = rounds_.summarize(raw)
        out.update({
            "cipher": cipher, "sshd_mode": bed.mode, "openssh": openssh.version(), "bytes": nbytes,
            "requests_per_round": requests, "tunnels": len(nodes), "parallel_bytes_per_stream": parallel_bytes,
            "one_tunnel_memory": {"gateway_rss": gw_rss_one.rss, "ssh_rss": ssh_rss_one.rss,
                                  "ssh_pss": ssh_rss_one.pss},
            "ssh_path": gw.get(f"/tunnels/{node.name}").get("packet_path"),
        })
        return out
    finally:
        for f in forwards:
            f.stop()
        if gw is not None:
            gw.stop()
        for app in apps:
            procs.stop(app)
        bed.close()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

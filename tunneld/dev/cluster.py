"""``tunneld dev``: N simulated nodes and a real gateway against them, in one process.

Writes everything (keys, known_hosts, config) to a private work directory so the gateway is configured exactly as a
real one would be, and ``tunneld status --socket`` works from another terminal.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shutil
import ssl
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunneld import render
from tunneld.app import Gateway
from tunneld.config import load_config
from tunneld.dev.kubelet import KubeletSim, SimPod
from tunneld.dev.pki import DevCA, write_private
from tunneld.dev.sshnode import SimNode, SSHMaterial
from tunneld.lifecycle import Signals
from tunneld.probe import ProbeFailed, http_get

HEALTHZ_PORT = 10248
KUBELET_PORT = 10250


@dataclass
class DevCluster:
    """Simulated nodes on 127.0.1.x plus the config a gateway needs to reach them."""

    nodes: int = 3
    base_address: str = "127.0.1.1"
    ssh_port: int = 2222
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tunneld-dev-")))
    sim_nodes: list[SimNode] = field(default_factory=list)
    kubelets: list[KubeletSim] = field(default_factory=list)
    config_path: Path | None = None

    async def start(self) -> Path:
        """Start the nodes; returns the path of the gateway config written for them."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        material = SSHMaterial.generate(self.workdir)
        ca = DevCA()
        (self.workdir / "kubelet-ca.crt").write_bytes(ca.cert_pem)
        first = ipaddress.ip_address(self.base_address)
        node_tables = []
        for i in range(self.nodes):
            name = f"node-{i + 1}"
            address = str(first + i)
            issued = ca.issue_serving(name, [name, address, "localhost", "127.0.0.1"])
            cert_file, key_file = self.workdir / f"{name}-kubelet.crt", self.workdir / f"{name}-kubelet.key"
            cert_file.write_bytes(issued.cert_pem)
            write_private(key_file, issued.key_pem)
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls.load_cert_chain(cert_file, key_file)
            pod_cidr = f"10.244.{i + 1}.0/24"
            pods = [
                SimPod("default", f"web-{i + 1}", ["nginx"], f"10.244.{i + 1}.10"),
                SimPod("kube-system", f"agent-{name}", ["agent", "sidecar"], f"10.244.{i + 1}.11"),
            ]
            kubelet = KubeletSim(name, address, KUBELET_PORT, HEALTHZ_PORT, tls, pods)
            await kubelet.start()
            self.kubelets.append(kubelet)
            sim = SimNode(name, address, self.ssh_port, material)
            await sim.start()
            self.sim_nodes.append(sim)
            node_tables.append(
                f'[[nodes]]\nname = "{name}"\naddress = "{address}"\nssh_port = {self.ssh_port}\n'
                f'kubelet_port = {KUBELET_PORT}\npod_cidr = "{pod_cidr}"\n'
            )
        pattern = ".".join(self.base_address.split(".")[:3]) + ".*"
        (self.workdir / "known_hosts").write_text(material.known_hosts_line(pattern))
        config = (
            "# Written by `tunneld dev`: a gateway configured for the simulated nodes below.\n"
            "[ssh]\n"
            f'user = "tunneld"\nprivate_key = "gateway_ed25519"\nknown_hosts = "known_hosts"\n'
            "keepalive_interval = 5\nkeepalive_count_max = 3\nbackoff_initial = 0.5\nbackoff_max = 10\n\n"
            "[health]\nperiod = 2\ntimeout = 2\n\n"
            f'[status]\nsocket = "{self.workdir / "tunneld.sock"}"\n\n'
            + "\n".join(node_tables)
        )
        self.config_path = self.workdir / "tunneld.toml"
        self.config_path.write_text(config)
        return self.config_path

    async def stop(self) -> None:
        for sim in self.sim_nodes:
            await sim.stop()
        for kubelet in self.kubelets:
            await kubelet.close()


async def wait_all_up(gateway: Gateway, timeout: float) -> bool:
    """Wait (bounded) until every tunnel is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tunnels = gateway.pool.tunnels.values()
        if tunnels and all(t.state.value == "up" and t.last_probe is not None for t in tunnels):
            return True
        await asyncio.sleep(0.1)
    return False


async def healthz_through_tunnels(gateway: Gateway) -> dict[str, str]:
    """GET each node's kubelet /healthz through the gateway's dialer (so through the node's tunnel)."""
    results: dict[str, str] = {}
    for name, node in sorted(gateway.pool.nodes.items()):
        try:
            status, body = await http_get(gateway.dialer.dial, node.address, HEALTHZ_PORT, "/healthz", 5.0)
            results[name] = body.decode().strip() if status == 200 else f"HTTP {status}"
        except ProbeFailed as exc:
            results[name] = f"failed: {exc}"
    return results


async def run(nodes: int, ssh_port: int, base_address: str, workdir: Path | None, check: bool) -> int:
    """Run the dev cluster; with ``check``, exit after printing (0 when every node is up and answers ``ok``)."""
    cluster = DevCluster(nodes=nodes, base_address=base_address, ssh_port=ssh_port)
    temporary = workdir is None
    if workdir is not None:
        cluster.workdir = workdir
    config_path = await cluster.start()
    gateway = Gateway(load_config(config_path))
    await gateway.start()
    try:
        all_up = await wait_all_up(gateway, timeout=30 + nodes * 0.05)
        print(render.table(gateway.pool.snapshot()), flush=True)
        results = await healthz_through_tunnels(gateway)
        print()
        for name, result in results.items():
            print(f"GET http://{gateway.pool.nodes[name].address}:{HEALTHZ_PORT}/healthz via {name}: {result}")
        ok = all_up and all(r == "ok" for r in results.values())
        print()
        print(f"{'all' if all_up else 'NOT all'} {nodes} nodes up. Config: {config_path}")
        print(f"Status:  tunneld status --socket {gateway.config.status.socket}")
        if check:
            return 0 if ok else 1
        print("Ctrl-C to stop.", flush=True)
        signals = Signals(gateway.reload)
        await signals.stop.wait()
        signals.close()
        return 0
    finally:
        await gateway.stop(grace=2.0)
        await cluster.stop()
        if temporary:
            shutil.rmtree(cluster.workdir, ignore_errors=True)

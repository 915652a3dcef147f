"""``tunneld dev``: N simulated nodes and a real gateway against them, in one process.

Writes everything (keys, known_hosts, CAs, config) to a private work directory so the gateway is configured exactly
as a real one would be, and ``tunneld status --socket`` works from another terminal. Each node runs two pods
(``default/web-N`` and ``kube-system/agent-node-N``) whose apps (see :mod:`tunneld.dev.podapps`) are reachable through
the node's tunnel; the gateway serves proxy URLs on ``127.0.0.1:<proxy_port>`` (bearer token in ``proxy.token``, for
the user who started it, in ``system:masters``) and on ``<workdir>/proxy.sock`` (that user's uid), HTTP CONNECT on
``<workdir>/egress.sock``, verifies kubelets against ``kubelet-ca.crt`` and https pod/service targets against
``pod-ca.crt``, and knows one service, ``default/web`` (ports ``http`` 80 -> 8080, ``https`` 443 -> 8443) whose
endpoints are the web pods.
"""

from __future__ import annotations

import asyncio
import errno
import getpass
import ipaddress
import os
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from certs.files import write_secret
from certs.kubeconfig import Cluster, Context, KubeConfig, User
from tunneld.app import Gateway
from tunneld.cli import render
from tunneld.config import load_config
from tunneld.dev.kubelet import KubeletSim, SimPod
from tunneld.dev.pki import DevCA, server_context
from tunneld.dev.sshnode import SimNode, SSHMaterial
from tunneld.ops.lifecycle import Signals
from tunneld.tunnels.probe import ProbeFailed, http_get

HEALTHZ_PORT = 10248
KUBELET_PORT = 10250
DEFAULT_PROXY_PORT = 8001


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for a listener configured by port number)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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
    proxy_port: int = DEFAULT_PROXY_PORT
    """Port of the proxy-URL front on 127.0.0.1; 0 picks a free port (written to the config, and kept here)."""
    proxy_tls: bool = False
    """Serve the proxy-URL front over TLS (``proxy-ca.crt`` signs its certificate): kubectl sends a bearer token
    only over https. ``tunneld dev`` sets it; tests that speak plain HTTP leave it off."""

    @property
    def egress_socket(self) -> Path:
        """The HTTP CONNECT front's unix socket."""
        return self.workdir / "egress.sock"

    @property
    def grpc_socket(self) -> Path:
        """The Konnectivity gRPC front's unix socket."""
        return self.workdir / "grpc.sock"

    @property
    def proxy_socket(self) -> Path:
        """The proxy-URL front's unix socket (callers known by their uid)."""
        return self.workdir / "proxy.sock"

    @property
    def token_path(self) -> Path:
        """The bearer token (mode 0600) of the user who started the cluster, for the proxy-URL front."""
        return self.workdir / "proxy.token"

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig (mode 0600) for the proxy-URL front with that token."""
        return self.workdir / "kubeconfig"

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    @property
    def auth_header(self) -> tuple[str, str]:
        """``("Authorization", "Bearer <token>")`` for the proxy-URL front."""
        return "Authorization", f"Bearer {self.token}"

    def _write_credentials(self) -> None:
        """A token for whoever started the cluster (never ``insecure_anonymous_loopback``): the token file the
        gateway reads, the token alone, and a kubeconfig, all 0600."""
        token = secrets.token_urlsafe(32)
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = f"uid:{os.getuid()}"
        write_secret(self.workdir / "tokens.csv", f'{token},{user},{os.getuid()},"system:masters"\n'.encode())
        write_secret(self.token_path, f"{token}\n".encode())
        ca_pem = self.proxy_ca.read_bytes() if self.proxy_tls else None
        config = KubeConfig(clusters=(Cluster("tunneld-dev", self.proxy_url, ca_pem),),
                            users=(User(user, token=token),),
                            contexts=(Context("tunneld-dev", "tunneld-dev", user),), current_context="tunneld-dev")
        write_secret(self.kubeconfig, config.dumps().encode())

    @property
    def proxy_url(self) -> str:
        """Base URL of the proxy-URL front."""
        return f"{'https' if self.proxy_tls else 'http'}://127.0.0.1:{self.proxy_port}"

    @property
    def proxy_ca(self) -> Path:
        """The CA of the proxy-URL front's TLS certificate (with ``proxy_tls``)."""
        return self.workdir / "proxy-ca.crt"

    def _pods(self, index: int, node: str, pod_ca: DevCA) -> list[SimPod]:
        pods = [
            SimPod("default", f"web-{index + 1}", ["nginx"], f"10.244.{index + 1}.10"),
            SimPod("kube-system", f"agent-{node}", ["agent", "sidecar"], f"10.244.{index + 1}.11"),
        ]
        pod_dir = self.workdir / "pods"
        pod_dir.mkdir(mode=0o700, exist_ok=True)
        for pod in pods:
            cert_file, key_file = pod_dir / f"{pod.name}.crt", pod_dir / f"{pod.name}.key"
            pod_ca.issue_serving(pod.name, [pod.ip, pod.name]).write(cert_file, key_file)
            pod.pod_tls = server_context(cert_file, key_file)
        return pods

    async def start(self) -> Path:
        """Start the nodes; returns the path of the gateway config written for them."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.workdir.chmod(0o700)
        material = SSHMaterial.generate(self.workdir)
        ca = DevCA()
        pod_ca = DevCA("tunneld dev pod CA")
        (self.workdir / "kubelet-ca.crt").write_bytes(ca.cert_pem)
        (self.workdir / "pod-ca.crt").write_bytes(pod_ca.cert_pem)
        if self.proxy_port == 0:
            self.proxy_port = free_port()
        proxy_tls = ""
        if self.proxy_tls:
            proxy_ca = DevCA("tunneld dev proxy CA")
            self.proxy_ca.write_bytes(proxy_ca.cert_pem)
            proxy_ca.issue_serving("127.0.0.1", ["127.0.0.1", "localhost"]).write(
                self.workdir / "proxy.crt", self.workdir / "proxy.key")
            proxy_tls = 'tls_cert = "proxy.crt"\ntls_key = "proxy.key"\n'
        self._write_credentials()
        first = ipaddress.ip_address(self.base_address)
        node_tables = []
        web_ips = []
        for i in range(self.nodes):
            name = f"node-{i + 1}"
            address = str(first + i)
            cert_file, key_file = self.workdir / f"{name}-kubelet.crt", self.workdir / f"{name}-kubelet.key"
            ca.issue_serving(name, [name, address, "localhost", "127.0.0.1"]).write(cert_file, key_file)
            pod_cidr = f"10.244.{i + 1}.0/24"
            pods = self._pods(i, name, pod_ca)
            web_ips.append(pods[0].ip)
            kubelet = KubeletSim(name, address, KUBELET_PORT, HEALTHZ_PORT, server_context(cert_file, key_file), pods)
            await kubelet.start()
            self.kubelets.append(kubelet)
            sim = SimNode(name, address, self.ssh_port, material, resolver=kubelet.resolve)
            await sim.start()
            self.sim_nodes.append(sim)
            node_tables.append(
                f'[[nodes]]\nname = "{name}"\naddress = "{address}"\nssh_port = {self.ssh_port}\n'
                f'kubelet_port = {KUBELET_PORT}\npod_cidr = "{pod_cidr}"\n'
            )
        pattern = ".".join(self.base_address.split(".")[:3]) + ".*"
        (self.workdir / "known_hosts").write_text(material.known_hosts_line(pattern))
        endpoints = ", ".join(f'"{ip}"' for ip in web_ips)
        config = (
            "# Written by `tunneld dev`: a gateway configured for the simulated nodes below.\n"
            "[ssh]\n"
            f'user = "tunneld"\nprivate_key = "gateway_ed25519"\nknown_hosts = "known_hosts"\n'
            "keepalive_interval = 5\nkeepalive_count_max = 3\nbackoff_initial = 0.5\nbackoff_max = 10\n\n"
            "[health]\nperiod = 2\ntimeout = 2\n\n"
            f'[status]\nsocket = "{self.workdir / "tunneld.sock"}"\n\n'
            '[kubelet]\ncertificate_authority = "kubelet-ca.crt"\n\n'
            f'[egress]\nsocket = "{self.egress_socket}"\ngrpc_socket = "{self.grpc_socket}"\n\n'
            '[auth]\ntoken_file = "tokens.csv"\n\n'
            f'[proxy]\nlisten = "127.0.0.1:{self.proxy_port}"\nsocket = "{self.proxy_socket}"\n{proxy_tls}'
            'target_certificate_authority = "pod-ca.crt"\n\n'
            '[[services]]\nnamespace = "default"\nname = "web"\n'
            f"endpoints = [{endpoints}]\n"
            'ports = [\n  {name = "http", port = 80, target_port = 8080},\n'
            '  {name = "https", port = 443, target_port = 8443},\n]\n\n'
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
            status, body = await http_get(gateway.unchecked_dialer.dial, node.address, HEALTHZ_PORT, "/healthz", 5.0)
            results[name] = body.decode().strip() if status == 200 else f"HTTP {status}"
        except ProbeFailed as exc:
            results[name] = f"failed: {exc}"
    return results


def examples(cluster: DevCluster) -> list[str]:
    """Commands to try against a running dev cluster (each goes through a node's SSH tunnel)."""
    base = cluster.proxy_url
    pod = cluster.kubelets[0].pods[0]
    node = cluster.kubelets[0].node
    auth = f'-H "Authorization: Bearer $(cat {cluster.token_path})"'
    kubectl = []
    if cluster.proxy_tls:  # kubectl sends a bearer token over https only
        auth = f"--cacert {cluster.proxy_ca} {auth}"
        k = f"kubectl --kubeconfig {cluster.kubeconfig}"
        kubectl = [f"{k} get --raw {path}" for path in (
            f"/api/v1/nodes/{node}/proxy/healthz", "/api/v1/namespaces/default/services/web:http/proxy/hello")]
        kubectl += [
            f"{k} get pods -A -o wide",
            f"{k} exec -n {pod.namespace} {pod.name} -- echo hello from {pod.name}",
            f"echo typed into stdin | {k} exec -i -n {pod.namespace} {pod.name} -- cat",
            # port-forward runs until stopped: this line forwards, fetches once through it, and stops it.
            f"({k} port-forward -n {pod.namespace} pod/{pod.name} 18080:8080 >/dev/null & sleep 2; "
            f"curl -s http://127.0.0.1:18080/hello; kill $!)",
        ]
    return [
        f"curl {auth} {base}/api/v1/nodes/{node}/proxy/healthz",
        f"curl {auth} -N '{base}/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/log?follow=true&tailLines=3'",
        f"curl {auth} {base}/api/v1/namespaces/{pod.namespace}/pods/{pod.name}/proxy/hello",
        f"curl {auth} {base}/api/v1/namespaces/default/services/web:http/proxy/hello",
        f"curl {auth} '{base}/api/v1/namespaces/default/services/https:web:443/proxy/big?bytes=1000000' | wc -c",
        *kubectl,
        # The unix socket knows its callers by uid: no token needed for the user who started the cluster.
        f"curl --unix-socket {cluster.proxy_socket} http://localhost/api/v1/nodes/{node}/proxy/healthz",
        # curl cannot talk to an HTTP proxy over a unix socket: send the CONNECT itself; its "body" is the request
        # that travels through the tunnel, and the pod's answer comes back as the CONNECT response's body.
        f"curl --unix-socket {cluster.egress_socket} -X CONNECT --request-target {pod.ip}:8080 "
        f"--data-binary $'GET /via-connect HTTP/1.0\\r\\n\\r\\n' http://localhost/",
    ]


class DevStartError(Exception):
    """The dev cluster could not start; the message is one line with a hint."""


def _bind_problem(exc: OSError) -> str:
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


async def run(
    nodes: int, ssh_port: int, base_address: str, workdir: Path | None, check: bool, proxy_port: int | None = None,
) -> int:
    """Run the dev cluster; with ``check``, exit after printing (0 when every node is up and answers ``ok``).

    ``proxy_port`` defaults to 8001, or to any free port with ``check`` (so a check never collides with a running
    dev cluster).
    """
    if proxy_port is None:
        proxy_port = 0 if check else DEFAULT_PROXY_PORT
    cluster = DevCluster(nodes=nodes, base_address=base_address, ssh_port=ssh_port, proxy_port=proxy_port,
                         proxy_tls=True)
    temporary = workdir is None
    if workdir is not None:
        cluster.workdir = workdir
    gateway: Gateway | None = None
    try:
        try:
            config_path = await cluster.start()
        except OSError as exc:
            hint = ("--base-address must be a loopback address such as 127.0.1.1"
                    if exc.errno == errno.EADDRNOTAVAIL else "choose others with --base-address or --ssh-port")
            raise DevStartError(f"cannot start the simulated nodes on {base_address} (ssh port {ssh_port}, kubelets "
                                f"{KUBELET_PORT}/{HEALTHZ_PORT}): {_bind_problem(exc)} ({hint})") from exc
        started = Gateway(load_config(config_path))
        try:
            await started.start()
        except OSError as exc:
            await started.stop(grace=0)
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
                raise DevStartError(f"cannot start the gateway: {exc} (try another --workdir)") from exc
            raise DevStartError(f"cannot serve the proxy URLs on 127.0.0.1:{cluster.proxy_port}: {_bind_problem(exc)} "
                                "(choose another port with --proxy-port, or --proxy-port 0 for any free one)") from exc
        gateway = started
        all_up = await wait_all_up(gateway, timeout=30 + nodes * 0.05)
        if all_up:
            await gateway.api_front.pods.refresh()  # the first listing may have run before the tunnels were up
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
        print()
        print(f"Try (proxy URLs with the bearer token in {cluster.token_path}, a service over verified pod TLS,")
        print("kubectl, the proxy front's unix socket, and HTTP CONNECT on the egress socket):")
        for command in examples(cluster):
            print(f"  {command}")
        print()
        print("Ctrl-C to stop.", flush=True)
        signals = Signals(gateway.reload)
        await signals.stop.wait()
        signals.close()
        return 0
    finally:
        if gateway is not None:
            await gateway.stop(grace=2.0)
        await cluster.stop()
        if temporary:
            shutil.rmtree(cluster.workdir, ignore_errors=True)

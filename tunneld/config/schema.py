"""The configuration's frozen schema: one dataclass per section, built once by :mod:`tunneld.config.load`.

Defaults here are the daemon's defaults; README's Configuration section lists them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from proxy.authz import Rule

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Node:
    """One node of the inventory: where its sshd is and what lives behind it."""

    name: str
    address: str
    ssh_port: int = 22
    kubelet_port: int = 10250
    pod_cidr: IPNetwork | None = None
    known_hosts: Path | None = None
    """Per-node known_hosts file replacing the global one."""
    host_key: Path | None = None
    """Per-node pinned host public key (OpenSSH format) replacing known_hosts."""
    mode: str = "dial-out"
    """``dial-out``: the gateway connects to the node's sshd; ``dial-in``: the node's OpenSSH client connects to the
    gateway's ``[dialin]`` listener with a reverse dynamic forward (``ssh -N -R``)."""


@dataclass(frozen=True)
class SSHSettings:
    """How the gateway connects to nodes' sshd."""

    user: str = "root"
    private_key: Path | None = None
    certificate: Path | None = None
    known_hosts: Path | None = None
    insecure_skip_host_key_check: bool = False
    connect_timeout: float = 10.0
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3
    max_concurrent_connects: int = 256
    """Connection attempts (TCP, key exchange, login) under way at once. Each node's sshd sees one at a time either
    way; this bounds the gateway's own load. An attempt mostly waits on round trips, so a restart with 5,000 nodes
    came back in 13 s at 256 and 21 s at 64 (Performance)."""
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    backoff_multiplier: float = 2.0
    backoff_jitter: float = 0.5
    max_reconnect_attempts: int = 0
    """Consecutive failed attempts after which a tunnel stays down until reload; 0 means retry forever."""
    lean_packet_path: bool = True
    """Seal and open AEAD packets in :mod:`tunneld.tunnels.leanpath` (asyncssh's own path when false, or when the
    installed asyncssh is not one it was written for)."""


@dataclass(frozen=True)
class HealthSettings:
    """The health probe sent through every tunnel: an HTTP GET of the kubelet's healthz on the node's loopback."""

    period: float = 10.0
    timeout: float = 5.0
    host: str = "127.0.0.1"
    """Host dialled through the tunnel; ``@node`` means the node's own address."""
    port: int = 10248
    path: str = "/healthz"
    failure_threshold: int = 1
    """Consecutive failed probes before a tunnel counts as degraded."""
    enabled: bool = True
    sync_max_age: float = 600.0
    """``/readyz`` and ``/healthz`` fail when no tunnel has been up for this long (0: never); see
    :mod:`tunneld.ops.readiness`."""


@dataclass(frozen=True)
class DialSettings:
    """How destinations are mapped to tunnels."""

    timeout: float = 10.0
    random_fallback: bool = True
    """Dial an address no node owns through a healthy tunnel chosen at random (as the historic tunneler did)."""


@dataclass(frozen=True)
class StatusSettings:
    """Where the local status API listens."""

    socket: Path | None = Path("/run/tunneld/tunneld.sock")
    listen: str | None = None
    """Optional ``host:port`` TCP listener (bind it to loopback)."""


@dataclass(frozen=True)
class TLSServerSettings:
    """A TLS listener's certificate, key and (for mutual TLS) the CA client certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class EgressSettings:
    """The egress fronts kube-apiserver uses: HTTP CONNECT (unix socket and/or mutual-TLS TCP) and Konnectivity's
    gRPC protocol (unix socket)."""

    socket: Path | None = None
    socket_mode: int = 0o600
    """File mode of both unix sockets (``socket`` and ``grpc_socket``)."""
    listen: str | None = None
    """``host:port`` for mutual-TLS TCP (``tls`` is then required, with a client CA)."""
    tls: TLSServerSettings | None = None
    grpc_socket: Path | None = None
    """Unix socket for ``proxyProtocol: GRPC`` (konnectivity-client's ``ProxyService.Proxy``)."""
    grpc_max_pending_dials: int = 256
    """gRPC dials waiting for their tunnel at once; more are refused with an error in DIAL_RSP."""


@dataclass(frozen=True)
class ProxySettings:
    """The front serving apiserver-style proxy URLs and kubelet subresources."""

    listen: str | None = None
    """``host:port`` TCP listener: callers authenticate with a bearer token or a client certificate."""
    tls: TLSServerSettings | None = None
    socket: Path | None = None
    """Unix socket listener: callers are known by their uid (see :mod:`proxy.authn`)."""
    socket_mode: int = 0o600
    socket_group: str | None = None
    """Group owning the socket; its members are in group ``tunneld:proxy``."""
    insecure_anonymous_loopback: bool = False
    """Callers on a loopback ``listen`` address with no credentials are ``system:anonymous`` (labs only)."""
    target_certificate_authority: Path | None = None
    """Verify ``https:`` pod and service targets against this CA (unverified when unset)."""
    pods_refresh: float = 30.0


@dataclass(frozen=True)
class KubeletSettings:
    """TLS towards kubelets, mirroring kube-apiserver's ``--kubelet-*`` flags."""

    certificate_authority: Path | None = None
    client_certificate: Path | None = None
    client_key: Path | None = None


@dataclass(frozen=True)
class PolicySettings:
    """Which ports the fronts may reach (see :mod:`proxy.policy`)."""

    node_ports: tuple[str, ...] = ()
    pod_ports: tuple[str, ...] = ("1-65535",)
    allow_pod_gateway: bool = False
    """Whether the first address of a node's pod CIDR (its bridge, the node itself) is a pod destination."""


@dataclass(frozen=True)
class LimitSettings:
    """Protections on every front listener, and per tunnel."""

    max_connections: int = 1024
    max_header_bytes: int = 16 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_channels_per_tunnel: int = 1000
    stream_idle_timeout: float = 14400.0
    """Seconds an upgraded stream or CONNECT tunnel may carry no byte before it is ended as broken."""
    stream_max_lifetime: float = 0.0
    """Seconds an upgraded stream or CONNECT tunnel may last at all; 0 is no limit."""


APPROVAL_POLICIES = ("queue", "always-reject", "insecure-always-approve", "auto-approve-group")


@dataclass(frozen=True)
class CASettings:
    """The cluster CA's files (``tunneld ca init`` writes them)."""

    cert: Path
    key: Path
    ssh_key: Path | None = None
    ssh_user_ca: Path | None = None
    """The SSH user CA's private key (``ssh_user_ca``): enables ``nodesshcertificates`` on the API."""
    ssh_node_validity: int = 24 * 3600
    """Seconds a node SSH certificate issued by the API is valid (``ssh_node_validity``; 60 s to 30 days)."""


@dataclass(frozen=True)
class APISettings:
    """The certificates API listener (HTTPS, client certificates optional)."""

    listen: str
    tls_cert: Path | None = None
    """With ``tls_key``: the server certificate; when both are unset the CA issues one at startup (in memory)."""
    tls_key: Path | None = None
    server_names: tuple[str, ...] = ()
    """Extra names/addresses for the certificate issued at startup (the listen host is always included)."""
    external_url: str | None = None
    """The URL nodes use, published in cluster-info; default ``https://<listen>``."""


@dataclass(frozen=True)
class AuthSettings:
    """Static callers (bearer tokens) of the certificates API and the proxy front."""

    token_file: Path | None = None


@dataclass(frozen=True)
class AuthzSettings:
    """``[[authz.rules]]``: what callers of the proxy front may do (see :mod:`proxy.authz`)."""

    rules: tuple[Rule, ...] | None = None
    """None: the default (``system:masters`` may do everything, nobody else anything)."""
    source: str = "the default rules (system:masters only)"
    """Names the table in refusals and audit lines."""


@dataclass(frozen=True)
class CSRSettings:
    """Approval policy and storage of certificate signing requests."""

    approval: str = "queue"
    approve_group: str = "system:bootstrappers"
    store: str = "sqlite"
    sqlite_path: Path = Path("/var/lib/tunneld/certs.db")
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = "/tunneld/certs"
    etcd_ca: Path | None = None
    """CA bundle that signs the etcd servers' certificates (https endpoints; default: the system's trust store)."""
    etcd_cert: Path | None = None
    """Client certificate for etcd's client-cert-auth (with ``etcd_key``)."""
    etcd_key: Path | None = None
    max_pending_per_requester: int = 10
    """Pending CSRs one requester (user name) may have at once; more get 429 (administrators are not limited)."""

    @property
    def etcd_https(self) -> bool:
        """Whether any etcd endpoint is https (the TLS options apply)."""
        return any(e.startswith("https://") for e in self.etcd_endpoints)


@dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""


@dataclass(frozen=True)
class ServiceSettings:
    """A service the proxy URLs can reach: its cluster IP and/or endpoints."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    cluster_ip: str | None = None
    endpoints: tuple[str, ...] = ()


@dataclass(frozen=True)
class KubernetesInventorySettings:
    """``[inventory] source = "kubernetes"``: list and watch Node objects (see :mod:`tunneld.tunnels.k8s_watch`)."""

    kubeconfig: Path | None = None
    """Kubeconfig file; None means the pod's service account (in-cluster)."""
    label_selector: str | None = None
    ssh_port: int = 22
    """sshd port on every node found through the API (nodes carry no such field)."""


NODE_MODES = ("dial-out", "dial-in")


@dataclass(frozen=True)
class DialinSettings:
    """``[dialin]``: the SSH listener dial-in nodes connect to (see :mod:`tunneld.tunnels.dialin_ssh`)."""

    listen: str
    host_key: Path
    """The gateway's SSH host key; ``host_certificate`` is its certificate from the cluster's SSH (host) CA."""
    host_certificate: Path
    user_ca: Path
    """The public key of the SSH *user* CA that signs nodes' certificates (``ssh_user_ca.pub``)."""
    revoked_keys: Path | None = None
    """An OpenSSH KRL (``ssh-keygen -k``); re-read on SIGHUP."""
    max_connections: int = 10_000
    max_concurrent_handshakes: int = 64
    login_grace: float = 10.0
    replace_grace: float = 30.0
    """How long the streams of a replaced connection may still run before they are ended as broken."""
    socks_timeout: float = 10.0
    """SOCKS5 CONNECT answer timeout on a forwarded channel (the dial timeout applies too)."""
    keepalive_interval: float = 15.0
    keepalive_count_max: int = 3


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path | None = None
    ssh: SSHSettings = field(default_factory=SSHSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    dial: DialSettings = field(default_factory=DialSettings)
    status: StatusSettings = field(default_factory=StatusSettings)
    egress: EgressSettings = field(default_factory=EgressSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    kubelet: KubeletSettings = field(default_factory=KubeletSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    inventory_file: Path | None = None
    inventory_source: str = "file"
    """``file``: only ``[[nodes]]``; ``kubernetes``: Node objects of an API server, plus ``[[nodes]]``."""
    kubernetes: KubernetesInventorySettings | None = None
    nodes: tuple[Node, ...] = ()
    services: tuple[ServiceSettings, ...] = ()
    log_level: str = "info"
    log_format: str = "logfmt"
    gc_full_collection_interval: float = 300.0
    """``[gc] full_collection_interval``: seconds between scheduled full garbage collections once started (automatic
    ones off, start-up objects frozen: :mod:`tunneld.ops.collector`); 0 leaves CPython's collector as it is."""
    ca: CASettings | None = None
    api: APISettings | None = None
    auth: AuthSettings = field(default_factory=AuthSettings)
    authz: AuthzSettings = field(default_factory=AuthzSettings)
    csr: CSRSettings = field(default_factory=CSRSettings)
    dialin: DialinSettings | None = None

"""Configuration: one TOML file, read once into a frozen, validated :class:`Config`.

Every mistake is collected (not just the first) and reported as ``FILE: KEY: message`` so an operator can fix the
whole file in one pass. Relative paths are resolved against the directory of the file that names them.
Nodes come from ``[[nodes]]`` tables in the config file and/or in the inventory file named by
``[inventory] file``; see :mod:`tunneld.inventory`. With ``[inventory] source = "kubernetes"`` more nodes come from
an API server at run time (:mod:`tunneld.k8s_inventory`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunneld.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


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
    max_concurrent_connects: int = 64
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    backoff_multiplier: float = 2.0
    backoff_jitter: float = 0.5
    max_reconnect_attempts: int = 0
    """Consecutive failed attempts after which a tunnel stays down until reload; 0 means retry forever."""


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
    """``/readyz`` and ``/healthz`` fail when no tunnel has been up for this long (0: never); see tunneld.health."""


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
    """The HTTP CONNECT front kube-apiserver uses as its egress proxy."""

    socket: Path | None = None
    socket_mode: int = 0o600
    listen: str | None = None
    """``host:port`` for mutual-TLS TCP (``tls`` is then required, with a client CA)."""
    tls: TLSServerSettings | None = None


@dataclass(frozen=True)
class ProxySettings:
    """The front serving apiserver-style proxy URLs and kubelet subresources."""

    listen: str | None = None
    tls: TLSServerSettings | None = None
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


@dataclass(frozen=True)
class LimitSettings:
    """Protections on every front listener, and per tunnel."""

    max_connections: int = 1024
    max_header_bytes: int = 16 * 1024
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_channels_per_tunnel: int = 1000


APPROVAL_POLICIES = ("queue", "always-reject", "insecure-always-approve", "auto-approve-group")


@dataclass(frozen=True)
class CASettings:
    """The cluster CA's files (``tunneld ca init`` writes them)."""

    cert: Path
    key: Path
    ssh_key: Path | None = None


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
    """Static callers of the certificates API."""

    token_file: Path | None = None


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
class Service:
    """A service the proxy URLs can reach: its cluster IP and/or endpoints."""

    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    cluster_ip: str | None = None
    endpoints: tuple[str, ...] = ()


@dataclass(frozen=True)
class KubernetesInventorySettings:
    """``[inventory] source = "kubernetes"``: list and watch Node objects (see :mod:`tunneld.k8s_inventory`)."""

    kubeconfig: Path | None = None
    """Kubeconfig file; None means the pod's service account (in-cluster)."""
    label_selector: str | None = None
    ssh_port: int = 22
    """sshd port on every node found through the API (nodes carry no such field)."""


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
    services: tuple[Service, ...] = ()
    log_level: str = "info"
    log_format: str = "logfmt"
    ca: CASettings | None = None
    api: APISettings | None = None
    auth: AuthSettings = field(default_factory=AuthSettings)
    csr: CSRSettings = field(default_factory=CSRSettings)


class _Section:
    """Reads typed keys out of one TOML table, recording problems instead of raising."""

    def __init__(self, data: dict[str, Any], where: str, base: Path, problems: list[str]) -> None:
        self.data = data
        self.where = where
        self.base = base
        self.problems = problems
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self._key(key)}: {message}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            self.problem(key, f"expected {_kind_name(kinds)}, got a boolean")
            return default
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            self.problem(key, f"expected {_kind_name(kinds)}, got {type(value).__name__} {value!r}")
            return default
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0, positive: bool = True) -> float:
        value = self.get(key, float, default)
        if positive and value <= minimum:
            self.problem(key, f"must be greater than {minimum:g}")
            return default
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int = 2**31) -> int:
        value = self.get(key, int, default)
        if not minimum <= value <= maximum:
            self.problem(key, f"must be between {minimum} and {maximum}")
            return default
        return int(value)

    def port(self, key: str, default: int) -> int:
        return self.integer(key, default, minimum=1, maximum=65535)

    def path(self, key: str, default: Path | None) -> Path | None:
        value = self.get(key, str, None)
        if value is None:
            return default
        if value == "":
            return None
        return (self.base / Path(value).expanduser()).resolve()

    def unknown(self) -> None:
        for key in self.data:
            if key not in self.seen:
                self.problem(key, "unknown key")


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
             dict: "a table"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: file not found"]) from exc
    except PermissionError as exc:
        raise ConfigError([f"{path}: permission denied"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from exc


def parse_nodes(raw: Any, base: Path, problems: list[str], where: str = "nodes") -> list[Node]:
    """Parse a ``[[nodes]]`` array of tables."""
    if not isinstance(raw, list):
        problems.append(f"{where}: expected an array of tables ([[nodes]])")
        return []
    nodes: list[Node] = []
    for i, entry in enumerate(raw):
        label = f"{where}[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{label}: expected a table")
            continue
        sec = _Section(entry, label, base, problems)
        name = sec.get("name", str, "")
        if name:
            label = f"{where}[{i}] ({name})"
            sec.where = label
        if not name:
            sec.problem("name", "required")
        elif not _NAME_RE.match(name):
            sec.problem("name", f"{name!r} is not a valid node name (lower-case letters, digits, '-' and '.')")
        address = sec.get("address", str, "")
        if not address:
            sec.problem("address", "required")
        elif not _valid_host(address):
            sec.problem("address", f"{address!r} is neither an IP address nor a host name")
        pod_cidr: IPNetwork | None = None
        cidr = sec.get("pod_cidr", str, None)
        if cidr is not None:
            try:
                pod_cidr = ipaddress.ip_network(cidr, strict=True)
            except ValueError as exc:
                sec.problem("pod_cidr", f"{cidr!r}: {exc}")
        node = Node(
            name=name,
            address=_normalize_host(address) if address else address,
            ssh_port=sec.port("ssh_port", 22),
            kubelet_port=sec.port("kubelet_port", 10250),
            pod_cidr=pod_cidr,
            known_hosts=sec.path("known_hosts", None),
            host_key=sec.path("host_key", None),
        )
        sec.unknown()
        nodes.append(node)
    seen_names: dict[str, int] = {}
    seen_addrs: dict[str, str] = {}
    for node in nodes:
        if not node.name or not node.address:
            continue
        if node.name in seen_names:
            problems.append(f"{where}: node name {node.name!r} appears more than once")
        seen_names[node.name] = 1
        if node.address in seen_addrs:
            problems.append(
                f"{where}: address {node.address} is used by both {seen_addrs[node.address]!r} and {node.name!r}"
            )
        seen_addrs[node.address] = node.name
    return nodes


def _valid_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
        return True
    except ValueError:
        # "10.0.0.256" is a mistyped address, not a host name (a top-level domain is never all digits).
        return bool(_HOST_RE.match(value)) and not value.rsplit(".", 1)[-1].isdigit()


def _normalize_host(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return value.lower()


def load_config(path: str | Path) -> Config:
    """Read and validate the config file (and the inventory file it names). Raises :class:`ConfigError`."""
    path = Path(path).resolve()
    data = _read_toml(path)
    problems: list[str] = []
    base = path.parent
    top = _Section(data, "", base, problems)

    def table(name: str) -> _Section:
        raw = top.get(name, dict, {})
        return _Section(raw, name, base, problems)

    s = table("ssh")
    ssh = SSHSettings(
        user=s.get("user", str, "root"),
        private_key=s.path("private_key", None),
        certificate=s.path("certificate", None),
        known_hosts=s.path("known_hosts", None),
        insecure_skip_host_key_check=s.get("insecure_skip_host_key_check", bool, False),
        connect_timeout=s.number("connect_timeout", 10.0),
        keepalive_interval=s.number("keepalive_interval", 15.0),
        keepalive_count_max=s.integer("keepalive_count_max", 3, minimum=1, maximum=100),
        max_concurrent_connects=s.integer("max_concurrent_connects", 64, minimum=1, maximum=100_000),
        backoff_initial=s.number("backoff_initial", 1.0),
        backoff_max=s.number("backoff_max", 60.0),
        backoff_multiplier=s.number("backoff_multiplier", 2.0, minimum=1.0),
        backoff_jitter=s.get("backoff_jitter", float, 0.5),
        max_reconnect_attempts=s.integer("max_reconnect_attempts", 0, minimum=0),
    )
    s.unknown()
    if ssh.private_key is None:
        problems.append("ssh.private_key: required (the key the gateway logs in to nodes with)")
    if ssh.known_hosts is None and not ssh.insecure_skip_host_key_check:
        problems.append(
            "ssh.known_hosts: required (a known_hosts file, typically one '@cert-authority' line for the cluster's "
            "SSH CA); host-key checking can only be skipped with insecure_skip_host_key_check = true"
        )
    if not 0.0 <= ssh.backoff_jitter <= 1.0:
        problems.append("ssh.backoff_jitter: must be between 0 and 1")
    if ssh.backoff_max < ssh.backoff_initial:
        problems.append("ssh.backoff_max: must not be less than ssh.backoff_initial")

    h = table("health")
    health = HealthSettings(
        period=h.number("period", 10.0),
        timeout=h.number("timeout", 5.0),
        host=h.get("host", str, "127.0.0.1"),
        port=h.port("port", 10248),
        path=h.get("path", str, "/healthz"),
        failure_threshold=h.integer("failure_threshold", 1, minimum=1, maximum=1000),
        enabled=h.get("enabled", bool, True),
        sync_max_age=h.number("sync_max_age", 600.0, positive=False),
    )
    h.unknown()
    if not health.path.startswith("/") or any(c in health.path for c in "\r\n "):
        problems.append("health.path: must be an absolute path without spaces")
    if health.sync_max_age < 0:
        problems.append("health.sync_max_age: must be 0 (off) or more seconds")

    d = table("dial")
    dial = DialSettings(timeout=d.number("timeout", 10.0), random_fallback=d.get("random_fallback", bool, True))
    d.unknown()

    st = table("status")
    status = StatusSettings(
        socket=st.path("socket", Path("/run/tunneld/tunneld.sock")), listen=st.get("listen", str, None)
    )
    st.unknown()
    if status.listen is not None:
        try:
            split_host_port(status.listen)
        except ValueError as exc:
            problems.append(f"status.listen: {exc}")

    egress, proxy_settings = _listeners(table("egress"), table("proxy"), problems)

    k = table("kubelet")
    kubelet = KubeletSettings(
        certificate_authority=k.path("certificate_authority", None),
        client_certificate=k.path("client_certificate", None),
        client_key=k.path("client_key", None),
    )
    k.unknown()
    if (kubelet.client_certificate is None) != (kubelet.client_key is None):
        problems.append("kubelet: client_certificate and client_key go together")

    po = table("policy")
    policy = PolicySettings(
        node_ports=_ports(po, "node_ports", ()), pod_ports=_ports(po, "pod_ports", ("1-65535",))
    )
    po.unknown()

    li = table("limits")
    limits = LimitSettings(
        max_connections=li.integer("max_connections", 1024, minimum=1, maximum=1_000_000),
        max_header_bytes=li.integer("max_header_bytes", 16 * 1024, minimum=1024, maximum=1024 * 1024),
        header_timeout=li.number("header_timeout", 10.0),
        idle_timeout=li.number("idle_timeout", 60.0),
        max_channels_per_tunnel=li.integer("max_channels_per_tunnel", 1000, minimum=1, maximum=1_000_000),
    )
    li.unknown()

    ca, api, auth, csr = _certs(table("ca"), table("api"), table("auth"), table("csr"), problems)

    services = _services(top.get("services", list, []), base, problems)

    lg = table("log")
    log_level = lg.get("level", str, "info").lower()
    log_format = lg.get("format", str, "logfmt").lower()
    lg.unknown()
    if log_level not in ("debug", "info", "warning", "error"):
        problems.append("log.level: must be one of debug, info, warning, error")
    if log_format not in ("logfmt", "json"):
        problems.append("log.format: must be logfmt or json")

    inv = table("inventory")
    inventory_file = inv.path("file", None)
    inventory_source, kubernetes = _inventory_source(inv)
    inv.unknown()

    nodes = parse_nodes(top.get("nodes", list, []), base, problems) if "nodes" in data else []
    top.unknown()
    found = [f"{path}: {p}" for p in problems]
    if inventory_file is not None:
        try:
            nodes += load_inventory_nodes(inventory_file)
        except ConfigError as exc:
            found.extend(exc.problems)
        else:
            names = [n.name for n in nodes]
            for dup in sorted({n for n in names if names.count(n) > 1}):
                found.append(f"{inventory_file}: node {dup!r} is also defined in {path}")
    if found:
        raise ConfigError(found)
    return Config(
        path=path, ssh=ssh, health=health, dial=dial, status=status, egress=egress, proxy=proxy_settings,
        kubelet=kubelet, policy=policy, limits=limits, inventory_file=inventory_file,
        inventory_source=inventory_source, kubernetes=kubernetes, nodes=tuple(nodes),
        services=tuple(services), log_level=log_level, log_format=log_format, ca=ca, api=api, auth=auth, csr=csr,
    )


_IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def in_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod with a service account (the in-cluster credentials)."""
    return "KUBERNETES_SERVICE_HOST" in os.environ and _IN_CLUSTER_TOKEN.is_file()


def _inventory_source(inv: _Section) -> tuple[str, KubernetesInventorySettings | None]:
    source = inv.get("source", str, "file")
    kubeconfig = inv.path("kubeconfig", None)
    selector = inv.get("label_selector", str, None)
    ssh_port = inv.port("ssh_port", 22)
    if source not in ("file", "kubernetes"):
        inv.problem("source", f"{source!r}: must be \"file\" or \"kubernetes\"")
        return "file", None
    if source == "file":
        for key in ("kubeconfig", "label_selector", "ssh_port"):
            if key in inv.data:
                inv.problem(key, 'only applies with source = "kubernetes"')
        return source, None
    if kubeconfig is None and not in_cluster():
        inv.problem("kubeconfig", "required: not running in a pod, so there is no service account to use")
    elif kubeconfig is not None and not kubeconfig.is_file():
        inv.problem("kubeconfig", f"{kubeconfig}: file not found")
    if selector is not None and (not selector.strip() or len(selector) > 1024 or not selector.isprintable()):
        inv.problem("label_selector", "must be a non-empty label selector such as \"node-role/worker=true\"")
        selector = None
    return source, KubernetesInventorySettings(kubeconfig=kubeconfig, label_selector=selector, ssh_port=ssh_port)


def check_files(config: Config) -> list[str]:
    """Problems with the files ``config`` names (missing, a directory, unreadable), as ``FILE: KEY: path: why``.

    Kept apart from :func:`load_config` so a config can be built in tests without the files; ``check-config``,
    ``serve`` and reload use :func:`load_checked`.
    """
    named: list[tuple[str, Path | None]] = [
        ("ssh.private_key", config.ssh.private_key),
        ("ssh.certificate", config.ssh.certificate),
        ("ssh.known_hosts", None if config.ssh.insecure_skip_host_key_check else config.ssh.known_hosts),
        ("kubelet.certificate_authority", config.kubelet.certificate_authority),
        ("kubelet.client_certificate", config.kubelet.client_certificate),
        ("kubelet.client_key", config.kubelet.client_key),
        ("proxy.target_certificate_authority", config.proxy.target_certificate_authority),
    ]
    for section, tls in (("egress", config.egress.tls), ("proxy", config.proxy.tls)):
        if tls is not None:
            named += [(f"{section}.tls_cert", tls.cert), (f"{section}.tls_key", tls.key),
                      (f"{section}.client_ca", tls.client_ca)]
    if config.api is not None and config.ca is not None:  # the CA files are only needed to serve the API
        named += [("ca.cert", config.ca.cert), ("ca.key", config.ca.key), ("auth.token_file", config.auth.token_file),
                  ("api.tls_cert", config.api.tls_cert), ("api.tls_key", config.api.tls_key)]
    if config.csr.store == "etcd":
        named += [("csr.etcd_ca", config.csr.etcd_ca), ("csr.etcd_cert", config.csr.etcd_cert),
                  ("csr.etcd_key", config.csr.etcd_key)]
    for node in config.nodes:
        named += [(f"nodes ({node.name}).known_hosts", node.known_hosts),
                  (f"nodes ({node.name}).host_key", node.host_key)]
    problems = []
    for key, path in named:
        if path is None:
            continue
        why = _unusable(path)
        if why:
            problems.append(f"{config.path}: {key}: {path}: {why}")
    return problems


def _unusable(path: Path) -> str | None:
    try:
        if path.is_dir():
            return "is a directory, not a file"
        if not path.exists():
            return "file not found"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(path, os.R_OK):
        return "not readable by this user"
    return None


def load_checked(path: str | Path) -> Config:
    """:func:`load_config` plus :func:`check_files`: what ``check-config``, ``serve`` and reload accept."""
    config = load_config(path)
    problems = check_files(config)
    if problems:
        raise ConfigError(problems)
    return config


def load_inventory_nodes(path: Path) -> list[Node]:
    """Read an inventory file: a TOML file of ``[[nodes]]`` tables."""
    data = _read_toml(path)
    problems: list[str] = []
    nodes = parse_nodes(data.get("nodes", []), path.parent, problems)
    for key in data:
        if key != "nodes":
            problems.append(f"{key}: unknown key (an inventory file holds only [[nodes]])")
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return nodes


def split_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raises ValueError with a readable message."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _tls(sec: _Section, problems: list[str], require_client_ca: bool) -> TLSServerSettings | None:
    cert, key, ca = sec.path("tls_cert", None), sec.path("tls_key", None), sec.path("client_ca", None)
    if cert is None and key is None:
        if ca is not None:
            sec.problem("client_ca", "needs tls_cert and tls_key")
        return None
    if cert is None or key is None:
        sec.problem("tls_cert" if cert is None else "tls_key", "tls_cert and tls_key go together")
        return None
    if require_client_ca and ca is None:
        sec.problem("client_ca", "required: callers must present a client certificate signed by this CA")
    return TLSServerSettings(cert, key, ca)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listeners(e: _Section, p: _Section, problems: list[str]) -> tuple[EgressSettings, ProxySettings]:
    mode_text = e.get("socket_mode", str, "0600")
    try:
        mode = int(mode_text, 8)
        if mode & ~0o777:
            raise ValueError
    except ValueError:
        e.problem("socket_mode", f"{mode_text!r} is not an octal file mode such as \"0600\" or \"0660\"")
        mode = 0o600
    if mode & 0o007:
        e.problem("socket_mode", "must not give access to others (use a group: 0660)")
    egress = EgressSettings(
        socket=e.path("socket", None), socket_mode=mode, listen=e.get("listen", str, None),
        tls=_tls(e, problems, require_client_ca=True),
    )
    if egress.listen is not None:
        try:
            split_host_port(egress.listen)
        except ValueError as exc:
            e.problem("listen", str(exc))
        if egress.tls is None:
            e.problem("listen", "needs tls_cert, tls_key and client_ca (the TCP egress front is mutual TLS only)")
    e.unknown()
    proxy = ProxySettings(
        listen=p.get("listen", str, None),
        tls=_tls(p, problems, require_client_ca=False),
        target_certificate_authority=p.path("target_certificate_authority", None),
        pods_refresh=p.number("pods_refresh", 30.0),
    )
    if proxy.listen is not None:
        try:
            host, _ = split_host_port(proxy.listen)
        except ValueError as exc:
            p.problem("listen", str(exc))
        else:
            if not is_loopback(host) and (proxy.tls is None or proxy.tls.client_ca is None):
                p.problem("listen", f"{host} is not loopback: serving it needs tls_cert, tls_key and client_ca")
    p.unknown()
    return egress, proxy


def _certs(c: _Section, a: _Section, au: _Section, cs: _Section, problems: list[str]
           ) -> tuple[CASettings | None, APISettings | None, AuthSettings, CSRSettings]:
    """The ``[ca]``, ``[api]``, ``[auth]`` and ``[csr]`` sections (the certificates part of the daemon)."""
    cert, key, ssh_key = c.path("cert", None), c.path("key", None), c.path("ssh_key", None)
    c.unknown()
    ca = CASettings(cert, key, ssh_key) if cert is not None and key is not None else None
    if (cert is None) != (key is None):
        c.problem("cert" if cert is None else "key", "cert and key go together")
    api: APISettings | None = None
    listen = a.get("listen", str, None)
    tls_cert, tls_key = a.path("tls_cert", None), a.path("tls_key", None)
    names = a.get("server_names", list, [])
    external = a.get("external_url", str, None)
    a.unknown()
    if listen is not None:
        try:
            split_host_port(listen)
        except ValueError as exc:
            a.problem("listen", str(exc))
        if (tls_cert is None) != (tls_key is None):
            a.problem("tls_cert" if tls_cert is None else "tls_key", "tls_cert and tls_key go together")
        if ca is None:
            a.problem("listen", "the certificates API needs the cluster CA: set [ca] cert and key")
        if not all(isinstance(n, str) and n for n in names):
            a.problem("server_names", "expected a list of host names or addresses")
        if external is not None and not external.startswith("https://"):
            a.problem("external_url", f"{external!r} must start with https://")
        api = APISettings(listen, tls_cert, tls_key, tuple(str(n) for n in names), external)
    elif a.data:
        a.problem("listen", "required when [api] is present")
    auth = AuthSettings(token_file=au.path("token_file", None))
    au.unknown()
    default = CSRSettings()
    csr = CSRSettings(
        approval=cs.get("approval", str, default.approval),
        approve_group=cs.get("approve_group", str, default.approve_group),
        store=cs.get("store", str, default.store),
        sqlite_path=cs.path("sqlite_path", default.sqlite_path) or default.sqlite_path,
        etcd_endpoints=tuple(str(e) for e in cs.get("etcd_endpoints", list, [])),
        etcd_prefix=cs.get("etcd_prefix", str, default.etcd_prefix),
        etcd_ca=cs.path("etcd_ca", None),
        etcd_cert=cs.path("etcd_cert", None),
        etcd_key=cs.path("etcd_key", None),
    )
    cs.unknown()
    if csr.approval not in APPROVAL_POLICIES:
        cs.problem("approval", f"{csr.approval!r} is not one of {', '.join(APPROVAL_POLICIES)}")
    if csr.store not in ("sqlite", "etcd"):
        cs.problem("store", f"{csr.store!r} is not sqlite or etcd")
    if csr.store == "etcd" and not csr.etcd_endpoints:
        cs.problem("etcd_endpoints", "required with store = \"etcd\" (e.g. [\"http://127.0.0.1:2379\"])")
    for endpoint in csr.etcd_endpoints:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            cs.problem("etcd_endpoints", f"{endpoint!r} must be an http:// or https:// URL")
        elif url.scheme == "http" and not is_loopback(url.hostname):
            # The store holds bootstrap tokens and the audit trail: never in clear text over a network.
            cs.problem("etcd_endpoints", f"{endpoint!r} is plain http to another host: use https:// (with etcd_ca, "
                                         "and etcd_cert/etcd_key if etcd checks client certificates)")
    if (csr.etcd_cert is None) != (csr.etcd_key is None):
        cs.problem("etcd_cert" if csr.etcd_cert is None else "etcd_key", "etcd_cert and etcd_key go together")
    tls_options = [k for k in ("etcd_ca", "etcd_cert", "etcd_key") if getattr(csr, k) is not None]
    if tls_options and not csr.etcd_https:
        cs.problem(tls_options[0], "only used with https:// etcd_endpoints")
    if not csr.etcd_prefix.startswith("/"):
        cs.problem("etcd_prefix", "must start with /")
    return ca, api, auth, csr


def _ports(sec: _Section, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = sec.get(key, list, None)
    if raw is None:
        return default
    out = []
    for item in raw:
        text = str(item)
        lo, sep, hi = text.partition("-")
        if isinstance(item, bool) or not lo.isdigit() or (sep and not hi.isdigit()) or not (
            1 <= int(lo) <= (int(hi) if sep else int(lo)) <= 65535
        ):
            sec.problem(key, f"{item!r} is not a port (1-65535) or a range such as \"30000-32767\"")
            continue
        out.append(text)
    return tuple(out)


def _services(raw: list[Any], base: Path, problems: list[str]) -> list[Service]:
    services: list[Service] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(raw):
        label = f"services[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{label}: expected a table")
            continue
        sec = _Section(entry, label, base, problems)
        name, ns = sec.get("name", str, ""), sec.get("namespace", str, "default")
        if name:
            sec.where = label = f"{label} ({ns}/{name})"
        for key, value in (("name", name), ("namespace", ns)):
            if not value or not _NAME_RE.match(value):
                sec.problem(key, "required: a lower-case DNS label")
        cluster_ip = sec.get("cluster_ip", str, None)
        endpoints = sec.get("endpoints", list, [])
        for addr in [cluster_ip, *endpoints] if cluster_ip else endpoints:
            try:
                ipaddress.ip_address(addr)
            except (ValueError, TypeError):
                sec.problem("endpoints" if addr != cluster_ip else "cluster_ip", f"{addr!r} is not an IP address")
        if not cluster_ip and not endpoints:
            sec.problem("endpoints", "a service needs a cluster_ip or endpoints")
        ports: list[ServicePort] = []
        for j, port in enumerate(sec.get("ports", list, [])):
            ps = _Section(port if isinstance(port, dict) else {}, f"{label}.ports[{j}]", base, problems)
            number = ps.port("port", 1) if "port" in ps.data else 0
            if not number:
                ps.problem("port", "required")
            target = ps.port("target_port", number or 1)
            ports.append(ServicePort(number, target, ps.get("name", str, "")))
            ps.unknown()
        if not ports:
            sec.problem("ports", "at least one port is required")
        sec.unknown()
        if (ns, name) in seen:
            problems.append(f"{label}: defined more than once")
        seen.add((ns, name))
        cip = str(ipaddress.ip_address(cluster_ip)) if cluster_ip and _valid_ip(cluster_ip) else None
        eps = tuple(str(ipaddress.ip_address(a)) for a in endpoints if _valid_ip(a))
        services.append(Service(ns, name, tuple(ports), cip, eps))
    return services


def _valid_ip(value: object) -> bool:
    try:
        ipaddress.ip_address(value)  # type: ignore[arg-type]
        return True
    except ValueError:
        return False

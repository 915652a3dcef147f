"""Configuration: one TOML file, read once into a frozen, validated :class:`Config`.

Every mistake is collected (not just the first) and reported as ``FILE: KEY: message`` so an operator can fix the
whole file in one pass. Relative paths are resolved against the directory of the file that names them.
Nodes come from ``[[nodes]]`` tables in the config file and/or in the inventory file named by
``[inventory] file``; see :mod:`tunneld.inventory`.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
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
class Config:
    """The whole validated configuration."""

    path: Path | None = None
    ssh: SSHSettings = field(default_factory=SSHSettings)
    health: HealthSettings = field(default_factory=HealthSettings)
    dial: DialSettings = field(default_factory=DialSettings)
    status: StatusSettings = field(default_factory=StatusSettings)
    inventory_file: Path | None = None
    nodes: tuple[Node, ...] = ()
    log_level: str = "info"
    log_format: str = "logfmt"


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
        return bool(_HOST_RE.match(value))


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
    )
    h.unknown()
    if not health.path.startswith("/") or any(c in health.path for c in "\r\n "):
        problems.append("health.path: must be an absolute path without spaces")

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
        path=path, ssh=ssh, health=health, dial=dial, status=status, inventory_file=inventory_file,
        nodes=tuple(nodes), log_level=log_level, log_format=log_format,
    )


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
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)

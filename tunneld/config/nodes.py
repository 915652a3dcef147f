"""The node inventory as configured: ``[[nodes]]`` tables in the config file or in the inventory file."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from tunneld.config.reader import Section, read_toml
from tunneld.config.schema import IPNetwork, Node
from tunneld.errors import ConfigError

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


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
        sec = Section(entry, label, base, problems)
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


def load_inventory_nodes(path: Path) -> list[Node]:
    """Read an inventory file: a TOML file of ``[[nodes]]`` tables."""
    data = read_toml(path)
    problems: list[str] = []
    nodes = parse_nodes(data.get("nodes", []), path.parent, problems)
    for key in data:
        if key != "nodes":
            problems.append(f"{key}: unknown key (an inventory file holds only [[nodes]])")
    if problems:
        raise ConfigError([f"{path}: {p}" for p in problems])
    return nodes

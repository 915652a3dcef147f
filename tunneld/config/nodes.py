"""The node inventory as configured: ``[[nodes]]`` tables in the config file or in the inventory file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netnames import is_dns_subdomain, parse_host, parse_network
from tunneld.config.reader import Section, read_toml
from tunneld.config.schema import IPNetwork, Node
from tunneld.errors import ConfigError


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
        elif not is_dns_subdomain(name):
            sec.problem("name", f"{name!r} is not a valid node name (lower-case letters, digits, '-' and '.')")
        address = sec.get("address", str, "")
        if not address:
            sec.problem("address", "required")
        else:
            try:
                address = parse_host(address)
            except ValueError as exc:
                sec.problem("address", str(exc))
        pod_cidr: IPNetwork | None = None
        cidr = sec.get("pod_cidr", str, None)
        if cidr is not None:
            try:
                pod_cidr = parse_network(cidr)
            except ValueError as exc:
                sec.problem("pod_cidr", str(exc))
        node = Node(
            name=name,
            address=address,
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

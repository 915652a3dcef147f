"""The node inventory as configured: ``[[nodes]]`` tables in the config file or in the inventory file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netnames import is_dns_subdomain, parse_host, parse_network
from tunneld.config.reader import Section, read_toml
from tunneld.config.schema import NODE_MODES, IPNetwork, Node
from tunneld.errors import ConfigError


def parse_nodes(raw: Any, base: Path, problems: list[str], where: str = "nodes") -> list[Node]:
    """Parse a ``[[nodes]]`` array of tables."""
    if not isinstance(raw, list):
        problems.append(f"{where}: expected an array of tables ([[nodes]])")
        return []
    nodes: list[Node] = []
    node_labels: list[str] = []
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
        mode = sec.get("mode", str, "dial-out")
        if mode not in NODE_MODES:
            sec.problem("mode", f"{mode!r} is not one of {', '.join(NODE_MODES)}")
        node = Node(
            name=name,
            address=address,
            ssh_port=sec.port("ssh_port", 22),
            kubelet_port=sec.port("kubelet_port", 10250),
            pod_cidr=pod_cidr,
            known_hosts=sec.path("known_hosts", None),
            host_key=sec.path("host_key", None),
            mode=mode,
        )
        sec.unknown()
        nodes.append(node)
        node_labels.append(label)
    seen_names: dict[str, str] = {}
    seen_addrs: dict[str, str] = {}
    for node, label in zip(nodes, node_labels, strict=True):
        if not node.name or not node.address:
            continue
        if node.name in seen_names:
            problems.append(f"{label}.name: {node.name!r} is already the name of {seen_names[node.name]}")
        else:
            seen_names[node.name] = label
        if node.address in seen_addrs:
            problems.append(f"{label}.address: {node.address} is already the address of {seen_addrs[node.address]}")
        else:
            seen_addrs[node.address] = label
    return nodes


def overlapping_pod_cidrs(nodes: list[Node]) -> list[str]:
    """One message per node whose ``pod_cidr`` overlaps (or equals) an earlier node's: a pod address must have one
    owner. Sorted by network, so 5,000 nodes take one pass."""
    with_cidr = sorted(((n.pod_cidr, n) for n in nodes if n.pod_cidr is not None),
                       key=lambda p: (p[0].version, int(p[0].network_address), -p[0].prefixlen))
    problems = []
    widest: tuple[IPNetwork, Node] | None = None  # the network reaching furthest so far (same family), and its node
    for net, node in with_cidr:
        if widest is not None:
            prev, owner = widest
            if prev.version == net.version and int(net.network_address) <= int(prev.broadcast_address):
                how = "is the same as" if prev == net else "overlaps"
                problems.append(f"node {node.name!r}: pod_cidr {net} {how} node {owner.name!r}'s {prev}")
                if int(net.broadcast_address) <= int(prev.broadcast_address):
                    continue
        widest = (net, node)
    return problems


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

"""Inventory diff and address ownership."""

import ipaddress
from pathlib import Path

from tunneld.config import Node
from tunneld.tunnels.inventory import OwnerIndex, diff


def node(name: str, address: str, **kw: object) -> Node:
    return Node(name=name, address=address, **kw)  # type: ignore[arg-type]


def test_diff_added_removed_changed_unchanged() -> None:
    old = {n.name: n for n in [node("a", "10.0.0.1"), node("b", "10.0.0.2"), node("c", "10.0.0.3")]}
    new = [node("a", "10.0.0.1"), node("b", "10.0.0.22"), node("d", "10.0.0.4")]
    d = diff(old, new)
    assert [n.name for n in d.added] == ["d"]
    assert [n.name for n in d.removed] == ["c"]
    assert [(n.name, n.address) for n in d.changed] == [("b", "10.0.0.22")]
    assert d.unchanged == ("a",)
    assert not d.empty
    assert diff({n.name: n for n in new}, new).empty


def test_diff_sees_per_node_settings() -> None:
    a = node("a", "10.0.0.1")
    assert diff({"a": a}, [node("a", "10.0.0.1", ssh_port=2222)]).changed
    assert diff({"a": a}, [node("a", "10.0.0.1", known_hosts=Path("/x"))]).changed


def test_owner_by_name_address_and_pod_cidr() -> None:
    idx = OwnerIndex([
        node("n1", "192.0.2.1", pod_cidr=ipaddress.ip_network("10.244.1.0/24")),
        node("n2", "2001:db8::2", pod_cidr=ipaddress.ip_network("fd00:1::/64")),
        node("n3", "192.0.2.3", pod_cidr=ipaddress.ip_network("10.244.0.0/16")),
    ])
    assert idx.owner("n1").name == "n1"  # type: ignore[union-attr]
    assert idx.owner("N1.").name == "n1"  # type: ignore[union-attr]
    assert idx.owner("192.0.2.1").name == "n1"  # type: ignore[union-attr]
    assert idx.owner("10.244.1.77").name == "n1", "the narrower CIDR wins"  # type: ignore[union-attr]
    assert idx.owner("10.244.9.1").name == "n3"  # type: ignore[union-attr]
    assert idx.owner("[2001:db8::2]").name == "n2"  # type: ignore[union-attr]
    assert idx.owner("2001:0db8:0::2").name == "n2"  # type: ignore[union-attr]
    assert idx.owner("fd00:1::99").name == "n2"  # type: ignore[union-attr]
    assert idx.owner("192.0.2.99") is None
    assert idx.owner("example.org") is None

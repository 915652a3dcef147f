"""A node speaks only for its own pods, within bounds (pure parts; the attack end to end is in
tests/loopback/test_pod_claims.py): spec.nodeName must be the node, every pod IP (dual-stack too) in its pod CIDRs
or its own address; a name two nodes claim is a conflict, never resolved by order; an oversized list is refused and
the node's previous list kept. And the first address of a pod CIDR (the node's bridge) is not a pod."""

from __future__ import annotations

import ipaddress
import json
import logging
from typing import Any

import pytest

from proxy.dialer import DestinationNotAllowed
from proxy.directory import Directory, NodeInfo, PodCache, PodConflict
from proxy.podlist import MAX_POD_ITEMS, MAX_POD_LIST_BYTES, PodInfo, PodListRefused, parse_pod_list
from proxy.policy import Policy

NETS = (ipaddress.ip_network("10.244.1.0/24"), ipaddress.ip_network("fd00:10:244:1::/64"))


def item(name: str, node: str = "node-1", ip: str | None = "10.244.1.10", ips: list[Any] | None = None,
         namespace: str = "default") -> dict[str, Any]:
    status: dict[str, Any] = {"podIP": ip} if ip else {}
    if ips is not None:
        status["podIPs"] = ips
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node, "containers": [{"name": "app"}]}, "status": status}


def listed(*items: Any) -> bytes:
    return json.dumps({"kind": "PodList", "items": list(items)}).encode()


def parse(*items: Any) -> tuple[list[PodInfo], list[str]]:
    result = parse_pod_list("node-1", listed(*items), address="192.0.2.1", pod_cidrs=NETS)
    return result.pods, result.refused


def test_own_pods_accepted_dual_stack_and_host_network() -> None:
    pods, refused = parse(
        item("web", ips=[{"ip": "10.244.1.10"}, {"ip": "FD00:10:244:1::A"}]),
        item("host-net", ip="192.0.2.1", ips=[{"ip": "192.0.2.1"}]),
        item("pending", ip=None),
    )
    assert refused == []
    assert [(p.name, p.ip, p.ips) for p in pods] == [
        ("web", "10.244.1.10", ("10.244.1.10", "fd00:10:244:1::a")), ("host-net", "192.0.2.1", ("192.0.2.1",)),
        ("pending", "", ())]


@pytest.mark.parametrize(("bad", "why"), [
    (item("agent-node-2", node="node-2"), "spec.nodeName 'node-2' is not node node-1"),
    ({"metadata": {"name": "x"}, "spec": {"containers": []}, "status": {}}, "spec.nodeName None"),
    (item("x", ip="10.244.2.11"), "pod IP 10.244.2.11 is neither in the pod CIDRs"),
    (item("x", ips=[{"ip": "10.244.1.10"}, {"ip": "fd00:10:244:2::1"}]), "pod IP fd00:10:244:2::1"),
    (item("x", ip="192.0.2.2"), "pod IP 192.0.2.2"),
    (item("x", ip="10.244.1.10\n"), "is not an IP address"),
    (item("x", ip="fe80::1%eth0"), "zone"),
    (item("x", ip=None, ips=[{"ip": 5}]), "not a string"),
    (item("x", ips=[{"ip": "10.244.1.11"}]), "not the first of status.podIPs"),
    (item("x\n"), "invalid namespace/name"),
    (item("x", namespace="a..b"), "invalid namespace/name"),
    ([1, 2], "must be objects"),
])
def test_claims_refused(bad: Any, why: str) -> None:
    pods, refused = parse(item("ok"), bad)
    assert [p.name for p in pods] == ["ok"]
    assert len(refused) == 1 and why in refused[0], refused


def test_oversized_lists_refused_whole() -> None:
    with pytest.raises(PodListRefused, match="items"):
        parse(*[item(f"p-{i}") for i in range(MAX_POD_ITEMS + 1)])
    assert len(parse(*[item(f"p-{i}") for i in range(MAX_POD_ITEMS)])[0]) == MAX_POD_ITEMS
    with pytest.raises(PodListRefused, match="larger than"):
        parse_pod_list("node-1", b" " * (MAX_POD_LIST_BYTES + 1))
    with pytest.raises(PodListRefused, match="not JSON"):
        parse_pod_list("node-1", b"[" * 100_000)


async def test_two_nodes_claiming_one_name_is_a_conflict_whatever_the_order(caplog: pytest.LogCaptureFixture) -> None:
    nodes = [NodeInfo("node-1", "192.0.2.1"), NodeInfo("node-2", "192.0.2.2")]
    claims = {"node-1": [PodInfo("kube-system", "agent-node-1", "node-1", "", ("agent",))],
              "node-2": [PodInfo("kube-system", "agent-node-1", "node-2", "", ("agent",))]}

    async def list_pods(node: NodeInfo) -> list[PodInfo]:
        return claims[node.name]

    for order in (nodes, nodes[::-1]):
        cache = PodCache(Directory(order), list_pods, min_refresh=0.0)
        with caplog.at_level(logging.WARNING, logger="proxy.audit"):
            await cache.refresh()
        with pytest.raises(PodConflict, match="node-1, node-2") as err:
            await cache.get("kube-system", "agent-node-1")
        assert err.value.nodes == ("node-1", "node-2")
        assert any("claimed by nodes node-1, node-2" in r.getMessage() for r in caplog.records)
        caplog.clear()
    claims["node-2"] = []  # the false claim withdrawn: the pod is node-1's again
    await cache.refresh()
    pod = await cache.get("kube-system", "agent-node-1")
    assert pod is not None and pod.node == "node-1"


async def test_a_refused_list_keeps_the_previous_one(caplog: pytest.LogCaptureFixture) -> None:
    lists: dict[str, Any] = {"node-1": [PodInfo("default", "web-1", "node-1", "10.244.1.10", ("app",))]}

    async def list_pods(node: NodeInfo) -> list[PodInfo]:
        if isinstance(lists[node.name], Exception):
            raise lists[node.name]
        return list(lists[node.name])

    cache = PodCache(Directory([NodeInfo("node-1", "192.0.2.1")]), list_pods, min_refresh=0.0)
    await cache.refresh()
    lists["node-1"] = PodListRefused("pod list of node node-1 has 5000 items, more than 1000")
    with caplog.at_level(logging.WARNING, logger="proxy.audit"):
        await cache.refresh()
    assert await cache.get("default", "web-1") is not None
    assert any("pod list refused" in r.getMessage() and "5000 items" in r.getMessage() for r in caplog.records)


def test_pod_gateway_address_is_not_a_pod() -> None:
    policy = Policy(pod_networks=NETS)
    for host in ("10.244.1.1", "fd00:10:244:1::1", "[FD00:10:244:1::1]", "10.244.1.1."):
        with pytest.raises(DestinationNotAllowed, match="allow_pod_gateway"):
            policy.check(host, 80)
    policy.check("10.244.1.10", 80)
    policy.check("10.244.1.0", 80)
    Policy(pod_networks=NETS, allow_pod_gateway=True).check("10.244.1.1", 80)

"""A compromised node cannot claim another node's pods, nor flood the gateway with pods (the attacks, end to end:
the real gateway, its tunnels, the proxy front, and the dev cluster's kubelets with one of them playing the
compromised node by listing extra items in its ``/pods``)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import pytest

from tunneld.app import Gateway
from tunneld.config import Config, KubeletSettings, ProxySettings
from tunneld.dev.cluster import DevCluster

from .. import rawhttp
from ..proxyauth import proxy_get
from .conftest import fast_config, started

LOG = "/api/v1/namespaces/kube-system/pods/agent-node-1/log?container=agent&tailLines=1"


def config(cluster: DevCluster) -> Config:
    return replace(fast_config(cluster), proxy=ProxySettings(listen="127.0.0.1:0", pods_refresh=60),
                   kubelet=KubeletSettings(certificate_authority=cluster.workdir / "kubelet-ca.crt"))


def claim(node: str, ip: str, name: str = "agent-node-1", pad: int = 0) -> dict[str, Any]:
    item: dict[str, Any] = {"metadata": {"name": name, "namespace": "kube-system"},
                            "spec": {"nodeName": node, "containers": [{"name": "agent"}]},
                            "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}
    if pad:
        item["metadata"]["annotations"] = {"pad": "x" * pad}
    return item


async def listed(cluster: DevCluster) -> Gateway:
    gw = await started(config(cluster))
    await gw.api_front.pods.refresh()
    assert not gw.api_front.pods.unlisted
    return gw


async def log_of_agent_1(gw: Gateway) -> rawhttp.Result:
    return await proxy_get(gw, LOG)


@pytest.mark.parametrize("claimed", [("node-1", "10.244.1.11"), ("node-1", "10.244.2.11"), ("node-2", "10.244.1.11")],
                         ids=["as-node-1", "as-node-1-own-cidr", "node-1-ip"])
async def test_a_node_cannot_claim_another_nodes_pod(cluster: DevCluster, caplog: pytest.LogCaptureFixture,
                                                     claimed: tuple[str, str]) -> None:
    # node-2 (compromised) lists node-1's agent pod, lying about spec.nodeName or the pod IP.
    cluster.kubelets[1].extra_items = [claim(*claimed)]
    with caplog.at_level(logging.WARNING, logger="proxy.audit"):
        gw = await listed(cluster)
    try:
        r = await log_of_agent_1(gw)
        assert r.status == 200 and r.body.startswith(b"node-1/agent-node-1/agent line"), r
        refusals = [m.getMessage() for m in caplog.records if "pod refused from the kubelet of node node-2" in
                    m.getMessage()]
        assert len(refusals) == 1 and "kube-system/agent-node-1" in refusals[0], refusals
    finally:
        await gw.stop()


async def test_a_name_two_nodes_claim_is_a_conflict_naming_both(cluster: DevCluster,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    # node-2 claims a pod of that name as its own, in its own pod CIDR: a conflict, not "the last node wins".
    cluster.kubelets[1].extra_items = [claim("node-2", "10.244.2.11")]
    with caplog.at_level(logging.WARNING, logger="proxy.audit"):
        gw = await listed(cluster)
    try:
        for path in (LOG, "/api/v1/namespaces/kube-system/pods/agent-node-1/proxy/"):
            r = await proxy_get(gw, path)
            assert r.status == 502 and b"node-1, node-2" in r.body, r
        assert any("kube-system/agent-node-1 is claimed by nodes node-1, node-2" in m.getMessage()
                   for m in caplog.records)
        cluster.kubelets[1].extra_items = []  # the claim withdrawn: the pod is node-1's again
        await gw.api_front.pods.refresh()
        r = await log_of_agent_1(gw)
        assert r.status == 200 and r.body.startswith(b"node-1/agent-node-1/agent line"), r
    finally:
        await gw.stop()


@pytest.mark.parametrize("flood", ["items", "bytes"])
async def test_an_oversized_pod_list_is_refused_and_the_previous_one_kept(cluster: DevCluster,
                                                                        caplog: pytest.LogCaptureFixture,
                                                                        flood: str) -> None:
    gw = await listed(cluster)
    try:
        kubelet = cluster.kubelets[1]
        if flood == "items":
            kubelet.extra_items = [claim("node-2", "10.244.2.20", f"flood-{i}") for i in range(1000)]
        else:
            kubelet.extra_items = [claim("node-2", "10.244.2.20", "fat", pad=9 * 1024 * 1024)]
        with caplog.at_level(logging.WARNING, logger="proxy.audit"):
            await gw.api_front.pods.refresh()
        refused = [m.getMessage() for m in caplog.records if "pod list refused" in m.getMessage()]
        assert len(refused) == 1, refused
        assert ("more than 1000" if flood == "items" else "larger than 8388608 bytes") in refused[0]
        # node-2's previous list is kept: its pods still answer; none of the flood got in
        r = await proxy_get(gw, "/api/v1/namespaces/kube-system/pods/agent-node-2/log?container=agent&tailLines=1")
        assert r.status == 200 and r.body.startswith(b"node-2/agent-node-2/agent line"), r
        assert await gw.api_front.pods.get("kube-system", "flood-0" if flood == "items" else "fat") is None
    finally:
        await gw.stop()

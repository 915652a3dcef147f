"""The Kubernetes node inventory against a small HTTPS API server speaking the real list/watch wire format
(tests/k8sapi.py), and through the gateway against the dev cluster's simulated nodes."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest

from tests import waiting
from tests.k8sapi import FakeKubeAPI, node_object
from tunneld.app import Gateway
from tunneld.config import Config, KubernetesInventorySettings, Node, StatusSettings, load_config
from tunneld.dev.cluster import HEALTHZ_PORT, KUBELET_PORT, DevCluster
from tunneld.errors import ConfigError
from tunneld.tunnels.k8s_nodes import KubeAuthError, NodeCache, SkipNode, merge_nodes, node_from_object
from tunneld.tunnels.k8s_watch import KubeInventory
from tunneld.tunnels.probe import http_get
from tunneld.tunnels.state import Backoff

from .conftest import next_base, states

FAST = {"backoff": Backoff(initial=0.02, maximum=0.1, multiplier=2.0, jitter=0.0), "debounce": 0.02}


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    await waiting.wait_for(cond, timeout, what, interval=0.02)


@pytest.fixture
async def kapi(short_dir: Path) -> AsyncIterator[FakeKubeAPI]:
    api = FakeKubeAPI(short_dir / "k8s")
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


class Recorder:
    """The source's callback: every node list it was handed."""

    def __init__(self) -> None:
        self.calls: list[list[Node]] = []

    def __call__(self, nodes: list[Node]) -> None:
        self.calls.append(nodes)

    @property
    def last(self) -> dict[str, Node]:
        return {n.name: n for n in self.calls[-1]} if self.calls else {}


def source(kapi: FakeKubeAPI, rec: Recorder, token: str | None = None, **settings: object) -> KubeInventory:
    cfg = KubernetesInventorySettings(kubeconfig=kapi.write_kubeconfig(token=token), **settings)  # type: ignore[arg-type]
    return KubeInventory.from_settings(cfg, rec, **FAST)  # type: ignore[arg-type]


# -- conversion, merging, config (pure) --------------------------------------------------------------------------


def test_node_from_object_reads_internal_ip_pod_cidr_and_kubelet_port() -> None:
    obj = node_object("w-1", "10.0.0.7", "10.244.3.0/24", kubelet_port=10260, external_ip="203.0.113.9",
                      unschedulable=True, ready=False)
    node = node_from_object(obj, ssh_port=2200)
    assert node == Node(name="w-1", address="10.0.0.7", ssh_port=2200, kubelet_port=10260,
                        pod_cidr=ipaddress.ip_network("10.244.3.0/24"))
    assert node_from_object(node_object("w-2", "fd00::7", None, kubelet_port=None)).kubelet_port == 10250
    with pytest.raises(SkipNode, match="InternalIP"):
        node_from_object(node_object("w-3", None, external_ip="203.0.113.10"))
    bad_cidr = node_object("w-4", "10.0.0.8", "10.244.3.1/24")
    assert node_from_object(bad_cidr).pod_cidr is None, "an invalid podCIDR is ignored, the node kept"


def test_merge_static_nodes_win_on_name_and_address() -> None:
    static = [Node("a", "10.0.0.1"), Node("b", "10.0.0.2")]
    found = [Node("a", "10.9.9.9"), Node("c", "10.0.0.2"), Node("d", "10.0.0.4")]
    merged, notes = merge_nodes(static, found)
    assert [(n.name, n.address) for n in merged] == [("a", "10.0.0.1"), ("b", "10.0.0.2"), ("d", "10.0.0.4")]
    assert len(notes) == 2 and "node a" in notes[0] and "wins" in notes[0] and "10.0.0.2" in notes[1]


def test_cache_ignores_changes_the_gateway_does_not_read() -> None:
    cache = NodeCache()
    assert cache.replace_all([node_object("a", "10.0.0.1")])
    beat = node_object("a", "10.0.0.1")
    beat["status"]["conditions"][0]["status"] = "False"
    assert not cache.apply("MODIFIED", beat), "a NotReady node is still the same node"
    assert cache.apply("MODIFIED", node_object("a", "10.0.0.2"))
    assert cache.apply("DELETED", node_object("a", "10.0.0.2")) and not cache.nodes


def test_config_inventory_source(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text("{}")
    ssh = '[ssh]\nprivate_key = "id"\nknown_hosts = "kh"\n\n'

    def load(text: str) -> Config:
        (tmp_path / "t.toml").write_text(ssh + text)
        return load_config(tmp_path / "t.toml")

    cfg = load('[inventory]\nsource = "kubernetes"\nkubeconfig = "kc"\nlabel_selector = "pool=edge"\nssh_port = 2222\n')
    assert cfg.inventory_source == "kubernetes" and cfg.nodes == ()
    assert cfg.kubernetes == KubernetesInventorySettings(kubeconfig.resolve(), "pool=edge", 2222)
    assert load("").inventory_source == "file" and load("").kubernetes is None
    with pytest.raises(ConfigError, match=r"inventory\.source: 'etcd'"):
        load('[inventory]\nsource = "etcd"\n')
    with pytest.raises(ConfigError, match=r"inventory\.kubeconfig: .*nope: file not found"):
        load('[inventory]\nsource = "kubernetes"\nkubeconfig = "nope"\n')
    with pytest.raises(ConfigError, match=r"inventory\.kubeconfig: required: not running in a pod"):
        load('[inventory]\nsource = "kubernetes"\n')
    with pytest.raises(ConfigError, match=r"inventory\.ssh_port: only applies with source = \"kubernetes\""):
        load("[inventory]\nssh_port = 2222\n")


# -- the source against the API server fixture -----------------------------------------------------------------


async def test_list_then_watch_follows_adds_changes_and_deletes(kapi: FakeKubeAPI) -> None:
    kapi.add_node(node_object("a", "10.1.0.1", "10.244.1.0/24"))
    kapi.add_node(node_object("b", "10.1.0.2", "10.244.2.0/24", kubelet_port=10260))
    rec = Recorder()
    src = source(kapi, rec, ssh_port=2200)
    await src.start()
    try:
        assert src.synced.is_set()
        assert rec.last == {
            "a": Node("a", "10.1.0.1", 2200, 10250, ipaddress.ip_network("10.244.1.0/24")),
            "b": Node("b", "10.1.0.2", 2200, 10260, ipaddress.ip_network("10.244.2.0/24")),
        }
        await wait_for(lambda: kapi.watch_count == 1, what="a watch")
        listed_rv = kapi.list_requests()[0]
        assert kapi.watch_requests()[0].params["resourceVersion"] == str(kapi.rv)
        assert kapi.watch_requests()[0].params["allowWatchBookmarks"] == "true"
        assert "limit" in listed_rv.params

        kapi.add_node(node_object("c", "10.1.0.3"))
        await wait_for(lambda: "c" in rec.last, what="ADDED c")
        kapi.modify_node("a", node_object("a", "10.1.0.11", "10.244.1.0/24"))
        await wait_for(lambda: rec.last["a"].address == "10.1.0.11", what="MODIFIED a")
        kapi.delete_node("b")
        await wait_for(lambda: "b" not in rec.last, what="DELETED b")
        calls = len(rec.calls)
        kapi.touch_node("c")  # a heartbeat: nothing the gateway reads changed
        await wait_for(lambda: src.stats.resource_version == str(kapi.rv), what="heartbeat seen")
        await asyncio.sleep(0.1)
        assert len(rec.calls) == calls, "an unchanged node list is not handed over again"
        assert len(kapi.list_requests()) == 1 and src.stats.relists_after_gone == 0
    finally:
        await src.stop()
    assert kapi.watch_count == 0 or await _eventually(lambda: kapi.watch_count == 0)


async def _eventually(cond: Callable[[], bool]) -> bool:
    await wait_for(cond, what="the server to see the watch closed")
    return True


async def test_burst_of_events_is_applied_once(kapi: FakeKubeAPI) -> None:
    rec = Recorder()
    src = source(kapi, rec)
    src.debounce = 0.3
    await src.start()
    try:
        await wait_for(lambda: kapi.watch_count == 1, what="a watch")
        before = len(rec.calls)
        for i in range(20):
            kapi.add_node(node_object(f"n{i}", f"10.2.0.{i + 1}"))
        await wait_for(lambda: len(rec.last) == 20, what="20 nodes")
        assert len(rec.calls) - before <= 2, "a burst of events is debounced into one or two updates"
    finally:
        await src.stop()


@pytest.mark.parametrize("abort", [False, True], ids=["stream-ends", "connection-cut"])
async def test_dropped_watch_resumes_from_last_version_without_relist(kapi: FakeKubeAPI, abort: bool) -> None:
    kapi.add_node(node_object("a", "10.3.0.1"))
    kapi.add_node(node_object("b", "10.3.0.2"))
    rec = Recorder()
    src = source(kapi, rec)
    await src.start()
    try:
        await wait_for(lambda: kapi.watch_count == 1, what="a watch")
        kapi.add_node(node_object("c", "10.3.0.3"))
        await wait_for(lambda: "c" in rec.last, what="c")
        seen = str(kapi.rv)
        # Drop the watch, and change things before the client can come back: it must get them from the history.
        kapi.drop_watches(abort=abort)
        kapi.delete_node("a")
        kapi.add_node(node_object("d", "10.3.0.4"))
        await wait_for(lambda: set(rec.last) == {"b", "c", "d"}, what="converged after the drop")
        watches = kapi.watch_requests()
        assert len(watches) >= 2 and watches[1].params["resourceVersion"] == seen, "re-watch from the last version"
        assert len(kapi.list_requests()) == 1, "no relist after a dropped watch"
        assert src.stats.errors == (1 if abort else 0)
    finally:
        await src.stop()


@pytest.mark.parametrize("as_http", [False, True], ids=["error-event", "http-410"])
async def test_expired_version_forces_relist_and_converges(kapi: FakeKubeAPI, as_http: bool) -> None:
    kapi.gone_as_http = as_http
    kapi.add_node(node_object("a", "10.4.0.1"))
    kapi.add_node(node_object("b", "10.4.0.2"))
    rec = Recorder()
    src = source(kapi, rec)
    await src.start()
    try:
        await wait_for(lambda: kapi.watch_count == 1, what="a watch")
        old_rv = str(kapi.rv)
        kapi.drop_watches(abort=True)
        kapi.delete_node("a")  # missed while disconnected, and then compacted away: only a relist can see it
        kapi.add_node(node_object("c", "10.4.0.3"))
        kapi.compact()
        await wait_for(lambda: set(rec.last) == {"b", "c"}, what="converged after the relist")
        assert src.stats.relists_after_gone == 1
        assert len(kapi.list_requests()) == 2
        statuses = [(r.params.get("resourceVersion"), r.status) for r in kapi.watch_requests()]
        assert (old_rv, 410 if as_http else 200) in statuses
        await wait_for(lambda: kapi.watch_count == 1, what="watching again")
        assert kapi.watch_requests()[-1].params["resourceVersion"] == str(kapi.rv)
        kapi.add_node(node_object("d", "10.4.0.4"))
        await wait_for(lambda: "d" in rec.last, what="events after the relist")
    finally:
        await src.stop()


async def test_bookmark_advances_the_resume_version(kapi: FakeKubeAPI) -> None:
    kapi.add_node(node_object("a", "10.5.0.1"))
    rec = Recorder()
    src = source(kapi, rec, label_selector="pool=edge")
    await src.start()
    try:
        assert rec.last == {}, "the label selector is applied"
        assert kapi.list_requests()[0].params["labelSelector"] == "pool=edge"
        await wait_for(lambda: kapi.watch_count == 1, what="a watch")
        for _ in range(3):
            kapi.touch_node("a")  # changes outside the selection move the version on
        kapi.bookmark()
        await wait_for(lambda: src.stats.resource_version == str(kapi.rv), what="the bookmark")
        kapi.compact()  # without the bookmark, resuming would now need a relist
        kapi.drop_watches()
        await wait_for(lambda: len(kapi.watch_requests()) == 2, what="the re-watch")
        assert kapi.watch_requests()[1].params["resourceVersion"] == str(kapi.rv)
        kapi.modify_node("a", node_object("a", "10.5.0.1", labels={"pool": "edge"}))
        await wait_for(lambda: "a" in rec.last, what="a joins the selection")
        assert len(kapi.list_requests()) == 1
    finally:
        await src.stop()


async def test_paginated_list(kapi: FakeKubeAPI) -> None:
    for i in range(5):
        kapi.add_node(node_object(f"p{i}", f"10.6.0.{i + 1}"))
    rec = Recorder()
    src = source(kapi, rec)
    src.api.page_size = 2
    await src.start()
    try:
        assert sorted(rec.last) == [f"p{i}" for i in range(5)]
        lists = kapi.list_requests()
        assert len(lists) == 3 and "continue" not in lists[0].params and "continue" in lists[2].params
    finally:
        await src.stop()


async def test_wrong_token_is_a_clear_error(kapi: FakeKubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    kapi.add_node(node_object("a", "10.7.0.1"))
    rec = Recorder()
    wrong = "wrong-token-" + "x" * 20
    src = source(kapi, rec, token=wrong)
    with caplog.at_level(logging.DEBUG), pytest.raises(KubeAuthError) as info:
        await src.start()
    assert info.value.code == 401
    assert str(info.value).startswith(f"{kapi.url}: 401 Unauthorized (the API server rejected the credentials")
    assert rec.calls == [] and kapi.list_requests()[0].status == 401
    assert all(wrong not in r.getMessage() and kapi.token not in r.getMessage() for r in caplog.records)
    assert wrong not in str(info.value)


async def test_forbidden_later_is_logged_and_retried(kapi: FakeKubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    kapi.add_node(node_object("a", "10.7.1.1"))
    rec = Recorder()
    src = source(kapi, rec)
    await src.start()
    try:
        await wait_for(lambda: kapi.watch_count == 1, what="a watch")
        kapi.forbidden = True  # RBAC taken away while running: log it as an error and keep retrying
        with caplog.at_level(logging.ERROR, logger="tunneld.k8s"):
            kapi.drop_watches()
            await wait_for(lambda: src.stats.errors >= 2, what="retries")
        assert any("403 Forbidden" in r.getMessage() and "list and watch nodes" in r.getMessage()
                   for r in caplog.records)
        kapi.forbidden = False
        kapi.add_node(node_object("b", "10.7.1.2"))
        await wait_for(lambda: "b" in rec.last, what="recovered")
        assert len(kapi.list_requests()) == 1, "recovered by re-watching from the last version"
    finally:
        await src.stop()


async def test_api_server_down_at_start_is_retried(short_dir: Path) -> None:
    kapi = FakeKubeAPI(short_dir / "k8s")
    await kapi.start()
    kubeconfig = kapi.write_kubeconfig()
    port = kapi.port
    await kapi.stop()
    rec = Recorder()
    src = KubeInventory.from_settings(KubernetesInventorySettings(kubeconfig=kubeconfig), rec, **FAST)  # type: ignore[arg-type]
    await src.start(wait=0.5)
    try:
        assert not src.synced.is_set() and src.stats.errors >= 1 and "ConnectError" in (src.stats.last_error or "")
        errors = src.stats.errors
        await asyncio.sleep(0.5)
        assert 1 <= src.stats.errors - errors <= 25, "retries keep going, spaced by the capped backoff (0.1 s)"
        # The API server comes back on the same address: the inventory syncs without a restart.
        again = FakeKubeAPI(short_dir / "k8s", token=kapi.token)
        await again.start(port=port)
        try:
            again.add_node(node_object("a", "10.8.0.1"))
            await wait_for(lambda: "a" in rec.last, what="sync after the server returns")
        finally:
            await again.stop()
    finally:
        await src.stop()


async def test_node_without_internal_ip_is_skipped_with_a_warning(kapi: FakeKubeAPI,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    kapi.add_node(node_object("a", "10.9.0.1"))
    kapi.add_node(node_object("ext", None, external_ip="203.0.113.5"))
    rec = Recorder()
    src = source(kapi, rec)
    with caplog.at_level(logging.WARNING, logger="tunneld.k8s"):
        await src.start()
    try:
        assert set(rec.last) == {"a"}
        warnings = [r for r in caplog.records if "InternalIP" in r.getMessage()]
        assert len(warnings) == 1 and getattr(warnings[0], "node", None) == "ext"
        kapi.touch_node("ext")
        await wait_for(lambda: src.stats.resource_version == str(kapi.rv), what="the touch")
        assert len([r for r in caplog.records if "InternalIP" in r.getMessage()]) == 1, "warned once, not per event"
        kapi.modify_node("ext", node_object("ext", "10.9.0.2", external_ip="203.0.113.5"))
        await wait_for(lambda: "ext" in rec.last, what="ext usable once it has an InternalIP")
        assert rec.last["ext"].address == "10.9.0.2"
    finally:
        await src.stop()


# -- through the gateway, with real tunnels to the dev cluster's simulated nodes ----------------------------------


def k8s_config(cluster: DevCluster, kapi: FakeKubeAPI, static_nodes: str = "") -> Config:
    """The dev cluster's config, its [[nodes]] replaced by the Kubernetes source (plus ``static_nodes``)."""
    assert cluster.config_path is not None
    head = cluster.config_path.read_text().split("[[nodes]]", 1)[0]
    path = cluster.workdir / "tunneld-k8s.toml"
    path.write_text(head + f'[inventory]\nsource = "kubernetes"\nkubeconfig = "{kapi.write_kubeconfig()}"\n'
                    f"ssh_port = {cluster.ssh_port}\n\n" + static_nodes)
    cfg = load_config(path)
    return replace(
        cfg,
        ssh=replace(cfg.ssh, keepalive_interval=1.0, keepalive_count_max=2, backoff_initial=0.1, backoff_max=0.5,
                    connect_timeout=3.0),
        health=replace(cfg.health, period=0.3, timeout=2.0),
        status=StatusSettings(socket=None, listen=None),
        proxy=replace(cfg.proxy, listen=None),  # the dev config's fixed proxy port is not needed here
    )


def sim_object(cluster: DevCluster, i: int, address: str | None = None) -> dict[str, object]:
    sim = cluster.sim_nodes[i]
    return node_object(sim.name, address or sim.address, f"10.244.{i + 1}.0/24", kubelet_port=KUBELET_PORT)


@pytest.fixture
async def k8s_cluster(short_dir: Path) -> AsyncIterator[DevCluster]:
    c = DevCluster(nodes=4, base_address=next_base(), ssh_port=2222, workdir=short_dir / "dev", proxy_port=0)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


async def test_gateway_follows_the_api_with_real_tunnels(k8s_cluster: DevCluster, kapi: FakeKubeAPI) -> None:
    cluster = k8s_cluster
    kapi.add_node(sim_object(cluster, 0))
    kapi.add_node(sim_object(cluster, 1))
    gw = Gateway(k8s_config(cluster, kapi))
    gw.kube_options = dict(FAST)
    await gw.start()
    try:
        await wait_for(lambda: states(gw) == {"node-1": "up", "node-2": "up"}, what="listed nodes up")
        n2 = gw.pool.nodes["node-2"]
        assert (n2.address, n2.ssh_port, n2.kubelet_port) == (cluster.sim_nodes[1].address, 2222, KUBELET_PORT)
        owner = gw.pool.owner("10.244.2.10")
        assert owner is not None and owner.node.name == "node-2", "pod CIDR from spec.podCIDR routes dials"
        status, body = await http_get(gw.unchecked_dialer.dial, n2.address, HEALTHZ_PORT, "/healthz", 5.0)
        assert status == 200 and body.strip() == b"ok", "a real request through the tunnel of an API node"

        kapi.add_node(sim_object(cluster, 2))  # ADDED: a new tunnel comes up
        await wait_for(lambda: states(gw).get("node-3") == "up", what="node-3 up")
        t1 = gw.pool.tunnels["node-1"]
        kapi.touch_node("node-1")  # MODIFIED without a change that matters: the tunnel is untouched
        # MODIFIED address (node-2 moved to the machine the unlisted 4th sshd plays): the tunnel reconnects there.
        spare = cluster.sim_nodes[3]
        kapi.modify_node("node-2", sim_object(cluster, 1, address=spare.address))
        await wait_for(lambda: gw.pool.nodes["node-2"].address == spare.address, what="node-2 re-addressed")
        await wait_for(lambda: states(gw)["node-2"] == "up" and spare.active == 1, what="node-2 up at its new address")
        await wait_for(lambda: cluster.sim_nodes[1].active == 0, what="the old address's connection closed")
        owner = gw.pool.owner(spare.address)
        assert owner is not None and owner.node.name == "node-2"
        kapi.delete_node("node-3")  # DELETED: the tunnel drains and closes
        await wait_for(lambda: "node-3" not in gw.pool.tunnels, what="node-3 removed")
        await wait_for(lambda: cluster.sim_nodes[2].active == 0, what="node-3's SSH connection closed")
        assert gw.pool.tunnels["node-1"] is t1 and t1.machine.connects == 1
        assert "node-3" not in gw.directory.nodes
        inv = gw.info()["inventory"]
        assert inv["source"] == "kubernetes" and inv["synced"] and inv["nodes"] == 2 and inv["lists"] == 1
        assert kapi.token not in str(inv)
    finally:
        await gw.stop()
    assert gw.kube is None


async def test_static_nodes_win_and_reload_keeps_kubernetes_nodes(
        k8s_cluster: DevCluster, kapi: FakeKubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    cluster = k8s_cluster
    s1 = cluster.sim_nodes[0]
    static = (f'[[nodes]]\nname = "node-1"\naddress = "{s1.address}"\nssh_port = {cluster.ssh_port}\n'
              f'kubelet_port = {KUBELET_PORT}\npod_cidr = "10.244.1.0/24"\n')
    kapi.add_node(sim_object(cluster, 0, address="10.200.0.1"))  # the API says otherwise: the file wins
    kapi.add_node(sim_object(cluster, 1))
    kapi.add_node(sim_object(cluster, 2))
    cfg = k8s_config(cluster, kapi, static)
    gw = Gateway(cfg)
    gw.kube_options = dict(FAST)
    with caplog.at_level(logging.WARNING, logger="tunneld"):
        await gw.start()
    try:
        await wait_for(lambda: states(gw) == {f"node-{i}": "up" for i in (1, 2, 3)}, what="all up")
        assert gw.pool.nodes["node-1"].address == s1.address
        assert any("node node-1" in r.getMessage() and "wins" in r.getMessage() for r in caplog.records)
        tunnels = dict(gw.pool.tunnels)
        change = await gw.reload()  # SIGHUP: the file is re-read; the Kubernetes nodes must stay
        assert change.empty and set(change.unchanged) == {"node-1", "node-2", "node-3"}
        assert all(gw.pool.tunnels[name] is t for name, t in tunnels.items())
        kapi.delete_node("node-1")  # the static node stays: the file defines it
        kapi.delete_node("node-2")
        await wait_for(lambda: set(gw.pool.tunnels) == {"node-1", "node-3"}, what="node-2 removed")
    finally:
        await gw.stop()


async def test_gateway_refuses_to_start_with_a_rejected_token(k8s_cluster: DevCluster, kapi: FakeKubeAPI) -> None:
    cfg = k8s_config(k8s_cluster, kapi)
    assert cfg.kubernetes is not None and cfg.kubernetes.kubeconfig is not None
    kapi.write_kubeconfig(cfg.kubernetes.kubeconfig, token="not-the-token")
    gw = Gateway(cfg)
    gw.kube_options = dict(FAST)
    try:
        with pytest.raises(KubeAuthError, match=r"401 Unauthorized"):
            await gw.start()
        assert gw.kube is None
    finally:
        await gw.stop()

"""The apiserver-style proxy front against the dev cluster: node proxy to the kubelet, pod logs, kubelet TLS.

Requests are made with curl, as an operator (or the apiserver's proxy) would make them.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable
from dataclasses import replace
from pathlib import Path

import pytest

from tunneld.app import Gateway
from tunneld.config import Config, KubeletSettings, PolicySettings, ProxySettings
from tunneld.dev.cluster import DevCluster
from tunneld.dev.pki import DevCA

from ..curl import curl as run_curl
from .conftest import fast_config, started


def proxy_config(cluster: DevCluster, *, kubelet_ca: Path | None = None) -> Config:
    cfg = fast_config(cluster)
    ca = cluster.workdir / "kubelet-ca.crt" if kubelet_ca is None else kubelet_ca
    return replace(cfg, proxy=ProxySettings(listen="127.0.0.1:0", pods_refresh=0.5),
                   kubelet=KubeletSettings(certificate_authority=ca), policy=PolicySettings(node_ports=("10248",)))


async def with_pods(cfg: Config) -> Gateway:
    """A started gateway whose pod cache has listed every node (pods are asked of kubelets through the tunnels)."""
    gw = await started(cfg)
    await gw.api_front.pods.refresh()
    assert not gw.api_front.pods.unlisted
    return gw


def curl(cluster: DevCluster, *args: str) -> Awaitable[subprocess.CompletedProcess[bytes]]:
    """curl with the bearer token ``tunneld dev`` wrote for the user running the tests."""
    return run_curl("-H", ": ".join(cluster.auth_header), *args, timeout=15)


def base(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.proxy.ports[0]}"


@pytest.mark.both_loops
async def test_node_proxy_reaches_the_kubelet_with_verified_tls(cluster: DevCluster) -> None:
    gw = await started(proxy_config(cluster))
    try:
        assert gw.info()["kubelet_tls"] == "verified"
        for sim in cluster.sim_nodes:
            r = await curl(cluster, "-i", f"{base(gw)}/api/v1/nodes/{sim.name}/proxy/healthz")
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith(b"HTTP/1.1 200"), r.stdout
            assert r.stdout.endswith(b"\r\n\r\nok")
        r = await curl(cluster, f"{base(gw)}/api/v1/nodes/{cluster.sim_nodes[0].name}/proxy/pods")
        names = {p for p in ("web-1", "agent-node-1") if f'"{p}"'.encode() in r.stdout}
        assert names == {"web-1", "agent-node-1"}, r.stdout[:300]
    finally:
        await gw.stop()


@pytest.mark.both_loops
async def test_kubelet_certificate_from_another_ca_is_refused_with_the_reason(cluster: DevCluster,
                                                                            short_dir: Path) -> None:
    other = short_dir / "other-ca.crt"
    other.write_bytes(DevCA("not the kubelets' CA").cert_pem)
    gw = await started(proxy_config(cluster, kubelet_ca=other))
    try:
        r = await curl(cluster, "-i", f"{base(gw)}/api/v1/nodes/{cluster.sim_nodes[0].name}/proxy/healthz")
        assert r.stdout.startswith(b"HTTP/1.1 502 Bad Gateway"), r.stdout
        assert b"certificate not trusted" in r.stdout
        assert b"\r\n\r\nok" not in r.stdout
    finally:
        await gw.stop()


async def test_unverified_kubelet_tls_still_works_but_says_so(cluster: DevCluster,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    cfg = replace(proxy_config(cluster), kubelet=KubeletSettings())
    gw = await started(cfg)
    try:
        assert gw.info()["kubelet_tls"] == "unverified"
        assert any("kubelet TLS: unverified" in rec.getMessage() for rec in caplog.records)
        r = await curl(cluster, f"{base(gw)}/api/v1/nodes/{cluster.sim_nodes[0].name}/proxy/healthz")
        assert r.stdout == b"ok"
    finally:
        await gw.stop()


@pytest.mark.both_loops
async def test_pod_log_with_tail_and_follow_streams(cluster: DevCluster) -> None:
    gw = await with_pods(proxy_config(cluster))
    try:
        url = f"{base(gw)}/api/v1/namespaces/kube-system/pods/agent-node-2/log"
        r = await curl(cluster, f"{url}?container=sidecar&tailLines=3")
        expected = [f"node-2/agent-node-2/sidecar line {n}" for n in (17, 18, 19)]
        assert r.stdout.decode().splitlines() == expected, r.stdout
        # two containers and none named: the apiserver's message
        r = await curl(cluster, "-i", url)
        assert r.stdout.startswith(b"HTTP/1.1 400") and b"a container name must be specified" in r.stdout

        # follow: lines keep arriving while the client stays; read them as they come, then leave
        proc = await asyncio.create_subprocess_exec(
            "curl", "-sSN", "--max-time", "30", "-H", ": ".join(cluster.auth_header),
            f"{url}?container=agent&follow=true&tailLines=1",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        lines, started_at = [], time.monotonic()
        try:
            async with asyncio.timeout(20):
                while len(lines) < 4:
                    lines.append((await proc.stdout.readline()).decode().strip())
        finally:
            proc.terminate()
            await proc.wait()
        assert lines == [f"node-2/agent-node-2/agent line {n}" for n in (19, 20, 21, 22)]
        assert time.monotonic() - started_at >= 0.4  # new lines came over time, not as one finished body
    finally:
        await gw.stop()


@pytest.mark.both_loops
async def test_unknown_targets_and_methods(cluster: DevCluster) -> None:
    gw = await with_pods(proxy_config(cluster))
    try:
        cases = [
            ("/api/v1/nodes/no-such-node/proxy/healthz", "GET", "404", "node 'no-such-node' not found"),
            ("/api/v1/namespaces/default/pods/ghost/log", "GET", "404", "pod default/ghost not found"),
            ("/api/v1/namespaces/default/services/ghost/proxy/", "GET", "404", "service default/ghost not found"),
            ("/api/v1/nodes/node-1/proxy/../../etc/passwd", "GET", "400", "dot segments"),
            ("/api/v1/nodes/node-1/proxy/%2e%2e/x", "GET", "400", "dot segments"),
            ("/api/v1/namespaces/default/pods/web-1/log", "DELETE", "405", "not allowed"),
            ("/api/v1/namespaces/default/pods/web-1/exec?command=ls", "GET", "400", "Upgrade request required"),
            ("/healthz", "GET", "404", "not found"),
        ]
        for path, method, status, reason in cases:
            r = await curl(cluster, "-i", "--path-as-is", "-X", method, base(gw) + path)
            assert r.stdout.split(b" ", 2)[1].decode() == status, (path, r.stdout)
            assert reason.encode() in r.stdout, (path, r.stdout)
        # a plain node port the policy allows, and one it does not (403, never dialed)
        r = await curl(cluster, f"{base(gw)}/api/v1/nodes/node-2:10248/proxy/healthz")
        assert r.stdout == b"ok", r
        r = await curl(cluster, "-i", f"{base(gw)}/api/v1/nodes/node-1:22/proxy/")
        assert r.stdout.startswith(b"HTTP/1.1 403") and b"policy.node_ports" in r.stdout, r.stdout
    finally:
        await gw.stop()

"""Pure decisions of the fronts: URL routing, CONNECT targets, destination policy, header handling, and the
apiserver -> kubelet translation of pod subresource queries."""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import parse_qsl, urlsplit

import h11
import pytest

from proxy.apiproxy import _kubelet_path
from proxy.connect import parse_authority
from proxy.dialer import DestinationNotAllowed, TunnelUnavailable
from proxy.directory import Directory, NodeInfo, PodCache, PodInfo, parse_pod_list
from proxy.errors import BadRequest
from proxy.framing import request_headers, response_headers
from proxy.policy import Policy, PortSet
from proxy.routes import RouteError, parse


@pytest.mark.parametrize(("target", "kind", "name", "ns", "scheme", "port", "path", "query"), [
    ("/api/v1/nodes/node-1/proxy/healthz", "node", "node-1", None, "", "", "/healthz", ""),
    ("/api/v1/nodes/node-1:10255/proxy/stats/summary?x=1", "node", "node-1", None, "", "10255", "/stats/summary",
     "x=1"),
    ("/api/v1/nodes/https:node-1:10250/proxy/", "node", "node-1", None, "https", "10250", "/", ""),
    ("/api/v1/nodes/node-1/proxy", "node", "node-1", None, "", "", "/", ""),
    ("/api/v1/namespaces/default/pods/web-1:8080/proxy/a/b%20c", "pod", "web-1", "default", "", "8080", "/a/b%20c",
     ""),
    ("/api/v1/namespaces/kube-system/services/https:dns:metrics/proxy/m", "service", "dns", "kube-system", "https",
     "metrics", "/m", ""),
    ("/api/v1/namespaces/default/pods/web-1/log?follow=true", "log", "web-1", "default", "", "", "/", "follow=true"),
    ("/api/v1/namespaces/default/pods/web-1/portforward?ports=80", "portforward", "web-1", "default", "", "", "/",
     "ports=80"),
])
def test_routes(target: str, kind: str, name: str, ns: str | None, scheme: str, port: str, path: str,
                query: str) -> None:
    r = parse(target)
    assert (r.kind, r.name, r.namespace, r.scheme, r.port, r.path, r.query) == (kind, name, ns, scheme, port, path,
                                                                               query)


@pytest.mark.parametrize(("target", "status"), [
    ("/api/v1/nodes/node-1/proxy/../secret", 400),
    ("/api/v1/nodes/node-1/proxy/%2e%2e/secret", 400),
    ("/api/v1/nodes/node-1/proxy/a%2Fb", 400),
    ("/api/v1/nodes/node%2F..%2Fother/proxy/", 400),
    ("/api/v1/nodes/ftp:node-1:21/proxy/", 400),
    ("/api/v1/nodes/a:b:c:d/proxy/", 400),
    ("/api/v1/nodes/node-1:70000/proxy/", 400),
    ("/api/v1/namespaces/Bad_NS/pods/x/log", 400),
    ("/api/v1/namespaces/default/pods/x/status", 404),
    ("/apis/apps/v1/deployments", 404),
    ("http://example.com/api/v1/nodes/n/proxy/", 400),
])
def test_routes_refused(target: str, status: int) -> None:
    with pytest.raises(RouteError) as err:
        parse(target)
    assert err.value.status == status


@pytest.mark.parametrize(("target", "expected"), [
    ("10.0.0.1:10250", ("10.0.0.1", 10250)),
    ("node-1.example:22", ("node-1.example", 22)),
    ("[fd00::1]:443", ("fd00::1", 443)),
])
def test_connect_authority(target: str, expected: tuple[str, int]) -> None:
    assert parse_authority(target) == expected


@pytest.mark.parametrize("target", ["10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536", ":80", "fd00::1:443", "[fd00::1]",
                                    "[nothex]:80", "a b:80", "host:80x", "a/b:80", "x\r\nInjected: 1:80"])
def test_connect_authority_refused(target: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(target)


def test_policy() -> None:
    policy = Policy(
        node_hosts={"node-1": 10250, "192.0.2.11": 10250},
        node_ports=PortSet.parse(["10255", "30000-30010"]),
        pod_networks=(ipaddress.ip_network("10.244.1.0/24"),),
        pod_ports=PortSet.parse(["8080"]),
        service_hosts={"10.96.0.10": frozenset({80})},
    )
    for host, port in [("node-1", 10250), ("NODE-1.", 10250), ("192.0.2.11", 10255), ("192.0.2.11", 30005),
                       ("10.244.1.7", 8080), ("10.96.0.10", 80)]:
        policy.check(host, port)
    for host, port, why in [("192.0.2.11", 22, "node_ports"), ("10.244.1.7", 22, "pod_ports"),
                            ("10.244.2.7", 8080, "not a node"), ("10.96.0.10", 81, "not a port of the service"),
                            ("169.254.169.254", 80, "not a node"), ("localhost", 10250, "not a node")]:
        with pytest.raises(DestinationNotAllowed, match=why) as err:
            policy.check(host, port)
        assert err.value.status == 403
    with pytest.raises(ValueError):
        PortSet.parse(["0"])
    with pytest.raises(ValueError):
        PortSet.parse(["20-10"])


def test_request_headers_drop_hop_by_hop_and_credentials() -> None:
    request = h11.Request(method="POST", target="/x", headers=[
        ("Host", "gateway"), ("Authorization", "Bearer secret"), ("Connection", "keep-alive, X-Private"),
        ("X-Private", "1"), ("Keep-Alive", "timeout=5"), ("Proxy-Authorization", "Basic x"), ("TE", "trailers"),
        ("Transfer-Encoding", "chunked"), ("Accept", "text/plain"), ("X-Forwarded-For", "203.0.113.9"),
    ])
    out = dict(request_headers(request, "10.244.1.7:8080", "198.51.100.4:5555"))
    assert out[b"host"] == b"10.244.1.7:8080"
    assert out[b"accept"] == b"text/plain"
    assert out[b"x-forwarded-for"] == b"203.0.113.9, 198.51.100.4"
    assert out[b"transfer-encoding"] == b"chunked"  # re-framed by us, not passed through
    for gone in (b"authorization", b"connection", b"x-private", b"keep-alive", b"proxy-authorization", b"te"):
        assert gone not in out


def test_upgrade_request_keeps_upgrade_headers() -> None:
    request = h11.Request(method="GET", target="/exec", headers=[
        ("Host", "g"), ("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Key", "k"),
        ("Sec-WebSocket-Protocol", "v5.channel.k8s.io"),
    ])
    out = request_headers(request, "192.0.2.11:10250", "unix")
    assert (b"connection", b"Upgrade") in out and (b"upgrade", b"websocket") in out
    assert (b"sec-websocket-protocol", b"v5.channel.k8s.io") in out
    assert not any(name == b"x-forwarded-for" for name, _ in out)


def test_response_headers_rewrite_redirects_under_the_proxy_prefix() -> None:
    headers = [(b"location", b"/target"), (b"connection", b"close"), (b"content-type", b"text/html"),
               (b"location", b"//evil.example/x")]
    out = response_headers(headers, "/api/v1/namespaces/default/pods/web-1/proxy")
    assert out == [(b"location", b"/api/v1/namespaces/default/pods/web-1/proxy/target"),
                   (b"content-type", b"text/html"), (b"location", b"//evil.example/x")]


POD = PodInfo("default", "web-1", "node-1", "10.244.1.10", ("app",), (8080,))


def _kubelet(target: str, pod: PodInfo = POD) -> tuple[str, list[tuple[str, str]]]:
    url = urlsplit(_kubelet_path(parse(target), pod))
    return url.path, parse_qsl(url.query)


def test_exec_query_is_translated_as_the_apiserver_does() -> None:
    path, query = _kubelet("/api/v1/namespaces/default/pods/web-1/exec?command=sh&command=-c&command=echo%20hi"
                           "&stdin=true&stdout=true&stderr=false&tty=1")
    assert path == "/exec/default/web-1/app"
    assert query == [("command", "sh"), ("command", "-c"), ("command", "echo hi"), ("input", "1"), ("output", "1"),
                     ("tty", "1")]
    with pytest.raises(RouteError, match="must specify a command"):
        _kubelet("/api/v1/namespaces/default/pods/web-1/exec?stdin=true")


def test_attach_log_and_portforward_translation() -> None:
    assert _kubelet("/api/v1/namespaces/default/pods/web-1/attach?stdout=true&container=app") == (
        "/attach/default/web-1/app", [("output", "1")])
    assert _kubelet("/api/v1/namespaces/default/pods/web-1/log?follow=true&tailLines=10&bogus=1") == (
        "/containerLogs/default/web-1/app", [("follow", "true"), ("tailLines", "10")])
    assert _kubelet("/api/v1/namespaces/default/pods/web-1/portforward?ports=8080,9090&ports=7777") == (
        "/portForward/default/web-1", [("port", "8080,9090,7777")])
    two = PodInfo("default", "web-1", "node-1", "10.244.1.10", ("app", "sidecar"))
    with pytest.raises(RouteError, match="container name must be specified") as err:
        _kubelet("/api/v1/namespaces/default/pods/web-1/log", two)
    assert err.value.status == 400
    with pytest.raises(RouteError, match="not valid for pod") as err:
        _kubelet("/api/v1/namespaces/default/pods/web-1/log?container=other", two)
    assert err.value.status == 404


@pytest.mark.parametrize("query", ["tailLines=abc", "limitBytes=x", "limitBytes=0", "sinceSeconds=-1",
                                   "tailLines=%D9%A1", "tailLines=1e3"])
def test_log_numbers_must_be_integers(query: str) -> None:
    with pytest.raises(BadRequest) as err:
        _kubelet(f"/api/v1/namespaces/default/pods/web-1/log?{query}")
    assert err.value.status == 400
    assert _kubelet("/api/v1/namespaces/default/pods/web-1/log?tailLines=0&limitBytes=1")[1] == [
        ("tailLines", "0"), ("limitBytes", "1")]


def test_pod_list_parsing() -> None:
    body = (b'{"kind":"PodList","items":[{"metadata":{"name":"a","namespace":"ns"},"spec":{"nodeName":"node-1",'
            b'"containers":[{"name":"c1","ports":[{"containerPort":80},{"containerPort":443}]},{"name":"c2"}]},'
            b'"status":{"podIP":"10.244.1.5"}},{"metadata":{"name":"pending"},"spec":{"nodeName":"node-1"},'
            b'"status":{}}]}')
    listed = parse_pod_list("node-1", body, pod_cidrs=[ipaddress.ip_network("10.244.1.0/24")])
    assert listed.pods == [PodInfo("ns", "a", "node-1", "10.244.1.5", ("c1", "c2"), (80, 443), ("10.244.1.5",)),
                           PodInfo("default", "pending", "node-1", "", (), ())]
    assert listed.refused == []


async def test_pod_cache_keeps_known_pods_and_names_unlisted_nodes(caplog: pytest.LogCaptureFixture) -> None:
    nodes = [NodeInfo("node-1", "192.0.2.1"), NodeInfo("node-2", "192.0.2.2"), NodeInfo("node-3", "192.0.2.3")]
    failures: dict[str, Exception] = {}

    async def list_pods(node: NodeInfo) -> list[PodInfo]:
        if node.name in failures:
            raise failures[node.name]
        return [PodInfo("default", f"web-{node.name}", node.name, "10.244.0.1", ("app",))]

    cache = PodCache(Directory(nodes), list_pods, min_refresh=0.0)
    await cache.refresh()
    assert await cache.get("default", "web-node-2") is not None and cache.unlisted == {}
    failures.update({"node-2": TunnelUnavailable("tunnel to node node-2 is connecting"),
                     "node-3": RuntimeError("kubelet answered 500 to GET /pods")})
    with caplog.at_level(logging.INFO, logger="proxy.pods"):
        await cache.refresh()
    assert set(cache.unlisted) == {"node-2", "node-3"}
    assert await cache.get("default", "web-node-2") is not None  # what we knew of an unreachable node is kept
    levels = {r.getMessage().split(": ", 1)[1]: r.levelno for r in caplog.records}
    # a reconnecting tunnel is the pool's to report (and is retried soon); a failing kubelet is a warning
    assert levels == {"tunnel to node node-2 is connecting": logging.INFO,
                      "kubelet answered 500 to GET /pods": logging.WARNING}

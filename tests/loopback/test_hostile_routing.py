"""Hostile request targets through the real fronts (hypothesis, real sockets on 127.x): whatever the path, encoding or
authority, a request for node A reaches node A's allowed port or nothing -- never node B, never another port, never
with a traversal or an injected line in what the upstream receives.

The fronts run on :class:`proxy.server.Server` with a recording :class:`~proxy.dialer.TCPDialer` (no SSH needed to
test routing); two loopback "nodes" record every request head they receive.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from proxy.apiproxy import APIProxyFront
from proxy.authz import Authorizer
from proxy.connect import ConnectFront
from proxy.dialer import Stream, TCPDialer
from proxy.directory import Directory, NodeInfo
from proxy.policy import Policy, PolicyDialer, PortSet
from proxy.server import Limits, Server
from proxy.tls import client_context
from tests import rawhttp
from tests.proxyauth import RAW_HEADER, admin_authenticator

from .conftest import next_base

set_hypothesis_home_dir(tempfile.mkdtemp(prefix="tdhyp"))
SETTINGS = settings(max_examples=60, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

PIECES = st.sampled_from([
    "..", ".", "%2e%2e", "%2E%2e", ".%2e", "%2F", "%2f", "%5c", "\\", "%00", "%0d%0a", "%0a", "%252e%252e", "//",
    "a", "index.html", ":", "@", ";", "~", "%20", "node-b", "api", "v1", "nodes", "proxy", "%c0%ae", "..;", "?", "#",
    "\r\n", " ", "\x00",
])
PATHS = st.lists(st.one_of(PIECES, st.text(alphabet="abc%./:;?#&=2fFeE", max_size=6)), max_size=8).map("/".join)
QUERIES = st.text(alphabet="abc=&%0dDaA2e./?#", max_size=16)


@dataclass
class Recorder:
    """A loopback HTTP "node" that records each request head and answers 200."""

    heads: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            self.heads.append(head)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class RecordingDialer(TCPDialer):
    def __init__(self) -> None:
        super().__init__(timeout=5)
        self.dials: list[tuple[str, int]] = []

    async def dial(self, host: str, port: int) -> Stream:
        self.dials.append((host, port))
        return await super().dial(host, port)


@dataclass
class Bed:
    a: str
    b: str
    port: int
    other_port: int
    nodes: dict[str, Recorder]
    dialer: RecordingDialer
    proxy_port: int
    egress_port: int

    def reset(self) -> None:
        for r in self.nodes.values():
            r.heads.clear()
        self.dialer.dials.clear()


@pytest.fixture
async def bed() -> AsyncIterator[Bed]:
    base = next_base().rsplit(".", 1)[0]
    a, b = f"{base}.1", f"{base}.2"
    recorders = {f"{addr}:{port}": Recorder() for addr in (a, b) for port in (18080, 18081)}
    for key, rec in recorders.items():
        host, port = key.rsplit(":", 1)
        rec.server = await asyncio.start_server(rec.handle, host, int(port))
    dialer = RecordingDialer()
    policy = Policy(node_hosts={"node-a": 10250, a: 10250, "node-b": 10250, b: 10250},
                    node_ports=PortSet.parse([18080]), pod_ports=PortSet())
    directory = Directory([NodeInfo("node-a", a), NodeInfo("node-b", b)])
    checked = PolicyDialer(dialer, policy)
    api = APIProxyFront(checked, directory, authn=admin_authenticator(), authz=Authorizer(),
                        kubelet_tls=client_context(None), target_tls=client_context(None))
    limits = Limits(max_connections=64, header_timeout=5, idle_timeout=5)
    proxy, egress = Server("proxy", api, limits), Server("egress", ConnectFront(checked), limits)
    proxy_port = await proxy.listen_tcp("127.0.0.1", 0, None)
    egress_port = await egress.listen_tcp("127.0.0.1", 0, None)
    try:
        yield Bed(a, b, 18080, 18081, recorders, dialer, proxy_port, egress_port)
    finally:
        await proxy.close()
        await egress.close()
        for rec in recorders.values():
            assert rec.server is not None
            rec.server.close()


def _request_line(head: bytes) -> str:
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    method, target, version = line.split(" ")
    assert method == "GET" and version == "HTTP/1.1", line
    return target


@SETTINGS
@given(path=PATHS, query=QUERIES)
@example(path="%2e%2e/%2e%2e/api/v1/nodes/node-b:18080/proxy/x", query="")
@example(path="..%2f..%2fnode-b", query="")
@example(path="a", query="x=%0d%0aHost:%20node-b")
@example(path="a%0d%0aX-Injected: 1", query="")
async def test_proxy_urls_reach_only_the_named_node_and_port(bed: Bed, path: str, query: str) -> None:
    bed.reset()
    target = f"/api/v1/nodes/node-a:{bed.port}/proxy/{path}" + (f"?{query}" if query else "")
    raw = (b"GET " + target.encode("utf-8", "surrogateescape") + b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
           + RAW_HEADER + b"\r\n")
    answer, _ = await rawhttp.raw("127.0.0.1", bed.proxy_port, raw, timeout=5)
    status = rawhttp.status_of(answer)
    assert status in (200, 400, 404), answer[:300]
    # Only node A's allowed port was ever dialed, and only B's recorders heard nothing.
    assert set(bed.dialer.dials) <= {(bed.a, bed.port)}
    for key, rec in bed.nodes.items():
        if key != f"{bed.a}:{bed.port}":
            assert rec.heads == [], key
    heads = bed.nodes[f"{bed.a}:{bed.port}"].heads
    assert len(heads) == (1 if status == 200 else 0)
    for head in heads:
        forwarded = _request_line(head)
        pth = forwarded.split("?", 1)[0]
        assert all(unquote(s) not in (".", "..") and "/" not in unquote(s) for s in pth.split("/")[1:]), forwarded
        lines = head.split(b"\r\n")
        assert not any(line.lower().startswith(b"x-injected") for line in lines)
        assert sum(line.lower().startswith(b"host:") for line in lines) == 1


@SETTINGS
@given(authority=st.one_of(
    st.text(alphabet="0123456789.:[]abcdefnod-%", max_size=30),
    st.sampled_from(["node-a:18080", "node-b:18080", "node-a:18081", "NODE-A:18080", "node-a.:18080",
                     "127.0.0.1:18080", "[::1]:18080", "node-a:18080@node-b", "node-a%2f:18080"]),
))
@example(authority="node-a:018080")
@example(authority="node-a:18080 HTTP/1.1\r\nX: y")
async def test_connect_dials_only_what_the_policy_allows(bed: Bed, authority: str) -> None:
    bed.reset()
    raw = f"CONNECT {authority} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode("utf-8", "surrogateescape")
    answer, _ = await rawhttp.raw("127.0.0.1", bed.egress_port, raw, timeout=5)
    status = rawhttp.status_of(answer)
    assert status in (200, 400, 403, 502), answer[:300]  # 502: a node name this test's resolver does not know
    allowed = {("node-a", 18080), ("node-b", 18080), (bed.a, 18080), (bed.b, 18080)}
    for host, port in bed.dialer.dials:
        # exactly the spelling the policy checked: NODE-A, node-a. and [::1] are dialed as node-a and ::1
        assert (host, port) in allowed, (authority, host, port)
    if status in (400, 403):
        assert bed.dialer.dials == [], "a refused CONNECT dialed"


async def test_the_bed_routes_plain_requests(bed: Bed) -> None:
    """The properties above are not vacuous: a plain request does reach node A, and CONNECT to it works."""
    raw = (b"GET /api/v1/nodes/node-a:18080/proxy/x/y?z=1 HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
           + RAW_HEADER + b"\r\n")
    answer, _ = await rawhttp.raw("127.0.0.1", bed.proxy_port, raw, timeout=5)
    assert rawhttp.status_of(answer) == 200 and answer.endswith(b"ok")
    assert _request_line(bed.nodes[f"{bed.a}:18080"].heads[0]) == "/x/y?z=1"
    connect = f"CONNECT {bed.b}:18080 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    answer, _ = await rawhttp.raw("127.0.0.1", bed.egress_port, connect, timeout=0.5)
    assert rawhttp.status_of(answer) == 200
    assert bed.dialer.dials[-1] == (bed.b, 18080)

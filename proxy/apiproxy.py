"""The apiserver-style front: proxy URLs for nodes, pods and services, and the pod subresources the kubelet serves.

    /api/v1/nodes/{id}/proxy/...                  -> the node's kubelet (https, kubelet TLS), or another node port
    /api/v1/namespaces/{ns}/pods/{id}/proxy/...   -> the pod's IP (port: given, else its first container port)
    /api/v1/namespaces/{ns}/services/{id}/proxy/... -> an endpoint (target port) or the cluster IP
    /api/v1/namespaces/{ns}/pods/{pod}/log         -> kubelet /containerLogs/{ns}/{pod}/{container}
    /api/v1/namespaces/{ns}/pods/{pod}/exec|attach -> kubelet /exec|/attach/{ns}/{pod}/{container} (upgrade)
    /api/v1/namespaces/{ns}/pods/{pod}/portforward -> kubelet /portForward/{ns}/{pod} (upgrade)

Query parameters are translated as the apiserver does (``stdin=true`` -> ``input=1``, ``ports`` -> ``port``...).
Every request gets a fresh channel to its target, as the apiserver's transports do through an egress proxy; the
dialer checks the destination policy. Failures are raised as typed errors and answered by the server core.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode

import h11

from certs.tokens import Identity
from proxy import kubeapi, wsbridge
from proxy.authn import Authenticator
from proxy.authz import Authorizer, Forbidden, attributes, describe
from proxy.client import get
from proxy.dialer import Dialer
from proxy.directory import Directory, NodeInfo, PodCache, PodConflict, PodInfo
from proxy.errors import BadRequest, RouteError, UpstreamError, UpstreamTimeout
from proxy.forward import Upstream, _Upstream, forward, open_upstream, receive_head, relay_body
from proxy.framing import is_upgrade
from proxy.podlist import MAX_POD_LIST_BYTES, PodListRefused, parse_pod_list
from proxy.routes import Route, parse
from proxy.server import Exchange

log = logging.getLogger("proxy.api")
audit = logging.getLogger("proxy.audit")

PROXY_METHODS = frozenset({b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})
STREAM_METHODS = frozenset({b"GET", b"POST"})
LOG_PARAMS = ("follow", "previous", "timestamps", "sinceSeconds", "sinceTime", "tailLines", "limitBytes", "stream")
LOG_NUMBERS = {"sinceSeconds": 1, "tailLines": 0, "limitBytes": 1}
"""Log parameters that must be integers, and the least value each may take (as the apiserver validates them)."""
EXEC_FLAGS = (("stdin", "input"), ("stdout", "output"), ("stderr", "error"), ("tty", "tty"))


def _true(value: str) -> bool:
    return value.lower() in ("1", "true", "yes")


class APIProxyFront:
    """Serves the proxy URLs and pod subresources through a :class:`Dialer`."""

    def __init__(
        self, dialer: Dialer, directory: Directory, *, authn: Authenticator, authz: Authorizer,
        kubelet_tls: ssl.SSLContext, target_tls: ssl.SSLContext, pods_refresh: float = 30.0,
        response_timeout: float = 60.0, node_states: kubeapi.NodeStates = dict, gateway_version: str = "0",
    ) -> None:
        self.authn = authn
        self.authz = authz
        """Who is calling, and what they may do: every request passes both before anything is resolved."""
        self.node_states = node_states
        """The tunnels' states by node name (a Node's Ready condition), from the daemon."""
        self.gateway_version = gateway_version
        self.dialer = dialer
        self.directory = directory
        self.kubelet_tls = kubelet_tls
        self.target_tls = target_tls
        self.response_timeout = response_timeout
        self.pods = PodCache(directory, self._list_pods, refresh=pods_refresh)

    def kubelet(self, node: NodeInfo) -> Upstream:
        return Upstream(node.address, node.kubelet_port, self.kubelet_tls, (node.address, node.name),
                        f"kubelet of node {node.name}")

    async def _list_pods(self, node: NodeInfo) -> list[PodInfo]:
        status, body = await fetch(self.dialer, self.kubelet(node), "/pods", self.response_timeout)
        if status != 200:
            raise UpstreamError(f"kubelet answered {status} to GET /pods")
        listed = parse_pod_list(node.name, body, address=node.address, pod_cidrs=node.pod_cidrs)
        for reason in listed.refused[:10]:
            audit.warning("pod refused from the kubelet of node %s: %s", node.name, reason, extra={"node": node.name})
        if len(listed.refused) > 10:
            audit.warning("%d more pods refused from the kubelet of node %s", len(listed.refused) - 10, node.name,
                          extra={"node": node.name})
        return listed.pods

    async def __call__(self, ex: Exchange) -> None:
        while True:
            request = await ex.request()
            if request is None:
                return
            if not await self.handle(ex, request) or not ex.reusable:
                return
            ex.next_cycle()

    async def handle(self, ex: Exchange, request: h11.Request) -> bool:
        """Serve one request; True when the connection may carry another. Raises :class:`~proxy.errors.ProxyError`."""
        identity = await self.authn.authenticate(ex.writer, request)  # before anything else: 401
        read = kubeapi.read_route(request.target.decode("ascii", "replace"))
        if read is not None:
            if read.resource and not self.authz.allows(identity, read.resource, read.verb):  # discovery is free
                raise Forbidden(identity, f"{read.verb} {read.resource} {read.path}", self.authz.source)
            return await self.read(ex, request, read)
        route = parse(request.target.decode("ascii", "replace"))
        self._authorise(identity, route, request.method)  # before any pod is looked up or channel opened: 403
        up, path, upgrade_required = await self._resolve(route, request)
        if upgrade_required and not is_upgrade(request):
            raise BadRequest("Upgrade request required")
        protocols = wsbridge.offered(request)
        if (route.kind in ("exec", "attach") and wsbridge.V5 in protocols) or (
                route.kind == "portforward" and wsbridge.TUNNEL in protocols):
            return await self._bridge(ex, request, route, up, path)
        prefix = route.prefix if route.kind in ("node", "pod", "service") else None
        return await forward(ex, request, self.dialer, up, path, location_prefix=prefix,
                             response_timeout=self.response_timeout)

    def _authorise(self, identity: Identity, route: Route, method: bytes) -> None:
        """Raise :class:`~proxy.authz.Forbidden` unless the rule table allows the request."""
        resource, verb = attributes(route, method)
        if not self.authz.allows(identity, resource, verb):
            raise Forbidden(identity, f"{verb} {resource} {describe(route)}", self.authz.source)

    async def _bridge(self, ex: Exchange, request: h11.Request, route: Route, up: Upstream, path: str) -> bool:
        """A WebSocket client, a SPDY kubelet (:mod:`proxy.wsbridge`): upgrade to the kubelet first, then answer the
        client's handshake; a kubelet's refusal is relayed as it came."""
        exec_like = route.kind != "portforward"
        protocol = wsbridge.V5 if exec_like else wsbridge.TUNNEL
        accept = wsbridge.accept_headers(request, protocol)
        if not ex.empty_body(request):
            raise BadRequest("a WebSocket upgrade carries no body")
        stream = await open_upstream(self.dialer, up)
        try:
            upstream = _Upstream(stream, up, ex.limits.idle_timeout)
            version = "v4.channel.k8s.io" if exec_like else "portforward.k8s.io"
            await upstream.send(upstream.head(b"POST", path.encode(), [
                (b"host", up.authority.encode()), (b"connection", b"Upgrade"), (b"upgrade", b"SPDY/3.1"),
                (b"x-stream-protocol-version", version.encode()), (b"content-length", b"0")], upgrade=True))
            event = await receive_head(upstream, None, self.response_timeout)
            if event.status_code != 101:
                await relay_body(ex, request, upstream, event, None, None)
                return False
            await ex.send(h11.InformationalResponse(status_code=101, headers=accept))
            log.info("%s: WebSocket %s from the client, SPDY %s to %s", route.kind, protocol, version, up.what,
                     extra={"peer": str(ex.peer)})
            assert upstream.response is not None
            leftover = upstream.response.trailing
            if exec_like:
                flags = {k for k, v in parse_qsl(path.partition("?")[2]) if v == "1"}
                await wsbridge.translate_exec(ex, stream, leftover, flags)
            else:
                await wsbridge.tunnel(ex, stream, leftover)
            return False
        finally:
            await stream.close()

    async def read(self, ex: Exchange, request: h11.Request, read: kubeapi.ReadRoute) -> bool:
        """Answer a read of the API surface (:mod:`proxy.kubeapi`)."""
        if request.method not in (b"GET", b"HEAD"):
            raise RouteError(405, f"method {request.method.decode()} not allowed: tunneld's API is read-only")
        if not ex.empty_body(request):
            raise BadRequest("a GET carries no body")
        doc = await self._document(read)
        as_table = read.kind in ("nodes", "pods") and doc["kind"].endswith("List") and any(
            n == b"accept" and b"as=table" in v.lower() for n, v in request.headers)
        if as_table:
            doc = kubeapi.table(read.kind, doc["items"])
        data = kubeapi.body(doc)
        await ex.send(h11.Response(status_code=200, headers=[("Content-Type", "application/json"),
                                                             ("Content-Length", str(len(data)))]),
                      h11.Data(data=data if request.method == b"GET" else b""), h11.EndOfMessage())
        return True

    async def _document(self, read: kubeapi.ReadRoute) -> dict[str, Any]:
        if read.kind == "version":
            return kubeapi.version(self.gateway_version)
        if read.kind == "discovery":
            return kubeapi.discovery(read.path)
        only = kubeapi.node_selector(read.query)
        if read.kind == "nodes":
            states: dict[str, kubeapi.NodeTunnel] = dict(self.node_states())
            if read.name is not None:
                node = self.directory.nodes.get(read.name)
                if node is None:
                    raise RouteError(404, f'nodes "{read.name}" not found')
                return kubeapi.node_object(node, states.get(node.name))
            return kubeapi.listing("nodes", [n for n in kubeapi.nodes(self.directory, states)
                                     if only is None or n["metadata"]["name"] == only])
        if read.name is not None:
            assert read.namespace is not None
            try:
                pod = await self.pods.get(read.namespace, read.name)
            except PodConflict as exc:
                raise RouteError(502, str(exc)) from exc
            if pod is None:
                raise RouteError(404, f'pods "{read.name}" not found')
            return kubeapi.pod_object(pod)
        pods = [p for p in await self.pods.listed()
                if (read.namespace is None or p.namespace == read.namespace) and (only is None or p.node == only)]
        return kubeapi.listing("pods", [kubeapi.pod_object(p) for p in pods])

    async def _resolve(self, route: Route, request: h11.Request) -> tuple[Upstream, str, bool]:
        methods = PROXY_METHODS if route.kind in ("node", "pod", "service") else STREAM_METHODS
        if route.kind == "log":
            methods = frozenset({b"GET"})
        if request.method not in methods:
            raise RouteError(405, f"method {request.method.decode()} not allowed here")
        query = f"?{route.query}" if route.query else ""
        if route.kind == "node":
            node = self.directory.nodes.get(route.name)
            if node is None:
                raise RouteError(404, f"node {route.name!r} not found")
            if not route.port or route.port == str(node.kubelet_port):
                return self.kubelet(node), route.path + query, False
            up = self._plain(route, node.address, (node.address, node.name), f"node {node.name}")
            return up, route.path + query, False
        if route.kind == "service":
            return self._service(route), route.path + query, False
        assert route.namespace is not None
        try:
            pod = await self.pods.get(route.namespace, route.name)
        except PodConflict as exc:
            raise RouteError(502, str(exc)) from exc
        if pod is None and self.pods.unlisted:
            # Not a 404: the pod may live on a node whose kubelet we could not ask.
            nodes = ", ".join(sorted(self.pods.unlisted))
            raise RouteError(503, f"pod {route.namespace}/{route.name} not found, but the pods of node(s) {nodes} "
                                  "could not be listed; try again")
        if pod is None:
            raise RouteError(404, f"pod {route.namespace}/{route.name} not found")
        if route.kind == "pod":
            if not pod.ip:
                raise RouteError(503, f"pod {route.namespace}/{route.name} has no IP yet")
            return self._plain(route, pod.ip, (pod.ip, pod.name), f"pod {pod.namespace}/{pod.name}",
                               default=pod.ports[0] if pod.ports else None), route.path + query, False
        node = self.directory.nodes.get(pod.node)
        if node is None:
            raise RouteError(503, f"node {pod.node!r} of pod {pod.namespace}/{pod.name} is not in the inventory")
        return self.kubelet(node), _kubelet_path(route, pod), route.kind != "log"

    def _plain(self, route: Route, host: str, identities: tuple[str, ...], what: str,
               default: int | None = None) -> Upstream:
        if route.port and not route.port.isdigit():
            raise RouteError(400, f"named port {route.port!r} is not supported here; use the port number")
        port = int(route.port) if route.port else default or (443 if route.scheme == "https" else 80)
        tls = self.target_tls if route.scheme == "https" else None
        return Upstream(host, port, tls, identities, what)

    def _service(self, route: Route) -> Upstream:
        assert route.namespace is not None
        svc = self.directory.services.get((route.namespace, route.name))
        if svc is None:
            raise RouteError(404, f"service {route.namespace}/{route.name} not found")
        if route.port:
            port = next((p for p in svc.ports if str(p.port) == route.port or p.name == route.port), None)
            if port is None:
                raise RouteError(503, f"no service port {route.port} found for service {svc.name!r}")
        else:
            port = svc.ports[0]
        dns = (f"{svc.name}.{svc.namespace}.svc", f"{svc.name}.{svc.namespace}.svc.cluster.local", svc.name)
        tls = self.target_tls if route.scheme == "https" else None
        what = f"service {svc.namespace}/{svc.name}"
        if svc.endpoints:
            ep = random.choice(svc.endpoints)
            return Upstream(ep, port.target_port, tls, (ep, *dns), what)
        assert svc.cluster_ip is not None
        return Upstream(svc.cluster_ip, port.port, tls, (svc.cluster_ip, *dns), what)


def _container(route: Route, pod: PodInfo, params: dict[str, list[str]]) -> str:
    name = (params.get("container") or [""])[0]
    if not name:
        if len(pod.containers) != 1:
            raise RouteError(400, f"a container name must be specified for pod {pod.name}, choose one of: "
                                  f"[{' '.join(pod.containers)}]")
        return pod.containers[0]
    if name not in pod.containers:
        raise RouteError(404, f"container {name} is not valid for pod {pod.name}")
    return name


def _kubelet_path(route: Route, pod: PodInfo) -> str:
    """The kubelet URL (path and query) for a pod subresource, translated as the apiserver does."""
    params: dict[str, list[str]] = {}
    for key, value in parse_qsl(route.query, keep_blank_values=True):
        params.setdefault(key, []).append(value)
    ns, name = quote(pod.namespace, safe=""), quote(pod.name, safe="")
    out: list[tuple[str, str]] = []
    if route.kind == "portforward":
        ports = [p for v in params.get("ports", []) + params.get("port", []) for p in v.split(",") if p]
        if ports:
            out.append(("port", ",".join(ports)))
        path = f"/portForward/{ns}/{name}"
    else:
        container = quote(_container(route, pod, params), safe="")
        if route.kind == "log":
            out = [(k, params[k][0]) for k in LOG_PARAMS if k in params and params[k][0]]
            for key, least in LOG_NUMBERS.items():
                value = (params.get(key) or [""])[0]
                if value and (not value.isascii() or not value.isdigit() or int(value) < least):
                    raise BadRequest(f"{key} must be an integer of at least {least}, not {value[:40]!r}")
            path = f"/containerLogs/{ns}/{name}/{container}"
        else:
            if route.kind == "exec":
                commands = params.get("command", [])
                if not commands:
                    raise RouteError(400, "you must specify a command")
                out = [("command", c) for c in commands]
            out += [(kubelet, "1") for api, kubelet in EXEC_FLAGS if _true((params.get(api) or ["false"])[0])]
            path = f"/{route.kind}/{ns}/{name}/{container}"
    return path + ("?" + urlencode(out, quote_via=quote) if out else "")


async def fetch(dialer: Dialer, up: Upstream, path: str, timeout: float) -> tuple[int, bytes]:
    """A GET to ``up`` through the tunnels; returns (status, body). Raises :class:`~proxy.errors.ProxyError` on
    failure or an oversized body."""
    stream = await open_upstream(dialer, up)
    try:
        async with asyncio.timeout(timeout):
            status, body, complete = await get(stream, up.authority, path, max_body=MAX_POD_LIST_BYTES,
                                               headers=[("Accept", "application/json")])
    except TimeoutError as exc:
        raise UpstreamTimeout(f"{up.what} did not answer GET {path} within {timeout:g}s") from exc
    finally:
        await stream.close()
    if not complete:
        raise PodListRefused(f"response from {up.what} is larger than {MAX_POD_LIST_BYTES} bytes")
    return status, body

"""A kubelet-like server for simulated nodes: just enough of the kubelet's API to exercise the gateway.

HTTPS on the kubelet port:

* ``/healthz``; ``/pods`` (a PodList; the pod's ports under ``spec.containers[0].ports[].containerPort``);
* ``/containerLogs/{ns}/{pod}/{container}`` (``follow``, ``tailLines``, ``timestamps``);
* ``/exec/{ns}/{pod}/{container}?command=..&input=1&output=1&error=1&tty=1`` and ``/attach/{ns}/{pod}/{container}``
  (GET or POST) over WebSocket with the channel protocols of :mod:`tunneld.dev.channels`; ``attach`` behaves like
  ``cat`` (the container's main process echoes stdin);
* ``/portForward/{ns}/{pod}?port=P[&port=Q]`` (or ``port=P,Q``) over WebSocket: each port's bytes go to a new TCP
  connection to that pod port;
* the same three with ``Upgrade: SPDY/3.1``: SPDY/3.1 sessions with the kubelet's stream semantics
  (:mod:`tunneld.dev.spdy`, :mod:`tunneld.dev.spdyserve`).

The protocols accepted are exactly a kubelet 1.32's with default feature gates: WebSocket subprotocols
:data:`~tunneld.dev.channels.EXEC_PROTOCOLS` / :data:`~tunneld.dev.channels.PORTFORWARD_PROTOCOLS` (never
``v5.channel.k8s.io``), SPDY versions :data:`~tunneld.dev.spdyserve.EXEC_SPDY` /
:data:`~tunneld.dev.spdyserve.PORTFORWARD_SPDY`. Each pod has an in-memory filesystem
(:mod:`tunneld.dev.containerfs`) its commands (:mod:`tunneld.dev.commands`) share, so ``kubectl cp`` works.

Unknown pod or container: 404. A stream endpoint without an ``Upgrade``: 400. No acceptable WebSocket subprotocol:
403, as the kubelet's WebSocket handshake answers; no acceptable SPDY version: 403; none offered: 400.
Plain HTTP on the healthz port: ``/healthz``, as the real kubelet's ``--healthz-port`` on its loopback.

Every pod runs the apps of :mod:`tunneld.dev.podapps`. In the dev cluster they listen on the node's address with
ephemeral ports and :meth:`KubeletSim.resolve` maps (pod IP, pod port) to them; with ``bind_pods_on_ip`` (inside a
network namespace holding the pod addresses) they listen on the pod IPs and ports themselves.

``python -m tunneld.dev.kubelet --help`` runs one simulated kubelet (for network-namespace test beds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import logging
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import h11
from aiohttp import web

from tunneld.dev.channels import (
    EXEC_PROTOCOLS,
    MAX_MESSAGE,
    PORTFORWARD_PROTOCOLS,
    ChannelConn,
    negotiate,
    offered_protocols,
    portforward_session,
)
from tunneld.dev.commands import exec_session
from tunneld.dev.containerfs import ContainerFS, seed
from tunneld.dev.pki import server_context
from tunneld.dev.podapps import DEFAULT_PORTS, PodApps, PodIdentity
from tunneld.dev.spdy import Refusal, SPDYRoute, UpgradeFront
from tunneld.dev.spdyserve import EXEC_SPDY, PORTFORWARD_SPDY, ExecRequest, serve_exec, serve_portforward

LOG_LINES = 20
SHUTDOWN_TIMEOUT = 1.0

log = logging.getLogger("tunneld.dev.kubelet")


@dataclass
class SimPod:
    """A pod on a simulated node."""

    namespace: str
    name: str
    containers: list[str]
    ip: str = ""
    ports: list[int] = field(default_factory=lambda: list(DEFAULT_PORTS))
    """Container ports (reported on the first container); 8080, 8443 and 7777 have apps behind them."""
    pod_tls: ssl.SSLContext | None = None
    """Serving context of the pod's HTTPS app (falls back to the kubelet's ``pod_tls``)."""
    fs: ContainerFS = field(default_factory=ContainerFS)
    """The pod's filesystem (one for all its containers)."""

    def __post_init__(self) -> None:
        seed(self.fs, self.name, self.containers[0] if self.containers else "")


def _norm(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return host.lower()


def _parse_ports(values: list[str]) -> list[int]:
    ports = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item.isdigit() or not 0 < int(item) < 65536:
                raise web.HTTPBadRequest(text=f"invalid port {item!r}\n")
            ports.append(int(item))
    if not ports:
        raise web.HTTPBadRequest(text="query parameter \"port\" is required for port forwarding\n")
    return ports


@dataclass
class KubeletSim:
    """One node's kubelet. Start with :meth:`start`, stop with :meth:`close`."""

    node: str
    address: str
    port: int = 10250
    healthz_port: int = 10248
    tls: ssl.SSLContext | None = None
    pods: list[SimPod] = field(default_factory=list)
    healthy: bool = True
    pod_tls: ssl.SSLContext | None = None
    """Default serving context for pods' HTTPS apps."""
    bind_pods_on_ip: bool = False
    """Serve pod apps on ``pod.ip:port`` (needs the addresses, e.g. in a network namespace) instead of ephemeral ports
    on :attr:`address`."""
    healthz_address: str | None = None
    """Where the healthz port listens (default: :attr:`address`)."""
    extra_items: list[object] = field(default_factory=list)
    """Raw items appended to ``/pods`` as they are (tests play a compromised node's kubelet with these)."""
    _runners: list[web.AppRunner] = field(default_factory=list)
    _front: asyncio.Server | None = None
    _upgraded: set[asyncio.Task[None]] = field(default_factory=set)
    _sessions: int = 0
    _apps: list[PodApps] = field(default_factory=list)
    _targets: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)

    @property
    def open_streams(self) -> int:
        """Exec, attach and port-forward sessions running now (WebSocket and SPDY), as a kubelet would count them."""
        return self._sessions + len(self._upgraded)

    # --- lookups ---------------------------------------------------------------------------------------------

    def find_pod(self, namespace: str, name: str) -> SimPod | None:
        """The pod ``namespace/name`` on this node, if any."""
        return next((p for p in self.pods if p.namespace == namespace and p.name == name), None)

    def resolve(self, host: str, port: int) -> tuple[str, int] | None:
        """Where the app of pod IP ``host``, pod port ``port`` really listens; None if no app is there."""
        return self._targets.get((_norm(host), port))

    def _connector(self, pod: SimPod) -> Callable[[int], Awaitable[tuple[asyncio.StreamReader,
                                                                          asyncio.StreamWriter]]]:
        async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            target = self.resolve(pod.ip, port)
            if target is None:
                raise ConnectionRefusedError(f"dial tcp {pod.ip}:{port}: connect: connection refused")
            return await asyncio.open_connection(*target)
        return connect

    def _spdy_route(self, request: h11.Request) -> SPDYRoute | Refusal | None:
        """How to serve a SPDY upgrade to ``request``'s URL; None for URLs that are not stream endpoints."""
        if request.method not in (b"GET", b"POST"):
            return None
        split = urlsplit(request.target.decode("latin-1"))
        parts = [unquote(s) for s in split.path.split("/")[1:]]
        query = parse_qs(split.query, keep_blank_values=True)
        flag = {k: (query.get(k) or [""])[0] in ("1", "true") for k in ("input", "output", "error", "tty")}
        if len(parts) == 4 and parts[0] in ("exec", "attach"):
            pod = self.find_pod(parts[1], parts[2])
            if pod is None or parts[3] not in pod.containers:
                return Refusal(404, f"container {parts[1]}/{parts[2]}/{parts[3]} not found")
            argv = ["cat"] if parts[0] == "attach" else query.get("command", [])
            if not argv:
                return Refusal(400, "you must specify a command")
            if not (flag["input"] or flag["output"] or flag["error"]):
                return Refusal(400, "you must specify at least 1 of stdin, stdout, stderr")
            req = ExecRequest(argv, flag["input"], flag["output"], flag["error"], flag["tty"], pod.fs)
            return SPDYRoute(EXEC_SPDY, lambda session, incoming: serve_exec(session, incoming, req))
        if len(parts) == 3 and parts[0] == "portForward":
            found = self.find_pod(parts[1], parts[2])
            if found is None:
                return Refusal(404, f"pod {parts[1]}/{parts[2]} not found")
            connect, describe = self._connector(found), f"{found.namespace}/{found.name}"
            return SPDYRoute(PORTFORWARD_SPDY,
                             lambda session, incoming: serve_portforward(session, incoming, connect, describe))
        return None

    # --- plain endpoints -------------------------------------------------------------------------------------

    def _log_line(self, pod: str, container: str, n: int, timestamps: bool) -> str:
        line = f"{self.node}/{pod}/{container} line {n}"
        if timestamps:
            line = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ ") + line
        return line + "\n"

    async def _healthz(self, request: web.Request) -> web.Response:
        if not self.healthy:
            return web.Response(status=500, text="unhealthy")
        return web.Response(text="ok")

    async def _pods(self, request: web.Request) -> web.Response:
        items = []
        for p in self.pods:
            containers: list[dict[str, object]] = [{"name": c} for c in p.containers]
            if containers and p.ports:
                containers[0]["ports"] = [{"containerPort": port, "protocol": "TCP"} for port in p.ports]
            items.append({
                "metadata": {"name": p.name, "namespace": p.namespace},
                "spec": {"nodeName": self.node, "containers": containers},
                "status": {"phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}] if p.ip else []},
            })
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "items": [*items, *self.extra_items]})

    def _container(self, request: web.Request) -> tuple[SimPod, str]:
        ns, pod, container = (request.match_info[k] for k in ("ns", "pod", "container"))
        found = self.find_pod(ns, pod)
        if found is None or container not in found.containers:
            raise web.HTTPNotFound(text=f"container {ns}/{pod}/{container} not found\n")
        return found, container

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        found, container = self._container(request)
        q = request.query
        timestamps = q.get("timestamps") == "true"
        tail = int(q["tailLines"]) if q.get("tailLines", "").isdigit() else LOG_LINES
        first = max(LOG_LINES - tail, 0)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        try:
            for n in range(first, LOG_LINES):
                await resp.write(self._log_line(found.name, container, n, timestamps).encode())
            if q.get("follow") == "true":
                n = LOG_LINES
                while True:  # until the client goes away (the write raises)
                    await asyncio.sleep(0.2)
                    await resp.write(self._log_line(found.name, container, n, timestamps).encode())
                    n += 1
            await resp.write_eof()
        except ConnectionResetError:  # the client stopped reading (Ctrl-C on `logs -f`): the normal end of a follow
            log.debug("log follow of %s/%s ended by the client", found.name, container)
        return resp

    # --- streaming endpoints ---------------------------------------------------------------------------------

    async def _websocket(self, request: web.Request, supported: tuple[str, ...]) -> ChannelConn:
        """Accept the WebSocket with our preferred subprotocol among the client's; 400 otherwise."""
        upgrade = request.headers.get("Upgrade", "").lower()
        if not upgrade:
            raise web.HTTPBadRequest(text="Upgrade request required\n")
        if upgrade != "websocket":
            raise web.HTTPBadRequest(text="unsupported upgrade: use websocket, or SPDY/3.1 with "
                                          "X-Stream-Protocol-Version\n")
        offered = offered_protocols(request.headers)
        protocol = negotiate(offered, supported)
        if protocol is None:
            raise web.HTTPForbidden(text=f"requested protocol(s) are not supported: {offered}; supports "
                                         f"{list(supported)}\n")
        ws = web.WebSocketResponse(protocols=[protocol] if protocol else [], max_msg_size=MAX_MESSAGE)
        await ws.prepare(request)
        return ChannelConn(ws, protocol)

    async def _exec(self, request: web.Request) -> web.StreamResponse:
        pod, _ = self._container(request)  # 404 unless the pod and container exist
        if request.path.startswith("/attach/"):
            argv, stdin = ["cat"], True
        else:
            argv = request.query.getall("command", [])
            if not argv:
                raise web.HTTPBadRequest(text="you must specify a command\n")
            stdin = request.query.get("input") in ("1", "true")
        conn = await self._websocket(request, EXEC_PROTOCOLS)
        self._sessions += 1
        try:
            await exec_session(conn, argv, stdin, pod.fs)
        finally:
            self._sessions -= 1
        return conn.ws

    async def _portforward(self, request: web.Request) -> web.StreamResponse:
        ns, name = request.match_info["ns"], request.match_info["pod"]
        pod = self.find_pod(ns, name)
        if pod is None:
            raise web.HTTPNotFound(text=f"pod {ns}/{name} not found\n")
        ports = _parse_ports(parse_qs(request.query_string).get("port", []))
        conn = await self._websocket(request, PORTFORWARD_PROTOCOLS)
        self._sessions += 1
        try:
            await portforward_session(conn, ports, self._connector(pod), f"{ns}/{name}")
        finally:
            self._sessions -= 1
        return conn.ws

    # --- lifecycle -------------------------------------------------------------------------------------------

    async def _start_pod_apps(self) -> None:
        for pod in self.pods:
            if not pod.ip:
                continue
            apps = PodApps(PodIdentity(self.node, pod.namespace, pod.name), pod.ip, pod.ports, self.address,
                           pod.pod_tls or self.pod_tls, self.bind_pods_on_ip)
            self._apps.append(apps)
            await apps.start()
            for port, where in apps.listening.items():
                self._targets[(_norm(pod.ip), port)] = where

    async def start(self) -> None:
        """Listen on the kubelet and healthz ports and start every pod's apps."""
        try:
            await self._start_pod_apps()
            main = web.Application()
            main.add_routes([
                web.get("/healthz", self._healthz),
                web.get("/pods", self._pods),
                web.get("/containerLogs/{ns}/{pod}/{container}", self._logs),
                *(web.route(m, f"/{kind}/{{ns}}/{{pod}}/{{container}}", self._exec)
                  for m in ("GET", "POST") for kind in ("exec", "attach")),
                web.get("/portForward/{ns}/{pod}", self._portforward),
                web.post("/portForward/{ns}/{pod}", self._portforward),
            ])
            runner = web.AppRunner(main, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
            await runner.setup()
            self._runners.append(runner)
            server = runner.server
            assert server is not None
            loop = asyncio.get_running_loop()
            self._front = await loop.create_server(
                lambda: UpgradeFront(server, self._spdy_route, self._upgraded),  # type: ignore[arg-type]  # aiohttp's Server is a protocol factory, typed narrower
                self.address, self.port, ssl=self.tls,
            )
            health = web.Application()
            health.add_routes([web.get("/healthz", self._healthz)])
            runner = web.AppRunner(health, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
            await runner.setup()
            self._runners.append(runner)
            await web.TCPSite(runner, self.healthz_address or self.address, self.healthz_port).start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Stop listening, cut open connections (SPDY sessions included), stop the pod apps."""
        if self._front is not None:
            self._front.close()
        for task in list(self._upgraded):
            task.cancel()
        await asyncio.gather(*self._upgraded, return_exceptions=True)
        self._upgraded.clear()
        for runner in self._runners:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        self._runners.clear()
        if self._front is not None:
            with contextlib.suppress(Exception):
                await self._front.wait_closed()
            self._front = None
        for apps in self._apps:
            await apps.close()
        self._apps.clear()
        self._targets.clear()


# --- command line (one kubelet inside a network namespace) ---------------------------------------------------


def parse_pod(spec: str) -> SimPod:
    """``NS/NAME/IP[/container,container]`` -> a :class:`SimPod` (default container ``app``)."""
    parts = spec.split("/")
    if len(parts) not in (3, 4) or not all(parts[:3]):
        raise argparse.ArgumentTypeError(f"{spec!r}: expected NS/NAME/IP[/container,container]")
    try:
        ipaddress.ip_address(parts[2])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{spec!r}: {parts[2]!r} is not an IP address") from None
    containers = [c for c in parts[3].split(",") if c] if len(parts) == 4 else ["app"]
    if not containers:
        raise argparse.ArgumentTypeError(f"{spec!r}: empty container list")
    return SimPod(parts[0], parts[1], containers, parts[2])


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m tunneld.dev.kubelet`` command line."""
    p = argparse.ArgumentParser(
        prog="python -m tunneld.dev.kubelet",
        description="Run one simulated kubelet (pod apps bound on the pod IPs). Prints 'ready' once listening.",
    )
    p.add_argument("--node", required=True, help="node name")
    p.add_argument("--address", required=True, help="address of the kubelet port")
    p.add_argument("--port", type=int, default=10250, help="kubelet (HTTPS) port (default 10250)")
    p.add_argument("--healthz-port", type=int, default=10248, help="plain HTTP healthz port (default 10248)")
    p.add_argument("--healthz-address", default="127.0.0.1",
                   help="address of the healthz port (default 127.0.0.1, like the kubelet's)")
    p.add_argument("--cert", required=True, type=Path, help="kubelet serving certificate (PEM)")
    p.add_argument("--key", required=True, type=Path, help="its private key (PEM)")
    p.add_argument("--pod-cert", type=Path, help="serving certificate of the pods' HTTPS apps (PEM)")
    p.add_argument("--pod-key", type=Path, help="its private key (PEM)")
    p.add_argument("--pod", dest="pods", action="append", type=parse_pod, default=[], metavar="NS/NAME/IP[/C,C]",
                   help="a pod (repeatable); its apps listen on IP:8080 (HTTP), IP:8443 (HTTPS), IP:7777 (echo)")
    return p


async def _serve(args: argparse.Namespace) -> int:
    pod_tls = server_context(args.pod_cert, args.pod_key) if args.pod_cert else None
    kubelet = KubeletSim(
        args.node, args.address, args.port, args.healthz_port, server_context(args.cert, args.key), args.pods,
        pod_tls=pod_tls, bind_pods_on_ip=True, healthz_address=args.healthz_address,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await kubelet.start()
    try:
        print("ready", flush=True)
        await stop.wait()
    finally:
        await kubelet.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tunneld.dev.kubelet``."""
    args = build_parser().parse_args(argv)
    if bool(args.pod_cert) != bool(args.pod_key):
        build_parser().error("--pod-cert and --pod-key go together")
    return asyncio.run(_serve(args))


if __name__ == "__main__":
    sys.exit(main())

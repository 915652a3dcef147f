"""A kubelet-like server for simulated nodes: just enough of the kubelet's API to exercise the gateway.

HTTPS on the kubelet port: ``/healthz``, ``/pods`` (a PodList), ``/containerLogs/{ns}/{pod}/{container}``
(``follow``, ``tailLines``, ``timestamps``). Plain HTTP on the healthz port: ``/healthz``, as the real kubelet's
``--healthz-port`` on its loopback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from dataclasses import dataclass, field

from aiohttp import web

LOG_LINES = 20


@dataclass
class SimPod:
    namespace: str
    name: str
    containers: list[str]
    ip: str = ""


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
    _runners: list[web.AppRunner] = field(default_factory=list)

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
        items = [
            {
                "metadata": {"name": p.name, "namespace": p.namespace},
                "spec": {"nodeName": self.node, "containers": [{"name": c} for c in p.containers]},
                "status": {"phase": "Running", "podIP": p.ip},
            }
            for p in self.pods
        ]
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "items": items})

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        ns, pod, container = (request.match_info[k] for k in ("ns", "pod", "container"))
        found = next((p for p in self.pods if p.namespace == ns and p.name == pod), None)
        if found is None or container not in found.containers:
            raise web.HTTPNotFound(text=f"container {ns}/{pod}/{container} not found\n")
        q = request.query
        timestamps = q.get("timestamps") == "true"
        tail = int(q["tailLines"]) if q.get("tailLines", "").isdigit() else LOG_LINES
        first = max(LOG_LINES - tail, 0)
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        await resp.prepare(request)
        for n in range(first, LOG_LINES):
            await resp.write(self._log_line(pod, container, n, timestamps).encode())
        if q.get("follow") == "true":
            n = LOG_LINES
            while True:  # until the client goes away (the write raises)
                await asyncio.sleep(0.2)
                await resp.write(self._log_line(pod, container, n, timestamps).encode())
                n += 1
        await resp.write_eof()
        return resp

    async def start(self) -> None:
        main = web.Application()
        main.add_routes([
            web.get("/healthz", self._healthz),
            web.get("/pods", self._pods),
            web.get("/containerLogs/{ns}/{pod}/{container}", self._logs),
        ])
        health = web.Application()
        health.add_routes([web.get("/healthz", self._healthz)])
        for app, port, tls in ((main, self.port, self.tls), (health, self.healthz_port, None)):
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, self.address, port, ssl_context=tls).start()
            self._runners.append(runner)

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

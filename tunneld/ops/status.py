"""The local status API (aiohttp): what operators, ``tunneld status`` and Prometheus read.

``GET /gateway`` -> gateway-wide facts (version, pid, last reload, ...); ``GET /tunnels`` -> ``{"gateway": {...},
"tunnels": [...]}``; ``GET /tunnels/{node}`` -> one tunnel;
``GET /livez``, ``/readyz``, ``/healthz`` (``?verbose``, see :mod:`tunneld.ops.readiness`); ``GET /metrics`` (Prometheus
text format, see :mod:`tunneld.ops.metrics`). Served on a unix socket (default) and/or a loopback TCP address.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from aiohttp import web

from netnames import split_host_port
from proxy.unixsock import OwnedSocket, prepare_socket_path
from tunneld.config import StatusSettings
from tunneld.ops.metrics import CONTENT_TYPE, Metrics
from tunneld.ops.readiness import HealthChecks
from tunneld.tunnels.pool import Pool

SOCKET_MODE = 0o660


def make_app(
    pool: Pool,
    info: Callable[[], dict[str, Any]],
    health: HealthChecks | None = None,
    metrics: Metrics | None = None,
) -> web.Application:
    """Build the status application over ``pool``; ``info`` returns gateway-wide facts."""

    async def gateway(request: web.Request) -> web.Response:
        return web.json_response(info())

    async def tunnels(request: web.Request) -> web.Response:
        return web.json_response({"gateway": info(), "tunnels": pool.snapshot()})

    async def tunnel(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        t = pool.tunnels.get(name)
        if t is None:
            raise web.HTTPNotFound(text=f"no node named {name!r}\n")
        return web.json_response(t.snapshot())

    async def metrics_page(request: web.Request) -> web.Response:
        assert metrics is not None
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.add_routes([
        web.get("/gateway", gateway),
        web.get("/tunnels", tunnels),
        web.get("/tunnels/{name}", tunnel),
    ])
    app.add_routes((health or HealthChecks()).routes())
    if metrics is not None:
        app.add_routes([web.get("/metrics", metrics_page)])
    return app


class StatusServer:
    """Runs the status app on the configured listeners."""

    def __init__(self, app: web.Application, settings: StatusSettings) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        self._settings = settings
        self._owned: OwnedSocket | None = None

    async def start(self) -> None:
        await self._runner.setup()
        path = self._settings.socket
        if path is not None:
            prepare_socket_path(path)
            site = web.UnixSite(self._runner, str(path))
            await site.start()
            self._owned = OwnedSocket.of(path)
            os.chmod(path, SOCKET_MODE)
        if self._settings.listen:
            host, port = split_host_port(self._settings.listen)
            await web.TCPSite(self._runner, host, port).start()

    async def stop(self) -> None:
        await self._runner.cleanup()
        if self._owned is not None:  # never a socket this process did not bind (a running daemon's)
            self._owned.remove()
            self._owned = None

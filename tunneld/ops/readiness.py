"""Health endpoints in the Kubernetes style: ``/livez``, ``/readyz``, ``/healthz``.

Each endpoint runs a list of named checks. Plain requests get ``ok`` (200) or a short failure (500); ``?verbose``
lists every check the way kube-apiserver does::

    [+]ping ok
    [-]tunnel-sync failed: no tunnel has been up for 612s (health.sync_max_age = 600s)
    readyz check failed

``?exclude=NAME`` skips a check, and ``/readyz/NAME`` runs one. The checks:

- ``ping``: the event loop answers (every endpoint).
- ``tunnel-sync`` (readyz, healthz): like the historic kube-apiserver's SSH-tunnel sync check, it fails when no tunnel
  has been up within ``health.sync_max_age`` seconds (counted from start-up when none has been up yet). An empty
  inventory passes: there is nothing to sync. ``sync_max_age = 0`` turns the check off.
- ``shutdown`` (readyz): fails once graceful shutdown began, so a load balancer stops sending new work while open
  streams drain.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from tunneld.tunnels.pool import Pool, Tunnel
from tunneld.tunnels.state import State

Check = Callable[[], str | None]
"""A check returns None when it passes, or the reason it fails."""


@dataclass(frozen=True)
class CheckResult:
    name: str
    reason: str | None

    @property
    def ok(self) -> bool:
        return self.reason is None


class TunnelSync:
    """Remembers when a tunnel was last up, for the ``tunnel-sync`` check."""

    def __init__(self, pool: Pool, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self.max_age = max_age
        self._clock = clock
        self._since_start = clock()
        self.last_synced: float | None = None
        pool.listeners.append(self._on_change)

    def _on_change(self, tunnel: Tunnel, before: State, after: State) -> None:
        if after is State.UP or before is State.UP:
            self.last_synced = self._clock()

    def check(self) -> str | None:
        if self.max_age <= 0 or not self._pool.tunnels:
            return None
        now = self._clock()
        if any(t.state is State.UP for t in self._pool.tunnels.values()):
            self.last_synced = now
            return None
        if self.last_synced is None:
            age = now - self._since_start
            if age <= self.max_age:
                return None
            return f"no tunnel has come up in the {age:.0f}s since start (health.sync_max_age = {self.max_age:g}s)"
        age = now - self.last_synced
        if age <= self.max_age:
            return None
        return f"no tunnel has been up for {age:.0f}s (health.sync_max_age = {self.max_age:g}s)"


class HealthChecks:
    """The named checks behind ``/livez``, ``/readyz`` and ``/healthz``."""

    def __init__(self, sync: TunnelSync | None = None) -> None:
        self.stopping = False
        self.endpoints: dict[str, dict[str, Check]] = {
            "livez": {"ping": _ping},
            "readyz": {"ping": _ping},
            "healthz": {"ping": _ping},
        }
        if sync is not None:
            self.endpoints["readyz"]["tunnel-sync"] = sync.check
            self.endpoints["healthz"]["tunnel-sync"] = sync.check
        self.endpoints["readyz"]["shutdown"] = self._shutdown

    def _shutdown(self) -> str | None:
        return "shutting down: draining open streams" if self.stopping else None

    def run(self, endpoint: str, exclude: frozenset[str] = frozenset(), only: str | None = None) -> list[CheckResult]:
        """Run ``endpoint``'s checks (all but ``exclude``, or just ``only``). Raises KeyError for unknown names."""
        checks = self.endpoints[endpoint]
        if only is not None:
            return [CheckResult(only, checks[only]())]
        return [CheckResult(name, check()) for name, check in checks.items() if name not in exclude]

    def routes(self) -> list[web.RouteDef]:
        """aiohttp routes for every endpoint and every single check."""
        routes = []
        for endpoint in self.endpoints:
            routes.append(web.get(f"/{endpoint}", self._handler(endpoint)))
            routes.append(web.get(f"/{endpoint}/{{check}}", self._handler(endpoint)))
        return routes

    def _handler(self, endpoint: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            only = request.match_info.get("check")
            exclude = frozenset(request.query.getall("exclude", []))
            try:
                results = self.run(endpoint, exclude, only)
            except KeyError:
                raise web.HTTPNotFound(text=f"no check named {only!r} in /{endpoint}\n") from None
            return render(endpoint if only is None else only, results, "verbose" in request.query)

        return handle


def render(what: str, results: list[CheckResult], verbose: bool) -> web.Response:
    """The kube-apiserver-style response for ``results``."""
    failed = [r for r in results if not r.ok]
    lines = [f"[+]{r.name} ok" if r.ok else f"[-]{r.name} failed: {r.reason}" for r in results]
    if not failed:
        text = "\n".join([*lines, f"{what} check passed"]) + "\n" if verbose else "ok"
        return web.Response(text=text)
    text = "\n".join([*lines, f"{what} check failed"]) + "\n"
    return web.Response(status=500, text=text)


def _ping() -> str | None:
    return None

"""The composition root: config -> pool -> dialer -> status API (and, later, certs and the proxy fronts).

:class:`Gateway` owns every long-lived object and knows the order to start, reload and stop them in. Nothing else
builds these objects, so each of them can be tested alone with whatever collaborators a test hands it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from tunneld import __version__
from tunneld.config import Config, load_config
from tunneld.dialer import TunnelDialer
from tunneld.inventory import InventoryDiff
from tunneld.pool import Pool
from tunneld.status import StatusServer, make_app

log = logging.getLogger("tunneld")


class Gateway:
    """The running daemon."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pool = Pool(config.ssh, config.health)
        self.dialer = TunnelDialer(self.pool, config.dial)
        self.status = StatusServer(make_app(self.pool, self.info), config.status)

    def info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "config": str(self.config.path) if self.config.path else None,
            "nodes": len(self.pool.tunnels),
            "host_key_check": "disabled" if self.config.ssh.insecure_skip_host_key_check else "strict",
        }

    async def start(self) -> None:
        """Bind listeners, then start connecting to the inventory."""
        if self.config.ssh.insecure_skip_host_key_check:
            log.warning("ssh.insecure_skip_host_key_check = true: node host keys are NOT verified")
        await self.status.start()
        self.pool.apply(self.config.nodes)
        log.info("started", extra={"nodes": len(self.config.nodes), "version": __version__})

    async def reload(self) -> InventoryDiff:
        """Re-read the config file and apply the inventory diff; unchanged tunnels are untouched.

        Raises :class:`~tunneld.errors.ConfigError` (and changes nothing) when the new file is invalid.
        """
        if self.config.path is None:
            raise RuntimeError("configuration was not loaded from a file")
        new = load_config(self.config.path)
        if new.ssh != self.config.ssh or new.health != self.config.health:
            log.warning("ssh/health settings changed: they apply to connections made from now on")
        self.pool.ssh = new.ssh
        self.pool.health = new.health
        self.config = replace(new, status=self.config.status)
        change = self.pool.apply(new.nodes)
        log.info("reloaded", extra={"added": len(change.added), "removed": len(change.removed),
                                    "changed": len(change.changed)})
        return change

    async def stop(self, grace: float = 10.0) -> None:
        """Stop listening, drain open channels for up to ``grace`` seconds, close every tunnel."""
        await self.status.stop()
        await self.pool.close(grace)
        log.info("stopped")

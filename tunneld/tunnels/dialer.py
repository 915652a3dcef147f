"""The dialer: destination address -> owning node's tunnel -> ``direct-tcpip`` channel.

Implements :class:`proxy.dialer.Dialer` for the fronts. A destination is owned by a node when it is the node's
name or address or lies in its pod CIDR. A destination no node owns goes through a healthy tunnel chosen at random
(the historic Kubernetes SSH tunneler did this, e.g. for service cluster IPs), unless ``dial.random_fallback`` is off.

The host is put in its normal form first (:func:`netnames.normalize_host`: ``NODE-1.`` is ``node-1``,
``127.0.0.1.`` is ``127.0.0.1``): the form the policy checked is the one owner lookup uses and the node is asked for.
"""

from __future__ import annotations

import logging
import random

from netnames import normalize_host
from tunneld.config import DialSettings
from tunneld.errors import NoTunnel
from tunneld.tunnels.pool import Pool
from tunneld.tunnels.ssh import ChannelStream

log = logging.getLogger("tunneld.dialer")


class TunnelDialer:
    """Opens streams to cluster addresses through the pool's tunnels."""

    def __init__(self, pool: Pool, settings: DialSettings, rng: random.Random | None = None) -> None:
        self._pool = pool
        self._settings = settings
        self._rng = rng or random.Random()

    async def dial(self, host: str, port: int) -> ChannelStream:
        """Open a channel to ``host:port``; raises :class:`proxy.dialer.DialError` subclasses."""
        host = normalize_host(host)
        tunnel = self._pool.owner(host)
        if tunnel is None:
            if not self._settings.random_fallback:
                raise NoTunnel(f"no node owns {host} (and dial.random_fallback is off)")
            healthy = self._pool.healthy()
            if not healthy:
                raise NoTunnel(f"no node owns {host} and no tunnel is healthy")
            tunnel = self._rng.choice(healthy)
        stream = await tunnel.open_stream(host, port, self._settings.timeout)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("channel opened", extra={"node": tunnel.node.name, "channel": f"{host}:{port}"})
        return stream

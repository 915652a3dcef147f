"""Stopping a tunnel whose connect swallows the cancellation (as Python 3.11's ``asyncio.wait_for`` can when a
connection is refused at the moment it is cancelled). The library race is reproduced with a fake connector: it is
the one thing here that cannot be made to happen on demand with a real sshd."""

from __future__ import annotations

import asyncio

from tunneld.config import HealthSettings, Node, SSHSettings
from tunneld.errors import ConnectFailed
from tunneld.tunnels import ssh
from tunneld.tunnels.pool import Pool


async def test_close_returns_even_if_a_connect_swallows_the_cancellation() -> None:
    attempts = 0

    async def refusing_connector(node: Node, settings: SSHSettings, counters: ssh.Counters) -> ssh.SSHLink:
        nonlocal attempts
        attempts += 1
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            pass  # the race: the cancellation is lost and a connect error comes out instead
        raise ConnectFailed("connection refused")

    pool = Pool(SSHSettings(backoff_initial=0.01, backoff_max=0.01, backoff_jitter=0.0),
                HealthSettings(enabled=False), connector=refusing_connector)
    pool.apply([Node("node-1", "192.0.2.1")])
    await asyncio.sleep(0.2)
    assert attempts >= 2  # it was retrying
    await asyncio.wait_for(pool.close(), 10)
    settled = attempts
    await asyncio.sleep(0.2)
    assert attempts == settled  # and it really stopped

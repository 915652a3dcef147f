"""What a tunnel reads while it runs: one immutable :class:`TunnelSettings` the pool replaces on reload, and the
resizable bound on concurrent connection attempts (:class:`ConnectSlots`).

A tunnel reads its settings afresh at each step (attempt, backoff, probe, connection), so a reload that hands it a
new object applies every ``[ssh]`` and ``[health]`` key from that tunnel's next step, without touching a connection
that is up.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, fields
from types import TracebackType

from tunneld.config import HealthSettings, SSHSettings
from tunneld.tunnels.state import Backoff, Limits


@dataclass(frozen=True)
class TunnelSettings:
    """The settings every tunnel of a pool runs with."""

    ssh: SSHSettings
    health: HealthSettings
    max_channels: int = 1000
    """``[limits] max_channels_per_tunnel`` (a restart setting: the pool keeps the value it started with)."""

    @property
    def backoff(self) -> Backoff:
        s = self.ssh
        return Backoff(s.backoff_initial, s.backoff_max, s.backoff_multiplier, s.backoff_jitter)

    @property
    def limits(self) -> Limits:
        return Limits(failure_threshold=self.health.failure_threshold, max_attempts=self.ssh.max_reconnect_attempts)


def changed_keys(old: TunnelSettings, new: TunnelSettings) -> list[str]:
    """The ``section.key`` names whose values differ, in the order of the config file's sections."""
    changed = []
    for section, a, b in (("ssh", old.ssh, new.ssh), ("health", old.health, new.health)):
        changed += [f"{section}.{f.name}" for f in fields(a) if getattr(a, f.name) != getattr(b, f.name)]
    return changed


class ConnectSlots:
    """A bound on concurrent connection attempts whose size can change while slots are held.

    ``async with slots:`` waits while ``in_use >= limit`` (first come, first served). Shrinking never interrupts a
    holder: new attempts wait until enough holders have left; growing lets waiters in at once.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    async def acquire(self) -> None:
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # granted, then cancelled before it could run: hand the slot on
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()

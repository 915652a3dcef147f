"""How a dial-in tunnel runs: wait for the node, hold its link, hand over to a replacement.

A dial-in tunnel never connects: it says WAITING (no backoff, no attempts) until the listener hands it the node's
connection (:meth:`DialinSupervisor.attach`), is UP (probed like any tunnel) while that link lasts, and goes back to
waiting when it closes. A second connection for the same node takes new dials at once; the old one's streams may
run until done or ``replace_grace`` passes, then the old connection is closed and what is left ends as broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from tunneld.tunnels.state import Event

if TYPE_CHECKING:
    from tunneld.tunnels.dialin_ssh import DialinLink
    from tunneld.tunnels.pool import Tunnel

log = logging.getLogger("tunneld.pool")


class DialinSupervisor:
    """The supervisor of one dial-in tunnel (the pool's :class:`~.pool.Tunnel` delegates to it)."""

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel
        self._arrived: asyncio.Event = asyncio.Event()
        self._pending: DialinLink | None = None
        self._draining: set[asyncio.Task[None]] = set()
        self._old: set[DialinLink] = set()
        self.replacements = 0
        self.peer: str | None = None

    def attach(self, link: DialinLink, grace: float) -> None:
        """The node's connection with its forward arrived; a link the tunnel already holds is replaced."""
        tunnel = self._tunnel
        current = tunnel.link
        self.peer = link.peer
        if current is not None and not current.closed:
            self.replacements += 1
            log.warning("dial-in connection replaced by a new one from %s; the old one's %d streams may run for "
                        "up to %gs", link.peer, len(getattr(current, "streams", ())), grace,
                        extra={"node": tunnel.node.name, "peer": link.peer})
            tunnel.link = link  # new dials go through the new connection at once
            self._drain(current, grace)
        else:
            if self._pending is not None and not self._pending.closed:
                self._pending.close("replaced before it was used")
            self._pending = link
        self._arrived.set()

    def _drain(self, old: Any, grace: float) -> None:
        self._old.add(old)

        async def drain() -> None:
            deadline = time.monotonic() + grace
            try:
                while old.streams and time.monotonic() < deadline and not old.closed:  # noqa: ASYNC110
                    await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
            finally:
                old.close("replaced by a newer connection of the same node")
                self._old.discard(old)

        task = asyncio.create_task(drain(), name=f"dialin-drain:{self._tunnel.node.name}")
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def run(self) -> None:
        """Wait for the node, stay up while its link lasts, repeat."""
        tunnel = self._tunnel
        while not tunnel._stopping:
            tunnel.next_retry = None
            tunnel._event(Event.WAIT)
            while self._pending is None or self._pending.closed:
                self._arrived.clear()
                await self._arrived.wait()
            link, self._pending = self._pending, None
            tunnel.link = link
            tunnel._event(Event.CONNECTED)
            reason = await self._hold()
            tunnel._event(Event.LOST, reason)

    async def _hold(self) -> str:
        """Probe whichever link the tunnel holds until the current one closes; returns why it closed."""
        tunnel = self._tunnel
        while True:
            link = tunnel.link
            assert link is not None
            prober = asyncio.create_task(tunnel._probe_loop(link)) if tunnel.settings.health.enabled else None
            self._arrived.clear()
            closed = asyncio.create_task(link.wait_closed())
            replaced = asyncio.create_task(self._arrived.wait())
            try:
                await asyncio.wait({closed, replaced}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (prober, closed, replaced):
                    if task is not None and not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
            if tunnel.link is link and link.closed:
                tunnel.link = None
                return closed.result() if closed.done() and not closed.cancelled() else "connection closed"

    async def close(self) -> None:
        """Close every link (held, pending, draining)."""
        for link in [self._pending, *self._old]:
            if link is not None:
                link.close("closed: the tunnel stopped")
        for task in list(self._draining):
            task.cancel()
        await asyncio.gather(*self._draining, return_exceptions=True)

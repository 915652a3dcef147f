"""The tunnel pool: one supervised SSH connection per inventory node.

Each :class:`Tunnel` runs a supervisor task: connect (holding one of a bounded number of connect slots, so thousands
of nodes do not stampede their sshds or our CPU), probe health periodically while connected, and on failure wait an
exponential, jittered backoff before the next attempt; a tunnel that gave up or was refused waits for RETRY. All
state lives in a :class:`~.state.TunnelStateMachine`; this module performs the I/O the machine's states call for.
Tunnels read an immutable :class:`~.settings.TunnelSettings` that :meth:`Pool.configure` replaces on reload.

:meth:`Pool.apply` takes a whole new inventory: it first decides (a pure :func:`~.inventory.diff`), then acts:
added nodes connect, removed nodes drain and close, changed nodes reconnect, unchanged tunnels are not touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from tunneld.config import HealthSettings, Node, SSHSettings
from tunneld.errors import AuthFailed, ConnectFailed, HostKeyRejected, Overloaded, TunnelDown, TunnelUnavailable
from tunneld.tunnels import ssh
from tunneld.tunnels.dialin import DialinSupervisor
from tunneld.tunnels.inventory import InventoryDiff, OwnerIndex, diff
from tunneld.tunnels.link import Link
from tunneld.tunnels.probe import ProbeFailed, probe
from tunneld.tunnels.settings import ConnectSlots, TunnelSettings, changed_keys
from tunneld.tunnels.state import PARKED, Event, State, TunnelStateMachine

log = logging.getLogger("tunneld.pool")

Connector = Callable[[Node, SSHSettings, ssh.Counters], Awaitable[ssh.SSHLink]]
StateListener = Callable[["Tunnel", State, State], None]


@dataclass(frozen=True)
class ProbeResult:
    """The outcome of the last health probe."""

    at: float
    ok: bool
    latency: float
    detail: str


class Tunnel:
    """One node's supervised SSH connection.

    It reads :attr:`settings` afresh at each step, so :meth:`configure` (a reload) applies from the next attempt,
    backoff, probe or connection. ``notify`` hears every state change.
    """

    def __init__(
        self,
        node: Node,
        settings: TunnelSettings,
        *,
        connector: Connector,
        slots: ConnectSlots,
        clock: Callable[[], float],
        rng: Callable[[], float],
        notify: StateListener,
    ) -> None:
        self.node = node
        self.settings = settings
        self._connector = connector
        self._slots = slots
        self._clock = clock
        self._rng = rng
        self._notify = notify
        self.machine = TunnelStateMachine(clock, settings.limits)
        self.counters = ssh.Counters()
        self.link: Link | None = None
        self.last_probe: ProbeResult | None = None
        self.next_retry: float | None = None
        self._opening = 0  # channel opens under way: they count against the channel limit too
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._retry = asyncio.Event()
        self.dialin = DialinSupervisor(self) if node.mode == "dial-in" else None
        """Set for a dial-in tunnel (the node connects to us): see :mod:`.dialin`."""

    @property
    def state(self) -> State:
        return self.machine.state

    def start(self) -> None:
        run = self.dialin.run() if self.dialin is not None else self._supervise()
        self._task = asyncio.create_task(run, name=f"tunnel:{self.node.name}")

    def configure(self, settings: TunnelSettings) -> None:
        """Run with ``settings`` from the next step on."""
        self.settings = settings
        self.machine.limits = settings.limits

    def retry(self) -> bool:
        """Send RETRY to a tunnel that gave up or was refused (it connects again at once); False otherwise."""
        if not self.machine.parked:
            return False
        self._event(Event.RETRY)
        self._retry.set()
        return True

    async def open_stream(self, host: str, port: int, timeout: float) -> ssh.ChannelStream:
        """Open a forwarded channel through this tunnel.

        Raises :class:`TunnelUnavailable` (503) while the tunnel is not up (reconnecting, or gave up until reload),
        :class:`TunnelDown` (502) when it is ``refused`` (the node's host key or our login was refused), and
        :class:`Overloaded` (503) at ``limits.max_channels_per_tunnel`` (opens under way count, so a burst of
        concurrent dials cannot overshoot the limit).
        """
        link = self.link
        if link is None or self.state not in (State.UP, State.DEGRADED):
            why = f": {self.machine.last_error}" if self.machine.last_error else ""
            message = f"tunnel to node {self.node.name} is {self.state.value}{why}"
            if self.state is State.REFUSED:
                raise TunnelDown(message)
            raise TunnelUnavailable(message)
        if self.counters.open_channels + self._opening >= self.settings.max_channels:
            raise Overloaded(f"tunnel to node {self.node.name} has {self.counters.open_channels} open channels "
                             f"(limits.max_channels_per_tunnel)")
        self._opening += 1
        try:
            return await link.open_stream(host, port, timeout)
        finally:
            self._opening -= 1

    def _event(self, event: Event, error: str | None = None) -> None:
        before = self.machine.state
        after = self.machine.handle(event, error)
        if after is before:
            return
        level = logging.INFO
        if after in PARKED:
            level = logging.ERROR
        elif after in (State.DOWN, State.DEGRADED):
            level = logging.WARNING
        log.log(level, "tunnel %s", after.value,
                extra={"node": self.node.name, "address": self.node.address, "from": before.value, "error": error})
        if after is State.GAVE_UP:
            log.error("giving up on node after %d failed attempts; reload to retry", self.machine.connect_failures,
                      extra={"node": self.node.name, "error": error})
        elif after is State.REFUSED:
            log.error("host key or login refused: retrying cannot help; fix it, then reload to retry",
                      extra={"node": self.node.name, "error": error})
        self._notify(self, before, after)

    async def _pause(self, failures: int) -> None:
        delay = self.settings.backoff.delay(failures, self._rng())
        self.next_retry = self._clock() + delay
        await asyncio.sleep(delay)

    async def _supervise(self) -> None:
        while not self._stopping:
            self.next_retry = None
            if self.machine.parked:
                await self._retry.wait()  # until a reload sends RETRY
                self._retry.clear()
                continue
            self._event(Event.CONNECT)
            try:
                async with self._slots:
                    link = await self._connector(self.node, self.settings.ssh, self.counters)
            except ConnectFailed as exc:
                if self._stopping:
                    return  # a cancellation lost inside the connect (Python 3.11 wait_for race) must still stop us
                rejected = isinstance(exc, HostKeyRejected | AuthFailed)
                self._event(Event.REJECTED if rejected else Event.CONNECT_FAILED, str(exc))
                if not self.machine.parked:
                    await self._pause(self.machine.connect_failures)
                continue
            self.link = link
            self._event(Event.CONNECTED)
            prober = asyncio.create_task(self._probe_loop(link)) if self.settings.health.enabled else None
            try:
                reason = await link.wait_closed()
            finally:
                if prober is not None:
                    prober.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await prober
                link.close()
                self.link = None
            self._event(Event.LOST, reason)
            # A short jittered pause so that many tunnels dropped at once (a network blip) reconnect spread out.
            await self._pause(1)

    async def _probe_loop(self, link: Link) -> None:
        while not link.closed:
            health = self.settings.health
            host = self.node.address if health.host == "@node" else health.host

            async def connect(h: str, p: int, timeout: float = health.timeout) -> ssh.ChannelStream:
                return await link.open_stream(h, p, timeout)

            started = time.monotonic()
            try:
                body = await probe(connect, host, health.port, health.path, health.timeout)
                result = ProbeResult(self._clock(), True, time.monotonic() - started, body[:64])
            except ProbeFailed as exc:
                result = ProbeResult(self._clock(), False, time.monotonic() - started, str(exc))
            if link.closed:
                return
            self.last_probe = result
            self._event(Event.PROBE_OK if result.ok else Event.PROBE_FAILED, None if result.ok else result.detail)
            await asyncio.sleep(health.period)

    async def stop(self, drain_timeout: float) -> None:
        """Stop: let open channels finish for up to ``drain_timeout`` seconds, then close the connection."""
        deadline = time.monotonic() + drain_timeout
        if self.counters.open_channels:
            log.info("draining %d open channels", self.counters.open_channels, extra={"node": self.node.name})
        # A bounded poll: channels close from many tasks, and this runs once per removed node.
        while self.counters.open_channels > 0 and time.monotonic() < deadline and self.link is not None:  # noqa: ASYNC110
            await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
        self._stopping = True
        if self._task is not None:
            # Cancel until it ends: a cancellation can be swallowed by a library racing it (bounded: ~5 s).
            for _ in range(50):
                self._task.cancel()
                done, _ = await asyncio.wait({self._task}, timeout=0.1)
                if done:
                    break
            else:
                log.error("tunnel supervisor did not stop", extra={"node": self.node.name})
            if self._task.done() and not self._task.cancelled() and self._task.exception() is not None:
                log.error("tunnel supervisor failed: %s", self._task.exception(), extra={"node": self.node.name})
        if self.link is not None:
            self.link.close()
            self.link = None
        if self.dialin is not None:
            await self.dialin.close()
        self._event(Event.STOP)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready view of the tunnel for the status API."""
        m = self.machine
        p = self.last_probe
        return {
            "node": self.node.name,
            "mode": self.node.mode,
            "peer": self.dialin.peer if self.dialin is not None else None,
            "replacements": self.dialin.replacements if self.dialin is not None else 0,
            "address": self.node.address,
            "ssh_port": self.node.ssh_port,
            "state": m.state.value,
            "since": m.since,
            "last_error": m.last_error,
            "connects": m.connects,
            "connect_failures": m.connect_failures,
            "next_retry": self.next_retry,
            "open_channels": self.counters.open_channels,
            "channels_total": self.counters.channels_total,
            "bytes_in": self.counters.bytes_in,
            "bytes_out": self.counters.bytes_out,
            "packet_path": None if self.link is None else self.link.packet_path,
            "cipher": None if self.link is None else self.link.cipher,
            "last_probe": None if p is None else {
                "at": p.at, "ok": p.ok, "latency_ms": round(p.latency * 1000, 2), "detail": p.detail,
            },
        }


class Pool:
    """All tunnels, keyed by node name, plus the index of which node owns which address."""

    def __init__(
        self,
        ssh_settings: SSHSettings,
        health: HealthSettings,
        *,
        connector: Connector = ssh.connect,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
        max_channels: int = 1000,
    ) -> None:
        self.settings = TunnelSettings(ssh_settings, health, max_channels)
        """What every tunnel runs with; :meth:`configure` replaces it."""
        self.connector = connector
        self.clock = clock
        self.rng = rng
        self.connect_slots = ConnectSlots(ssh_settings.max_concurrent_connects)
        self.listeners: list[StateListener] = []
        self.tunnels: dict[str, Tunnel] = {}
        self._nodes: dict[str, Node] = {}
        self._index = OwnerIndex(())
        self._draining: set[asyncio.Task[None]] = set()
        self.counters: weakref.WeakValueDictionary[int, ssh.Counters] = weakref.WeakValueDictionary()
        """Every tunnel's counters for as long as anything holds them: its tunnel, or a channel still open."""

    @property
    def nodes(self) -> dict[str, Node]:
        return dict(self._nodes)

    def plan(self, nodes: Iterable[Node]) -> InventoryDiff:
        """What :meth:`apply` would do with ``nodes``."""
        return diff(self._nodes, nodes)

    def apply(self, nodes: Iterable[Node], drain_timeout: float = 30.0) -> InventoryDiff:
        """Make the pool match ``nodes``. Removed and replaced tunnels drain in the background."""
        nodes = list(nodes)
        change = self.plan(nodes)
        self._nodes = {n.name: n for n in nodes}
        self._index = OwnerIndex(nodes)
        for node in change.removed + change.changed:
            old = self.tunnels.pop(node.name)
            task = asyncio.create_task(old.stop(drain_timeout), name=f"drain:{node.name}")
            self._draining.add(task)
            task.add_done_callback(self._draining.discard)
        for node in change.added + change.changed:
            tunnel = Tunnel(node, self.settings, connector=self.connector, slots=self.connect_slots, clock=self.clock,
                            rng=self.rng, notify=self._notify)
            self.tunnels[node.name] = tunnel
            self.counters[id(tunnel.counters)] = tunnel.counters
            tunnel.start()
        if not change.empty:
            log.info(
                "inventory applied: %d added, %d removed, %d changed, %d unchanged",
                len(change.added), len(change.removed), len(change.changed), len(change.unchanged),
            )
        return change

    def configure(self, ssh_settings: SSHSettings, health: HealthSettings) -> list[str]:
        """Run every tunnel, existing or new, with these settings from its next step on; returns the keys that
        changed (``ssh.backoff_initial``, ...)."""
        new = replace(self.settings, ssh=ssh_settings, health=health)
        changed = changed_keys(self.settings, new)
        self.settings = new
        self.connect_slots.resize(ssh_settings.max_concurrent_connects)
        for tunnel in self.tunnels.values():
            tunnel.configure(new)
        return changed

    def retry_parked(self) -> list[str]:
        """Send RETRY to every tunnel that gave up or was refused; returns their node names."""
        return [name for name, tunnel in sorted(self.tunnels.items()) if tunnel.retry()]

    def _notify(self, tunnel: Tunnel, before: State, after: State) -> None:
        for listener in self.listeners:
            listener(tunnel, before, after)

    def dialin_node(self, name: str) -> str | None:
        """None if ``name`` is a dial-in node of the inventory; else why it may not dial in."""
        tunnel = self.tunnels.get(name)
        if tunnel is None:
            return "not in the inventory"
        if tunnel.dialin is None:
            return f"its mode is {tunnel.node.mode}, not dial-in"
        return None

    def attach(self, name: str, link: Any, replace_grace: float) -> str | None:
        """Hand a dial-in node's arrived connection to its tunnel; returns why not (the caller closes it)."""
        why = self.dialin_node(name)
        if why is not None:
            return why
        tunnel = self.tunnels[name]
        assert tunnel.dialin is not None
        tunnel.dialin.attach(link, replace_grace)
        return None

    def counters_for(self, name: str) -> ssh.Counters:
        """The traffic counters of ``name``'s tunnel (fresh ones when there is none)."""
        tunnel = self.tunnels.get(name)
        return tunnel.counters if tunnel is not None else ssh.Counters()

    def owner(self, host: str) -> Tunnel | None:
        """The tunnel of the node that owns ``host``, or None when no node does."""
        node = self._index.owner(host)
        return None if node is None else self.tunnels.get(node.name)

    def healthy(self) -> list[Tunnel]:
        """Tunnels that are up and passing their health probe."""
        return [t for t in self.tunnels.values() if t.machine.healthy]

    def snapshot(self) -> list[dict[str, Any]]:
        return [t.snapshot() for t in sorted(self.tunnels.values(), key=lambda t: t.node.name)]

    def states(self) -> dict[str, int]:
        """How many tunnels are in each state (only states some tunnel is in): what the whole :meth:`snapshot`
        would tell, for a thousandth of its cost at thousands of tunnels."""
        counts: dict[str, int] = {}
        for t in self.tunnels.values():
            state = t.machine.state.value
            counts[state] = counts.get(state, 0) + 1
        return counts

    @property
    def open_channels(self) -> int:
        """Channels open now, through current tunnels and through tunnels already removed or stopped."""
        return sum(c.open_channels for c in list(self.counters.values()))

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop every tunnel (draining open channels for up to ``drain_timeout``)."""
        tunnels = list(self.tunnels.values())
        self.tunnels.clear()
        await asyncio.gather(*(t.stop(drain_timeout) for t in tunnels), *self._draining,
                             return_exceptions=True)

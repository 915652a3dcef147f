"""The tunnel state machine: states, events, the transition table, and reconnect backoff.

No asyncio here: the pool feeds events in and reads decisions out, so every rule can be tested with a fake clock.
Everything that decides a tunnel's state lives in this module; the pool only performs the I/O a state calls for.

    DOWN --connect--> CONNECTING --connected--> UP <--probe_ok/probe_failed--> DEGRADED
      ^                  |  |  |                 |                               |
      +--connect_failed--+  |  +------lost-------+------------lost---------------+
      |                     |
      |   connect_failed, max_reconnect_attempts reached --> GAVE_UP --+
      |   rejected (host key or login refused) ----------> REFUSED ----+
      +----------------------------------------retry (reload)----------+
    any state --stop--> STOPPED (terminal)

A dial-in tunnel (the node's OpenSSH client connects to us) has no backoff and no attempts: from DOWN it goes
WAITING ("waiting for the node") at once, and CONNECTED arrives when the node's connection with its forward does:

    DOWN --wait--> WAITING --connected--> UP ... --lost--> DOWN --wait--> WAITING

UP: the SSH connection is established and the health probe passes (or has not failed yet). DEGRADED: connected, but
the probe failed ``failure_threshold`` times in a row. DOWN: not connected, waiting to retry. GAVE_UP:
``max_reconnect_attempts`` consecutive attempts failed; REFUSED: the node's host key or our login was refused, which
retrying cannot fix. Both stay parked until a reload sends RETRY.

A transition whose target depends on a count is a :class:`Threshold` entry of the table: it names the counter and
the limit (from :class:`Limits`) and the state for each side of it, so the rule is data, not a special case.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass


class State(enum.Enum):
    CONNECTING = "connecting"
    UP = "up"
    DEGRADED = "degraded"
    DOWN = "down"
    GAVE_UP = "gave-up"
    REFUSED = "refused"
    STOPPED = "stopped"
    WAITING = "waiting"
    """A dial-in tunnel waiting for its node to connect (nothing to retry: the node dials)."""


class Event(enum.Enum):
    CONNECT = "connect"
    CONNECTED = "connected"
    CONNECT_FAILED = "connect_failed"
    REJECTED = "rejected"
    """The node's host key or our login was refused."""
    PROBE_OK = "probe_ok"
    PROBE_FAILED = "probe_failed"
    LOST = "lost"
    RETRY = "retry"
    """A reload: a parked (gave-up or refused) tunnel tries again, its failure count reset."""
    STOP = "stop"
    WAIT = "wait"
    """A dial-in tunnel starts waiting for its node."""


@dataclass(frozen=True)
class Limits:
    """The counts the thresholds of the table compare against (``[health] failure_threshold`` and
    ``[ssh] max_reconnect_attempts``); a limit of 0 is never reached."""

    failure_threshold: int = 1
    max_attempts: int = 0


@dataclass(frozen=True)
class Threshold:
    """A transition to ``reached`` once the machine's ``counter`` (after the event is counted) is at least the
    ``limit`` named in :class:`Limits` (0: never), to ``otherwise`` before that."""

    counter: str
    limit: str
    reached: State
    otherwise: State


PARKED = frozenset({State.GAVE_UP, State.REFUSED})
"""States that stay put until RETRY."""

TRANSITIONS: dict[tuple[State, Event], State | Threshold] = {
    (State.DOWN, Event.CONNECT): State.CONNECTING,
    (State.DOWN, Event.WAIT): State.WAITING,
    (State.WAITING, Event.CONNECTED): State.UP,
    (State.CONNECTING, Event.CONNECTED): State.UP,
    (State.CONNECTING, Event.CONNECT_FAILED): Threshold("connect_failures", "max_attempts", State.GAVE_UP, State.DOWN),
    (State.CONNECTING, Event.REJECTED): State.REFUSED,
    (State.UP, Event.PROBE_OK): State.UP,
    (State.UP, Event.PROBE_FAILED): Threshold("probe_failures", "failure_threshold", State.DEGRADED, State.UP),
    (State.DEGRADED, Event.PROBE_OK): State.UP,
    (State.DEGRADED, Event.PROBE_FAILED): State.DEGRADED,
    (State.UP, Event.LOST): State.DOWN,
    (State.DEGRADED, Event.LOST): State.DOWN,
    (State.GAVE_UP, Event.RETRY): State.DOWN,
    (State.REFUSED, Event.RETRY): State.DOWN,
    **{(state, Event.STOP): State.STOPPED for state in State},
}


class InvalidTransition(Exception):
    """An event arrived that the current state does not accept (a bug in the caller)."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter and a cap: ``min(cap, initial * multiplier**n)``, shortened by up to
    ``jitter`` (a fraction) at random so that many tunnels that failed together do not retry together."""

    initial: float = 1.0
    maximum: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def delay(self, failures: int, rand: float) -> float:
        """Delay before the next attempt after ``failures`` consecutive failures (>= 1); ``rand`` in [0, 1)."""
        exp = max(failures - 1, 0)
        base = self.maximum if exp > 64 else min(self.maximum, self.initial * self.multiplier**exp)
        return base * (1.0 - self.jitter * rand)


class TunnelStateMachine:
    """Tracks one tunnel's state, since-when, last error and failure counts."""

    def __init__(self, clock: Callable[[], float], limits: Limits | None = None) -> None:
        self._clock = clock
        self.limits = limits or Limits()
        """Replaced on reload; a new limit applies from the next event that is counted against it."""
        self.state = State.DOWN
        self.since = clock()
        self.last_error: str | None = None
        self.connect_failures = 0
        """Consecutive failed connection attempts (reset when connected or retried)."""
        self.probe_failures = 0
        """Consecutive failed health probes (reset on a passing probe)."""
        self.connects = 0
        """Successful connections over the tunnel's life."""

    def handle(self, event: Event, error: str | None = None) -> State:
        """Apply ``event``; returns the new state. Raises :class:`InvalidTransition` on an impossible event."""
        try:
            rule = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise InvalidTransition(f"{event.value} in state {self.state.value}") from None
        self._count(event, error)
        if isinstance(rule, Threshold):
            limit: int = getattr(self.limits, rule.limit)
            reached = limit > 0 and getattr(self, rule.counter) >= limit
            rule = rule.reached if reached else rule.otherwise
        return self._enter(rule)

    def _count(self, event: Event, error: str | None) -> None:
        """What ``event`` does to the counts and the last error, whatever the state."""
        if event is Event.CONNECTED:
            self.connect_failures = 0
            self.probe_failures = 0
            self.connects += 1
            self.last_error = None
        elif event in (Event.CONNECT_FAILED, Event.REJECTED):
            self.connect_failures += 1
            self.last_error = error
        elif event is Event.LOST:
            self.last_error = error
        elif event is Event.PROBE_OK:
            self.probe_failures = 0
            if self.state is State.DEGRADED:
                self.last_error = None
        elif event is Event.PROBE_FAILED:
            self.probe_failures += 1
            self.last_error = error
        elif event is Event.RETRY:
            self.connect_failures = 0

    def _enter(self, target: State) -> State:
        if target is not self.state:
            self.state = target
            self.since = self._clock()
        return self.state

    @property
    def parked(self) -> bool:
        """Gave up or refused: no attempt is made until RETRY."""
        return self.state in PARKED

    @property
    def healthy(self) -> bool:
        """Usable for traffic that no node owns (random fallback)."""
        return self.state is State.UP

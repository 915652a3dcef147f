"""The tunnel state machine: states, events, the transition table, and reconnect backoff.

No asyncio here: the pool feeds events in and reads decisions out, so every rule can be tested with a fake clock.

    DOWN --connect--> CONNECTING --connected--> UP <--probe_ok/probe_failed--> DEGRADED
      ^                   |                      |                               |
      +----connect_failed-+-------lost-----------+------------lost---------------+
    any state --stop--> STOPPED (terminal)

UP means the SSH connection is established and the health probe passes (or has not failed yet); DEGRADED means the
connection is up but the probe failed ``failure_threshold`` times in a row; DOWN means not connected and waiting to
retry (or given up, when ``max_reconnect_attempts`` is reached).
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
    STOPPED = "stopped"


class Event(enum.Enum):
    CONNECT = "connect"
    CONNECTED = "connected"
    CONNECT_FAILED = "connect_failed"
    PROBE_OK = "probe_ok"
    PROBE_FAILED = "probe_failed"
    LOST = "lost"
    STOP = "stop"


TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.DOWN, Event.CONNECT): State.CONNECTING,
    (State.CONNECTING, Event.CONNECTED): State.UP,
    (State.CONNECTING, Event.CONNECT_FAILED): State.DOWN,
    (State.UP, Event.PROBE_OK): State.UP,
    (State.UP, Event.PROBE_FAILED): State.UP,  # becomes DEGRADED once the threshold is reached (see handle)
    (State.DEGRADED, Event.PROBE_OK): State.UP,
    (State.DEGRADED, Event.PROBE_FAILED): State.DEGRADED,
    (State.UP, Event.LOST): State.DOWN,
    (State.DEGRADED, Event.LOST): State.DOWN,
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

    def __init__(self, clock: Callable[[], float], failure_threshold: int = 1, max_attempts: int = 0) -> None:
        self._clock = clock
        self.failure_threshold = failure_threshold
        self.max_attempts = max_attempts
        self.state = State.DOWN
        self.since = clock()
        self.last_error: str | None = None
        self.connect_failures = 0
        """Consecutive failed connection attempts (reset when connected)."""
        self.probe_failures = 0
        """Consecutive failed health probes (reset on a passing probe)."""
        self.connects = 0
        """Successful connections over the tunnel's life."""

    def handle(self, event: Event, error: str | None = None) -> State:
        """Apply ``event``; returns the new state. Raises :class:`InvalidTransition` on an impossible event."""
        if event is Event.STOP:
            return self._enter(State.STOPPED)
        try:
            target = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise InvalidTransition(f"{event.value} in state {self.state.value}") from None
        if event is Event.CONNECTED:
            self.connect_failures = 0
            self.probe_failures = 0
            self.connects += 1
            self.last_error = None
        elif event is Event.CONNECT_FAILED:
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
            if self.probe_failures >= self.failure_threshold:
                target = State.DEGRADED
        return self._enter(target)

    def _enter(self, target: State) -> State:
        if target is not self.state:
            self.state = target
            self.since = self._clock()
        return self.state

    @property
    def gave_up(self) -> bool:
        """True when ``max_attempts`` consecutive connection attempts failed: stay down until reload."""
        return self.max_attempts > 0 and self.connect_failures >= self.max_attempts

    @property
    def healthy(self) -> bool:
        """Usable for traffic that no node owns (random fallback)."""
        return self.state is State.UP

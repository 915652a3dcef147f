"""The tunnel state machine and backoff, with a fake clock."""

import pytest

from tunneld.tunnels.state import (
    TRANSITIONS,
    Backoff,
    Event,
    InvalidTransition,
    Limits,
    State,
    Threshold,
    TunnelStateMachine,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_happy_path_and_since() -> None:
    clock = FakeClock()
    m = TunnelStateMachine(clock)
    assert m.state is State.DOWN
    clock.now += 1
    assert m.handle(Event.CONNECT) is State.CONNECTING
    assert m.since == 1001
    clock.now += 2
    assert m.handle(Event.CONNECTED) is State.UP
    assert m.since == 1003 and m.connects == 1 and m.healthy
    clock.now += 5
    m.handle(Event.PROBE_OK)
    assert m.since == 1003, "a self-transition must not reset since"


def test_connect_failure_counts_and_resets() -> None:
    m = TunnelStateMachine(FakeClock())
    for i in range(3):
        m.handle(Event.CONNECT)
        m.handle(Event.CONNECT_FAILED, f"refused {i}")
        assert m.state is State.DOWN
    assert m.connect_failures == 3 and m.last_error == "refused 2"
    m.handle(Event.CONNECT)
    m.handle(Event.CONNECTED)
    assert m.connect_failures == 0 and m.last_error is None


def test_probe_threshold_degrades_and_recovers() -> None:
    m = TunnelStateMachine(FakeClock(), Limits(failure_threshold=2))
    m.handle(Event.CONNECT)
    m.handle(Event.CONNECTED)
    assert m.handle(Event.PROBE_FAILED, "500") is State.UP
    assert m.handle(Event.PROBE_FAILED, "500") is State.DEGRADED
    assert not m.healthy and m.last_error == "500"
    assert m.handle(Event.PROBE_OK) is State.UP
    assert m.probe_failures == 0 and m.last_error is None


def test_lost_goes_down_from_up_and_degraded() -> None:
    for degrade in (False, True):
        m = TunnelStateMachine(FakeClock())
        m.handle(Event.CONNECT)
        m.handle(Event.CONNECTED)
        if degrade:
            m.handle(Event.PROBE_FAILED, "x")
            assert m.state is State.DEGRADED
        assert m.handle(Event.LOST, "reset") is State.DOWN
        assert m.last_error == "reset"


@pytest.mark.parametrize(
    ("state", "event"),
    [(State.DOWN, Event.CONNECTED), (State.DOWN, Event.PROBE_OK), (State.CONNECTING, Event.LOST),
     (State.UP, Event.CONNECT)],
)
def test_impossible_events_raise(state: State, event: Event) -> None:
    m = TunnelStateMachine(FakeClock())
    m.state = state
    assert (state, event) not in TRANSITIONS
    with pytest.raises(InvalidTransition):
        m.handle(event)


def test_stop_from_any_state_goes_through_the_table() -> None:
    for state in State:
        assert TRANSITIONS[(state, Event.STOP)] is State.STOPPED
        m = TunnelStateMachine(FakeClock())
        m.state = state
        assert m.handle(Event.STOP) is State.STOPPED


def _fail(m: TunnelStateMachine, times: int, event: Event = Event.CONNECT_FAILED) -> State:
    for _ in range(times):
        m.handle(Event.CONNECT)
        m.handle(event, "x")
    return m.state


def test_gives_up_after_max_attempts_and_retry_starts_afresh() -> None:
    clock = FakeClock()
    m = TunnelStateMachine(clock, Limits(max_attempts=2))
    assert _fail(m, 1) is State.DOWN and not m.parked
    clock.now += 3
    assert _fail(m, 1) is State.GAVE_UP and m.parked and m.since == 1003
    assert m.state.value == "gave-up" and m.connect_failures == 2
    with pytest.raises(InvalidTransition):
        m.handle(Event.CONNECT)  # parked: nothing happens until a reload
    assert m.handle(Event.RETRY) is State.DOWN
    assert m.connect_failures == 0 and not m.parked
    assert _fail(m, 1) is State.DOWN, "the count starts again after RETRY"
    assert _fail(TunnelStateMachine(FakeClock(), Limits(max_attempts=0)), 50) is State.DOWN, "0: retry forever"


def test_rejected_parks_refused_at_once_until_retry() -> None:
    m = TunnelStateMachine(FakeClock(), Limits(max_attempts=0))
    assert _fail(m, 1, Event.REJECTED) is State.REFUSED
    assert m.state.value == "refused" and m.last_error == "x" and m.parked
    for event in (Event.CONNECT, Event.CONNECT_FAILED, Event.LOST, Event.PROBE_OK):
        with pytest.raises(InvalidTransition):
            m.handle(event)
    assert m.handle(Event.RETRY) is State.DOWN
    with pytest.raises(InvalidTransition):
        m.handle(Event.RETRY)  # only a parked tunnel takes RETRY


def test_new_limits_apply_from_the_next_counted_event() -> None:
    m = TunnelStateMachine(FakeClock(), Limits(failure_threshold=3, max_attempts=0))
    m.handle(Event.CONNECT)
    m.handle(Event.CONNECTED)
    assert m.handle(Event.PROBE_FAILED, "x") is State.UP
    m.limits = Limits(failure_threshold=2, max_attempts=2)  # a reload
    assert m.handle(Event.PROBE_FAILED, "x") is State.DEGRADED
    m.handle(Event.LOST, "gone")
    assert _fail(m, 2) is State.GAVE_UP


def test_thresholds_are_table_data() -> None:
    rules = {key: rule for key, rule in TRANSITIONS.items() if isinstance(rule, Threshold)}
    assert rules == {
        (State.UP, Event.PROBE_FAILED): Threshold("probe_failures", "failure_threshold", State.DEGRADED, State.UP),
        (State.CONNECTING, Event.CONNECT_FAILED):
            Threshold("connect_failures", "max_attempts", State.GAVE_UP, State.DOWN),
    }
    for rule in rules.values():
        assert hasattr(TunnelStateMachine(FakeClock()), rule.counter) and hasattr(Limits(), rule.limit)


def test_backoff_grows_exponentially_to_the_cap() -> None:
    b = Backoff(initial=1.0, maximum=30.0, multiplier=2.0, jitter=0.0)
    assert [b.delay(n, 0.5) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert b.delay(10_000, 0.0) == 30.0  # no overflow


def test_backoff_jitter_shortens_within_bounds() -> None:
    b = Backoff(initial=4.0, maximum=60.0, multiplier=2.0, jitter=0.5)
    assert b.delay(1, 0.0) == 4.0
    assert b.delay(1, 0.999) == pytest.approx(2.002)
    delays = {b.delay(3, r / 10) for r in range(10)}
    assert len(delays) == 10 and all(8.0 <= d <= 16.0 for d in delays)

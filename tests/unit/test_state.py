"""The tunnel state machine and backoff, with a fake clock."""

import pytest

from tunneld.tunnels.state import TRANSITIONS, Backoff, Event, InvalidTransition, State, TunnelStateMachine


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
    m = TunnelStateMachine(FakeClock(), failure_threshold=2)
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


def test_stop_from_any_state() -> None:
    for state in State:
        m = TunnelStateMachine(FakeClock())
        m.state = state
        assert m.handle(Event.STOP) is State.STOPPED


def test_gives_up_after_max_attempts() -> None:
    m = TunnelStateMachine(FakeClock(), max_attempts=2)
    m.handle(Event.CONNECT)
    m.handle(Event.CONNECT_FAILED, "x")
    assert not m.gave_up
    m.handle(Event.CONNECT)
    m.handle(Event.CONNECT_FAILED, "x")
    assert m.gave_up
    assert not TunnelStateMachine(FakeClock(), max_attempts=0).gave_up


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

"""An autouse check for every test that builds a gateway: it must give back what it took.

Within :data:`GRACE` seconds after the test (and its fixtures) ended, every gateway built during the test must have no
open channel (counted through tunnels still held by anything, removed or stopped ones included), no connection on
its fronts, and the event loop no task that was not there before the test. A leak fails the test with what leaked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from tunneld import app

GRACE = 5.0


def _held(gateways: list[app.Gateway], before: set[asyncio.Task[object]]) -> list[str]:
    held = []
    for gw in gateways:
        if gw.pool.open_channels:
            held.append(f"{gw.pool.open_channels} open channels")
        for front in (gw.egress, gw.proxy):
            if front.connections:
                held.append(f"{front.connections} connections on the {front.name} front")
    current = asyncio.current_task()
    new = [t for t in asyncio.all_tasks() if t not in before and t is not current and not t.done()]
    held += [f"task {t.get_name()}: {t.get_coro()!r}" for t in new]
    return held


@pytest.fixture
async def released(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Fails the test when a gateway it built still holds channels, connections or tasks :data:`GRACE` s later."""
    built: set[app.Gateway] = set()
    monkeypatch.setattr(app, "LIVE", built)  # a strong registry for the test's duration
    before = set(asyncio.all_tasks())
    yield
    if not built:
        return
    gateways = list(built)
    deadline = time.monotonic() + GRACE
    held = _held(gateways, before)
    while held and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        held = _held(gateways, before)
    if held:
        pytest.fail("the test's gateway did not give back what it took:\n  " + "\n  ".join(held), pytrace=False)


@pytest.fixture(autouse=True)
def gateways_give_back(request: pytest.FixtureRequest) -> None:
    """Autouse in the loopback and system tests: :func:`released` for every async test (sync ones run no gateway)."""
    if asyncio.iscoroutinefunction(getattr(request.node, "obj", None)):
        request.getfixturevalue("released")

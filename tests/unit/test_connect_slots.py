"""The resizable bound on concurrent connection attempts, and which settings keys a reload reports."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from tunneld.config import HealthSettings, SSHSettings
from tunneld.tunnels.settings import ConnectSlots, TunnelSettings, changed_keys


async def _holders(slots: ConnectSlots, n: int, release: asyncio.Event, inside: list[int]) -> list[asyncio.Task[None]]:
    async def hold(i: int) -> None:
        async with slots:
            inside.append(i)
            await release.wait()
            inside.remove(i)

    tasks = [asyncio.create_task(hold(i)) for i in range(n)]
    for _ in range(5):
        await asyncio.sleep(0)
    return tasks


async def test_grow_admits_waiters_and_shrink_waits_for_holders_to_leave() -> None:
    slots = ConnectSlots(2)
    release = asyncio.Event()
    inside: list[int] = []
    tasks = await _holders(slots, 6, release, inside)
    assert inside == [0, 1] and slots.in_use == 2
    slots.resize(4)
    await asyncio.sleep(0)
    assert inside == [0, 1, 2, 3], "first come, first served"
    slots.resize(1)
    assert slots.in_use == 4, "shrinking interrupts no holder"
    release.set()
    await asyncio.gather(*tasks)
    assert slots.in_use == 0 and not inside


async def test_shrunk_bound_holds_for_newcomers() -> None:
    slots = ConnectSlots(3)
    release = asyncio.Event()
    inside: list[int] = []
    first = await _holders(slots, 3, release, inside)
    slots.resize(1)
    late_release = asyncio.Event()
    late: list[int] = []
    second = await _holders(slots, 2, late_release, late)
    assert late == []
    release.set()
    await asyncio.gather(*first)
    await asyncio.sleep(0)
    assert late == [0] and slots.in_use == 1, "only one at a time now"
    late_release.set()
    await asyncio.gather(*second)
    assert slots.in_use == 0


async def test_cancelled_waiter_leaves_no_slot_behind() -> None:
    slots = ConnectSlots(1)
    release = asyncio.Event()
    inside: list[int] = []
    holder = await _holders(slots, 1, release, inside)
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    release.set()  # the slot is handed to the (cancelled) waiter in the same loop turn
    await asyncio.gather(*holder)
    await asyncio.gather(waiter, return_exceptions=True)
    assert waiter.cancelled() and slots.in_use == 0
    await asyncio.wait_for(slots.acquire(), 1)
    assert slots.in_use == 1


def test_changed_keys_names_each_key() -> None:
    old = TunnelSettings(SSHSettings(), HealthSettings())
    new = replace(old, ssh=replace(old.ssh, backoff_initial=3.0, max_concurrent_connects=2),
                  health=replace(old.health, period=1.0))
    assert changed_keys(old, new) == ["ssh.max_concurrent_connects", "ssh.backoff_initial", "health.period"]
    assert changed_keys(old, old) == []

"""Waiting for a condition in async tests: polled, and always bounded in time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


async def wait_for(cond: Callable[[], bool], timeout: float = 15.0, what: str = "condition", *,
                   interval: float = 0.05) -> float:
    """Poll ``cond`` every ``interval`` seconds until it holds; returns the seconds it took.

    Raises AssertionError naming ``what`` after ``timeout`` seconds.
    """
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)
    return time.monotonic() - start


async def wait_value(probe: Callable[[], Awaitable[T]], accept: Callable[[T], bool] = bool, timeout: float = 15.0,
                     what: str = "condition", *, interval: float = 0.05) -> T:
    """Await ``probe()`` every ``interval`` seconds until ``accept`` takes its value; return that value.

    Raises AssertionError naming ``what`` and the last value after ``timeout`` seconds.
    """
    start = time.monotonic()
    while True:
        value = await probe()
        if accept(value):
            return value
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}: last {value!r:.300}")
        await asyncio.sleep(interval)


def wait_sync(cond: Callable[[], T], timeout: float = 15.0, what: str = "condition", *,
              interval: float = 0.05) -> T:
    """For synchronous tests: call ``cond`` until it returns something true; return that. Bounded by ``timeout``."""
    start = time.monotonic()
    while not (value := cond()):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
    return value

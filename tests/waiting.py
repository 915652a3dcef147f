"""Waiting for a condition in async tests: polled, and always bounded in time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


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

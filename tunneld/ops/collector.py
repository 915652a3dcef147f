"""CPython's cyclic garbage collector, tuned for a long-running daemon whose heap is mostly long-lived.

With CPython's default settings a full (generation 2) collection runs whenever enough objects have survived into the
oldest generation, and it traverses every tracked object: with thousands of tunnels and streams that is over a
million objects, and the event loop stalls for hundreds of milliseconds at a time, over and over while streams open.
Once the daemon has loaded its config and built itself, :class:`CollectorTuning` therefore:

- collects once and freezes what is left (``gc.freeze()``): modules, classes, the config and the gateway's
  long-lived objects live as long as the process and are never traversed again (a frozen object is still freed by
  reference counting when the last reference to it goes; :func:`tunneld.ops.lifecycle.serve` freezes before any
  tunnel exists, so a node removed later leaves no frozen cycle behind);
- raises only the oldest generation's threshold, so that allocation never triggers a full collection; young
  collections (generations 0 and 1) run as before, and most cyclic garbage dies young;
- runs a full collection on a schedule instead (``[gc] full_collection_interval``), so cyclic garbage that made it
  into the oldest generation is still collected, within that interval.

What it did is in the status API (``GET /gateway``, ``gc``) and the metrics (``tunneld_gc_*``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from typing import Any

log = logging.getLogger("tunneld.gc")

NEVER = 1_000_000_000
"""Generation 2's threshold while tuned: a count of young collections that allocation never reaches."""


class CollectorTuning:
    """Tunes the collector after start-up and runs the scheduled full collections (``interval`` seconds apart; 0
    leaves CPython's defaults alone)."""

    def __init__(self, interval: float, clock: Any = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self.tuned = False
        self.frozen = 0
        """Objects frozen at start-up (counted then: ``gc.get_freeze_count()`` walks them all, a millisecond per
        hundred thousand, too slow for every status request)."""
        self.full_collections = 0
        """Full collections since start, scheduled or not (any caller of ``gc.collect()`` included)."""
        self.full_seconds = 0.0
        self.longest_full = 0.0
        self.last_full_at: float | None = None
        self.scheduled = 0
        self._defaults: tuple[int, int, int] | None = None
        self._started: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Collect, freeze and raise the oldest generation's threshold; schedule full collections. Call it once the
        config is loaded and the daemon's long-lived objects are built, before anything short-lived exists."""
        gc.callbacks.append(self._on_collection)
        if self.interval <= 0 or self.tuned:
            return
        gc.collect()
        gc.freeze()
        self.frozen = gc.get_freeze_count()
        self._defaults = gc.get_threshold()
        young0, young1, _ = self._defaults
        gc.set_threshold(young0, young1, NEVER)
        self.tuned = True
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="gc:full-collections")
        log.info("garbage collector tuned: %d objects frozen; full collections every %g s", self.frozen,
                 self.interval)

    async def _schedule(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            gc.collect()
            self.scheduled += 1

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        now = self._clock()
        if phase == "start":
            self._started = now
        elif self._started is not None:
            took = now - self._started
            self._started = None
            self.full_collections += 1
            self.full_seconds += took
            self.longest_full = max(self.longest_full, took)
            self.last_full_at = time.time()

    async def stop(self) -> None:
        """Cancel the schedule and give CPython its thresholds back (what is frozen stays frozen)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._defaults is not None:
            gc.set_threshold(*self._defaults)
            self._defaults = None
        self.tuned = False
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_collection)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready facts for the status API and the metrics."""
        return {
            "tuned": self.tuned,
            "thresholds": list(gc.get_threshold()),
            "frozen_objects": self.frozen,
            "full_collection_interval": self.interval,
            "full_collections": self.full_collections,
            "scheduled_full_collections": self.scheduled,
            "full_collection_seconds": round(self.full_seconds, 4),
            "longest_full_collection_seconds": round(self.longest_full, 4),
            "last_full_collection_at": self.last_full_at,
            "collections": [s["collections"] for s in gc.get_stats()],
        }

"""The garbage collector's tuning (tunneld.ops.collector): what start() changes, that stop() gives it back, and that
cyclic garbage which reached the oldest generation after start-up is still collected, by the schedule, in time."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from tests.waiting import wait_for
from tunneld.ops.collector import NEVER, CollectorTuning


class _Node:
    """A cycle: each node points at the other."""

    other: _Node | None = None


@pytest.fixture
def defaults() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    gc.set_threshold(*before)
    gc.unfreeze()  # the test process's objects were frozen by start(): give them back to the collector


async def test_start_freezes_and_leaves_full_collections_to_the_schedule(defaults: tuple[int, int, int]) -> None:
    tuning = CollectorTuning(60.0)
    tuning.start()
    try:
        assert gc.get_threshold() == (defaults[0], defaults[1], NEVER)
        assert tuning.frozen == gc.get_freeze_count() > 1000
        facts = tuning.snapshot()
        assert facts["tuned"] is True and facts["thresholds"][2] == NEVER and facts["frozen_objects"] > 1000
    finally:
        await tuning.stop()
    assert gc.get_threshold() == defaults
    assert tuning.snapshot()["tuned"] is False


async def test_interval_zero_changes_nothing(defaults: tuple[int, int, int]) -> None:
    frozen = gc.get_freeze_count()
    tuning = CollectorTuning(0.0)
    tuning.start()
    try:
        assert gc.get_threshold() == defaults
        assert gc.get_freeze_count() == frozen
        assert tuning.snapshot()["tuned"] is False
    finally:
        await tuning.stop()


def _old_cycle() -> weakref.ref[_Node]:
    """A two-object cycle that has survived into the oldest generation, then lost its last outside reference."""
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    gc.collect(1)  # a and b survive generations 0 and 1: they are in generation 2 now
    assert gc.is_tracked(a) and not gc.is_finalized(a)
    return weakref.ref(a)


async def test_cyclic_garbage_in_the_oldest_generation_is_collected_by_the_schedule(
        defaults: tuple[int, int, int]) -> None:
    tuning = CollectorTuning(0.3)
    tuning.start()
    try:
        ref = _old_cycle()
        # Young collections do not free it (it is in generation 2, whose automatic collections are off) ...
        gc.collect(1)
        assert ref() is not None
        # ... the scheduled full collection does, within its interval.
        took = await wait_for(lambda: ref() is None, timeout=5.0, what="the scheduled full collection")
        assert took < 2.0
        assert tuning.scheduled >= 1 and tuning.full_collections >= 1
        assert tuning.snapshot()["longest_full_collection_seconds"] > 0
    finally:
        await tuning.stop()

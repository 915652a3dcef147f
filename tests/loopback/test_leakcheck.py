"""The leak check every gateway test runs under (tests/leakcheck.py) sees what a test leaves behind."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from tests.leakcheck import _held
from tunneld.dev.cluster import DevCluster

from .conftest import fast_config, started, wait_for


async def test_the_check_sees_a_channel_a_connection_and_a_task_left_behind(cluster: DevCluster) -> None:
    before = set(asyncio.all_tasks())
    cfg = fast_config(cluster)
    gw = await started(replace(cfg, health=replace(cfg.health, enabled=False)))  # no probe channels to count
    try:
        assert not [h for h in _held([gw], before) if not h.startswith("task ")]  # a running gateway has tasks
        stream = await gw.dialer.dial(cluster.sim_nodes[0].address, 10250)
        _, writer = await asyncio.open_connection("127.0.0.1", gw.proxy.ports[0])
        stray = asyncio.create_task(asyncio.Event().wait(), name="stray")
        await wait_for(lambda: gw.proxy.connections == 1, 5, "the front accepted the connection")
        held = _held([gw], before)
        assert "1 open channels" in held and "1 connections on the proxy front" in held
        assert any(t.startswith("task stray:") for t in held), held
        await stream.close()
        writer.close()
        stray.cancel()
    finally:
        await gw.stop(grace=0)
    await wait_for(lambda: _held([gw], before) == [], 5, "nothing held after stop")

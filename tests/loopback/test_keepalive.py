"""Keepalives (tunneld/tunnels/keepalive.py): sent from the timer's callback with no Task each, and asyncssh's rules
kept: an answering node keeps its tunnel however many intervals pass, a silent one is dropped after
``keepalive_count_max`` unanswered keepalives.

A test-local asyncssh server; the client is the gateway's own :func:`tunneld.tunnels.ssh.connect`.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncssh
import pytest

from tests.sshecho import echo_behind_ssh
from tests.waiting import wait_for
from tunneld.config import SSHSettings
from tunneld.tunnels import ssh

from .conftest import next_base

CIPHER = "aes128-gcm@openssh.com"


@pytest.fixture
def keepalive_tasks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many of asyncssh's own per-keepalive Tasks ran (each one appends)."""
    started: list[int] = []
    original = asyncssh.connection.SSHConnection._make_keepalive_request

    async def counted(self: asyncssh.connection.SSHConnection) -> None:
        started.append(1)
        await original(self)

    monkeypatch.setattr(asyncssh.connection.SSHConnection, "_make_keepalive_request", counted)
    return started


async def test_answered_keepalives_keep_the_tunnel_and_start_no_task(short_dir: Path,
                                                                     keepalive_tasks: list[int]) -> None:
    async with echo_behind_ssh(short_dir, next_base(), CIPHER) as bed:
        settings = SSHSettings(user="u", private_key=bed.private_key, keepalive_interval=0.1, keepalive_count_max=1)
        link = await ssh.connect(bed.node, settings)
        try:
            conn = link._conn
            sent_before = conn._send_seq

            def keepalives() -> int:  # nothing else is sent on an idle connection
                return int((conn._send_seq - sent_before) % 2**32)

            # With count_max 1 the tunnel would drop at the second unanswered keepalive: up after eight means every
            # answer set the count back.
            took = await wait_for(lambda: keepalives() >= 8 or link.closed, timeout=10, what="eight keepalives")
            assert not link.closed
            assert took >= 7 * 0.1  # one per interval, not more
            assert conn._keepalive_count <= 1
            assert keepalive_tasks == []  # sent from the timer's callback, not from a Task per keepalive
            stream = await link.open_stream(bed.node.address, bed.echo_port, 5)  # the tunnel still carries data
            await stream.write(b"ping")
            assert await stream.read() == b"ping"
            await stream.close()
        finally:
            link.close()


async def test_a_silent_node_is_dropped_after_count_max_keepalives(short_dir: Path,
                                                                    keepalive_tasks: list[int]) -> None:
    async with echo_behind_ssh(short_dir, next_base(), CIPHER) as bed:
        interval, count_max = 0.2, 2
        settings = SSHSettings(user="u", private_key=bed.private_key, keepalive_interval=interval,
                               keepalive_count_max=count_max)
        link = await ssh.connect(bed.node, settings)
        try:
            link._conn._transport.pause_reading()  # nothing the node sends arrives any more: no answers
            started = time.monotonic()
            reason = await asyncio.wait_for(link.wait_closed(), timeout=10)
            took = time.monotonic() - started
            assert "not responding to keepalive" in reason
            # count_max keepalives go unanswered, the next firing drops it: (count_max + 1) intervals, plus at most
            # one interval already running when reading stopped, and scheduling slack.
            assert (count_max + 1) * interval - 0.05 <= took <= (count_max + 2) * interval + 1.0, took
            assert keepalive_tasks == []
        finally:
            link.close()

"""The ``[dialin]`` listener under a flood: ``max_connections``, ``max_concurrent_handshakes`` and ``login_grace``.

A gateway with a dial-in node already up (the real OpenSSH client), its status API and egress front, is flooded
with raw TCP connections that never speak, or with SSH handshakes that trickle one byte at a time. Meanwhile the
bounds hold (sampled), the flood's excess is closed at once, the rest within ``login_grace``, the status API and
the node's tunnel keep answering through the egress front; afterwards the counts are back to the logged-in node's
and another node logs in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path

import aiohttp
import pytest

from tests.dialinbed import SSH, DialinBed
from tests.loopback.test_dialin import NODE_ADDR, Targets, audit_lines, bed, targets, up_node  # noqa: F401
from tests.rawhttp import open_egress
from tests.waiting import wait_for
from tunneld.app import Gateway
from tunneld.config import load_checked
from tunneld.tunnels.dialin_ssh import DialinListener
from tunneld.tunnels.state import State

pytestmark = pytest.mark.skipif(not os.access(SSH, os.X_OK), reason="the OpenSSH client is missing")

FLOOD = 40
GRACE = 2.0


class Flooder:
    """``n`` connections to the listener, each either silent or trickling a handshake; records when each ended."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        self.ended: list[float] = []
        self.started = 0.0

    def start(self, port: int, n: int, slow: bool) -> None:
        self.started = time.monotonic()
        self.tasks = [asyncio.create_task(self._one(port, slow)) for _ in range(n)]

    async def _one(self, port: int, slow: bool) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            self.ended.append(time.monotonic())
            return
        try:
            async def trickle() -> None:
                writer.write(b"SSH-2.0-slowloris\r\n")
                # the start of a KEXINIT packet that never completes: a length, then a byte every 0.2 s
                for byte in b"\x00\x00\x04\x00\x0a\x14" + bytes(60):
                    await asyncio.sleep(0.2)
                    writer.write(bytes([byte]))
                    await writer.drain()

            sender = asyncio.create_task(trickle()) if slow else None
            try:
                async with asyncio.timeout(30):
                    while await reader.read(4096):
                        pass
            except (OSError, TimeoutError):
                pass
            finally:
                if sender is not None:
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await sender
            self.ended.append(time.monotonic())
        finally:
            writer.close()

    async def join(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), 40)

    def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()


class Sampler:
    """The largest connection and handshake counts the listener had while the flood ran."""

    def __init__(self, listener: DialinListener) -> None:
        self.listener = listener
        self.max_connections = 0
        self.max_handshakes = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        for _ in range(2000):  # bounded: 2000 x 10 ms
            self.max_connections = max(self.max_connections, len(self.listener.connections))
            self.max_handshakes = max(self.max_handshakes, self.listener.handshakes)
            await asyncio.sleep(0.01)

    def stop(self) -> None:
        self.task.cancel()


async def healthz(socket: Path) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket))) as s:
        async with s.get("http://localhost/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
            return r.status


async def echo_through_egress(egress: Path, port: int) -> bytes:
    status, head, reader, writer = await open_egress(egress, NODE_ADDR, port, timeout=10)
    assert status == 200, head
    try:
        writer.write(b"ping")
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(4), 10)
    finally:
        writer.close()


@pytest.mark.parametrize("bound", ["max_connections", "max_concurrent_handshakes"])
@pytest.mark.parametrize("kind", ["raw", "slow"])
async def test_a_flood_is_bounded_and_the_rest_keeps_working(
        bed: DialinBed, targets: Targets, caplog: pytest.LogCaptureFixture,  # noqa: F811
        bound: str, kind: str) -> None:
    caplog.set_level(logging.INFO)
    limit = 4
    limits = (f"max_connections = {limit}\nmax_concurrent_handshakes = 64\n" if bound == "max_connections"
              else f"max_connections = 1000\nmax_concurrent_handshakes = {limit}\n")
    status_socket, egress = bed.dir / "status.sock", bed.dir / "egress.sock"
    text = bed.config_text([("node-1", NODE_ADDR, "dial-in"), ("node-2", "127.0.0.2", "dial-in")], extra=limits)
    text = text.replace("login_grace = 5", f"login_grace = {GRACE}")
    text = text.replace('[status]\nsocket = ""', f'[status]\nsocket = "{status_socket}"')
    text += f'[egress]\nsocket = "{egress}"\n'
    path = bed.write_config(text)
    gw = Gateway(load_checked(path))
    await gw.start()
    listener = gw.dialin
    assert listener is not None
    flooder = Flooder()
    sampler: Sampler | None = None
    try:
        await up_node(bed, gw, path, "node-1")
        assert await echo_through_egress(egress, targets.echo_port) == b"ping"
        sampler = Sampler(listener)
        flooder.start(listener.port, FLOOD, slow=kind == "slow")
        allowed = limit - 1 if bound == "max_connections" else limit  # node-1 holds one connection
        # the excess is closed at once (before login_grace)
        await wait_for(lambda: len(flooder.ended) >= FLOOD - allowed, GRACE * 0.75, "the excess closed at once")
        assert listener.refused >= FLOOD - allowed
        # meanwhile the status API and the node's tunnel answer
        assert await healthz(status_socket) == 200
        assert await echo_through_egress(egress, targets.echo_port) == b"ping"
        await flooder.join()  # the rest within login_grace (the slow ones send bytes all along)
        assert max(flooder.ended) - flooder.started < GRACE + 2
        assert len(flooder.ended) == FLOOD
        sampler.stop()
        assert sampler.max_connections <= (limit if bound == "max_connections" else 1 + limit)
        assert sampler.max_handshakes <= limit
        assert sampler.max_handshakes >= 1  # the flood did reach the listener
        await wait_for(lambda: listener.handshakes == 0 and len(listener.connections) == 1, 5, "counts back")
        assert any(bound in m for m in audit_lines(caplog))
        assert any("login_grace passed" in m for m in audit_lines(caplog))
        assert gw.pool.tunnels["node-1"].state is State.UP
        await up_node(bed, gw, path, "node-2")  # a node logs in after the flood
        assert len(listener.connections) == 2 and listener.handshakes == 0
    finally:
        flooder.cancel()
        if sampler is not None:
            sampler.stop()
        await gw.stop(1)

"""Fixtures for loopback tests: the embedded dev cluster's simulated nodes (asyncssh servers on 127.x addresses)."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.leakcheck import gateways_give_back, released  # noqa: F401  (autouse: every test gives back)
from tests.waiting import wait_for
from tunneld.app import Gateway
from tunneld.config import Config, StatusSettings, load_config
from tunneld.dev.cluster import DevCluster

# Each test gets its own 127.<a>.<b>.0/24 so leftovers of one test (or a `tunneld dev` a developer is running on
# 127.0.1.x) can never answer for another.
_subnets = itertools.count((os.getpid() % 200) * 50)


def next_base() -> str:
    n = next(_subnets) % 10_000
    return f"127.{100 + n // 250}.{n % 250}.1"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short private directory (unix socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="td", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def cluster(short_dir: Path) -> AsyncIterator[DevCluster]:
    c = DevCluster(nodes=3, base_address=next_base(), ssh_port=2222, workdir=short_dir / "dev", proxy_port=0)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def fast_config(cluster: DevCluster, socket: Path | None = None, **ssh: object) -> Config:
    """The dev cluster's config with test-friendly timings."""
    assert cluster.config_path is not None
    cfg = load_config(cluster.config_path)
    ssh_settings = replace(cfg.ssh, keepalive_interval=1.0, keepalive_count_max=2, backoff_initial=0.1,
                           backoff_max=0.5, connect_timeout=3.0, **ssh)  # type: ignore[arg-type]
    return replace(
        cfg,
        ssh=ssh_settings,
        health=replace(cfg.health, period=0.3, timeout=2.0),
        status=StatusSettings(socket=socket, listen=None),
    )


def states(gw: Gateway) -> dict[str, str]:
    return {name: t.state.value for name, t in gw.pool.tunnels.items()}


def all_up(gw: Gateway) -> bool:
    return bool(gw.pool.tunnels) and all(s == "up" for s in states(gw).values())


async def started(cfg: Config) -> Gateway:
    gw = Gateway(cfg)
    await gw.start()
    await wait_for(lambda: all_up(gw), what="all tunnels up")
    return gw


ECHO_PORT = 7777
SOURCE_PORT = 7778
MiB = 1024 * 1024


@dataclass
class NodeServers:
    """A TCP echo and a byte source on every simulated node's address (reached via the node's "loopback")."""

    servers: list[asyncio.Server]
    source_written: list[int]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.fixture
async def node_servers(cluster: DevCluster) -> AsyncIterator[NodeServers]:
    written = [0]

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Writes a deterministic stream of 64 MiB as fast as the reader takes it."""
        try:
            for i in range(64):
                writer.write(bytes([i]) * MiB)
                await writer.drain()
                written[0] += MiB
            writer.write_eof()
        except ConnectionError:
            pass
        finally:
            writer.close()

    servers = []
    for sim in cluster.sim_nodes:
        servers.append(await asyncio.start_server(_echo, sim.address, ECHO_PORT))
        servers.append(await asyncio.start_server(source, sim.address, SOURCE_PORT))
    try:
        yield NodeServers(servers, written)
    finally:
        for server in servers:
            server.close()


async def source_stalls(written: Callable[[], int], quiet: float = 1.0, limit: float = 10.0) -> int:
    """Poll ``written()`` until it has not moved for ``quiet`` seconds (bounded by ``limit``); return its value.

    For a reader that reads nothing: the source may fill socket buffers, windows and one read, then must stall.
    """
    last, stalled_for = -1, 0.0
    for _ in range(int(limit / 0.1)):
        await asyncio.sleep(0.1)
        now = written()
        stalled_for = stalled_for + 0.1 if now == last else 0.0
        last = now
        if stalled_for >= quiet:
            return now
    raise AssertionError(f"the source never stalled (wrote {last} bytes)")

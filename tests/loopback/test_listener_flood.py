"""Every listener is bounded (issue: 2,100 idle connections to the certificates API exhausted the daemon's file
descriptors and every other front reset its connections). A real `tunneld serve` with a low RLIMIT_NOFILE:

- flooding the certificates API (or the proxy front) past ``max_connections`` leaves the other fronts answering,
  and idle connections are closed after ``header_timeout``;
- flooding it past the descriptor limit makes accept() fail with EMFILE: logged once, retried, never fatal; every
  front answers again once the flood is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from certs.api import CSR_PATH
from tests.certs_daemon import Daemon, DaemonConfig, cli, free_port, write_config
from tests.proxyauth import HEADER, auth_section
from tests.rawhttp import get, open_egress
from tests.waiting import wait_for

from .conftest import next_base

LOOPS = ["asyncio", "uvloop"]


@pytest.fixture(autouse=True)
def many_descriptors() -> None:
    """The test process holds the flood's sockets: let it have as many as it may."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < min(hard, 4096):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))


def flood_config(d: Path, max_connections: int) -> tuple[DaemonConfig, int, Path]:
    host = next_base()
    proxy_port = free_port(host)
    egress = d / "egress.sock"
    extra = (f'[limits]\nmax_connections = {max_connections}\nheader_timeout = 2\nidle_timeout = 5\n\n'
             f'[egress]\nsocket = "{egress}"\n\n[proxy]\nlisten = "{host}:{proxy_port}"\n\n')
    d.mkdir(parents=True, exist_ok=True)
    extra += auth_section(d)
    cfg = write_config(d, host, extra=extra)
    assert cli("ca", "init", "--config", str(cfg.path)).returncode == 0
    return cfg, proxy_port, egress


FRONTS = {"status", "egress", "proxy", "api"}


async def answers(cfg: DaemonConfig, proxy_port: int, egress: Path) -> dict[str, int]:
    """One request to each front; the HTTP status of each that answered (the nodes are unreachable, so egress and
    proxy answer 502 or 503 as the tunnels come and go; the status API 200, the certificates API 401)."""
    out = {}
    with contextlib.suppress(OSError, TimeoutError, aiohttp.ClientError):
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(cfg.socket))) as s:
            async with s.get("http://localhost/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
                out["status"] = r.status
    with contextlib.suppress(OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
        out["egress"] = (await open_egress(egress, "127.0.0.1", 1, timeout=5))[0]
    with contextlib.suppress(OSError, TimeoutError):
        out["proxy"] = (await asyncio.wait_for(get(cfg.host, proxy_port, "/api/v1/nodes/node-1/proxy/x",
                                                         headers=[HEADER]), 5)).status
    with contextlib.suppress(OSError, TimeoutError, aiohttp.ClientError):
        ctx = ssl.create_default_context(cafile=str(cfg.ca_cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            async with s.get(cfg.url + CSR_PATH, timeout=aiohttp.ClientTimeout(total=5)) as r:
                out["api"] = r.status
    return out


class Flood:
    """``n`` idle TCP connections to one port (connect and send nothing)."""

    def __init__(self) -> None:
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def open(self, host: str, port: int, n: int) -> None:
        for _ in range(n):
            self.conns.append(await asyncio.wait_for(asyncio.open_connection(host, port), 5))

    def closed_by_server(self) -> int:
        return sum(1 for reader, _ in self.conns if reader.at_eof() or reader.exception() is not None)

    async def poll(self) -> None:
        """Let each reader notice an EOF or reset the server sent."""
        for reader, _ in self.conns:
            if not reader.at_eof() and reader.exception() is None:
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(reader.read(4096), 0.001)

    def close(self) -> None:
        for _, writer in self.conns:
            writer.close()
        self.conns.clear()


@pytest.fixture
async def flood() -> AsyncIterator[Flood]:
    f = Flood()
    yield f
    f.close()


async def wait_closed(flood: Flood, at_least: int, timeout: float) -> None:
    async def enough() -> bool:
        await flood.poll()
        return flood.closed_by_server() >= at_least
    deadline = asyncio.get_running_loop().time() + timeout
    while not await enough():
        assert asyncio.get_running_loop().time() < deadline, f"{flood.closed_by_server()} closed, not {at_least}"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("target", ["api", "proxy"])
async def test_flooded_front_does_not_starve_the_others(short_dir: Path, flood: Flood, loop: str,
                                                        target: str) -> None:
    cfg, proxy_port, egress = flood_config(short_dir / "m", max_connections=40)
    daemon = Daemon(cfg, loop=loop, nofile=256)
    await daemon.start()
    try:
        assert set(await answers(cfg, proxy_port, egress)) == FRONTS
        await flood.open(cfg.host, cfg.port if target == "api" else proxy_port, 400)
        # Past the cap the flooded front closes new connections at once; the other fronts still answer.
        await wait_closed(flood, 400 - 40 - 64, timeout=5)
        during = await answers(cfg, proxy_port, egress)
        assert set(during) >= FRONTS - {target}, during
        # The idle ones are closed once header_timeout (2 s) has passed; then the flooded front answers again.
        await wait_closed(flood, 400, timeout=10)
        assert set(await answers(cfg, proxy_port, egress)) == FRONTS
    finally:
        assert await daemon.stop() == 0
    assert "Traceback" not in daemon.log.decode()


@pytest.mark.parametrize("loop", LOOPS)
async def test_out_of_descriptors_is_logged_and_survived(short_dir: Path, flood: Flood, loop: str) -> None:
    cfg, proxy_port, egress = flood_config(short_dir / "m", max_connections=1024)
    daemon = Daemon(cfg, loop=loop, nofile=128)
    await daemon.start()
    try:
        assert set(await answers(cfg, proxy_port, egress)) == FRONTS
        await flood.open(cfg.host, cfg.port, 300)  # more than the daemon may open: accept() fails with EMFILE

        await wait_for(lambda: b"accept failed" in daemon.log, timeout=10, what="an accept failure logged")
        await wait_closed(flood, 300, timeout=20)  # idle ones time out; the backlog drains as descriptors free up
        await wait_for(lambda: daemon.proc is not None and daemon.proc.returncode is None, what="daemon alive")
        after = await answers(cfg, proxy_port, egress)
        assert set(after) == FRONTS and after["api"] == 401 and after["status"] == 200, after
    finally:
        assert await daemon.stop() == 0
    log = daemon.log.decode()
    assert "Traceback" not in log
    # Once per episode (accepts resume as idle connections time out, then fail again while the backlog drains), not
    # once per retry (every 0.1 s for several seconds).
    assert 1 <= log.count("certificates API: accept failed") <= 10
    assert "certificates API: accepting again after" in log

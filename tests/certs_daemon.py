"""Helpers to run the real daemon (``tunneld serve``) with the certificates API, and the real CLI, in tests."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from certs.api import CSR_PATH
from tests.waiting import wait_value


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class DaemonConfig:
    """A config for a gateway whose nodes are unreachable loopback addresses (the certs part is what we test)."""

    path: Path
    host: str
    port: int
    socket: Path
    ca_cert: Path

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"


def write_config(d: Path, host: str, name: str = "tunneld", store: str = "sqlite", etcd: str | None = None,
                 approval: str = "queue", ca_dir: Path | None = None, db: Path | None = None,
                 extra: str = "", etcd_prefix: str | None = None, etcd_tls: str = "") -> DaemonConfig:
    """A full config: [ssh] with a throwaway key, two nodes on ``host`` (closed port), [ca] [api] [csr] [status]."""
    d.mkdir(parents=True, exist_ok=True)
    ca_dir = ca_dir or d
    key = d / "id_ed25519"
    if not key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        (d / "known_hosts").write_text("")
    port = free_port(host)
    sock = d / f"{name}.sock"
    closed = free_port(host)  # nothing listens there: the tunnels just retry, quietly, on loopback
    store_lines = f'store = "sqlite"\nsqlite_path = "{db or d / "certs.db"}"\n' if store == "sqlite" else (
        f'store = "etcd"\netcd_endpoints = ["{etcd}"]\netcd_prefix = "{etcd_prefix or "/tunneld-test/" + d.name}"\n'
        f"{etcd_tls}")
    text = (
        f'[ssh]\nuser = "nobody"\nprivate_key = "{key}"\nknown_hosts = "{d / "known_hosts"}"\n'
        "backoff_initial = 5\nbackoff_max = 30\n\n"
        f'[health]\nenabled = false\n\n[status]\nsocket = "{sock}"\n\n'
        f'[ca]\ncert = "{ca_dir / "ca.crt"}"\nkey = "{ca_dir / "ca.key"}"\n\n'
        f'[api]\nlisten = "{host}:{port}"\n\n'
        f'[csr]\napproval = "{approval}"\n{store_lines}\n'
        f"{extra}"
        f'[[nodes]]\nname = "node-1"\naddress = "{host.rsplit(".", 1)[0]}.11"\nssh_port = {closed}\n\n'
        f'[[nodes]]\nname = "node-2"\naddress = "{host.rsplit(".", 1)[0]}.12"\nssh_port = {closed}\n'
    )
    path = d / f"{name}.toml"
    path.write_text(text)
    return DaemonConfig(path, host, port, sock, ca_dir / "ca.crt")


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``tunneld ARGS`` as a user would."""
    return subprocess.run(["tunneld", *args], capture_output=True, text=True, timeout=timeout)


async def acli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """:func:`cli` without blocking the event loop (the test may be serving something)."""
    return await asyncio.to_thread(cli, *args, timeout=timeout)


class Daemon:
    """``tunneld serve`` in a subprocess; stopped with SIGTERM (by PID)."""

    def __init__(self, cfg: DaemonConfig, loop: str = "asyncio", nofile: int | None = None) -> None:
        self.cfg = cfg
        self.loop = loop
        self.nofile = nofile
        """A soft RLIMIT_NOFILE for the daemon (run under prlimit), to exhaust its descriptors on purpose."""
        self.proc: asyncio.subprocess.Process | None = None
        self.log = b""

    async def start(self, timeout: float = 30) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TUNNELD_LOOP=self.loop)
        limit = ["prlimit", f"--nofile={self.nofile}:"] if self.nofile else []
        self.proc = await asyncio.create_subprocess_exec(
            *limit, sys.executable, "-m", "tunneld", "serve", "--config", str(self.cfg.path), "--grace", "1",
            stderr=asyncio.subprocess.PIPE, env=env,
        )
        self._reader = asyncio.create_task(self._read())
        ctx = ssl.create_default_context(cafile=str(self.cfg.ca_cert))
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            while True:
                try:
                    async with s.get(self.cfg.url + CSR_PATH, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 401 and self.cfg.socket.exists():
                            return
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                if self.proc.returncode is not None or time.monotonic() > deadline:
                    await asyncio.sleep(0.2)
                    raise AssertionError(f"daemon did not come up: {self.log.decode()[-3000:]}")
                await asyncio.sleep(0.1)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self.log += chunk

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                os.kill(self.proc.pid, signal.SIGKILL)
                await self.proc.wait()
        await self._reader
        return int(self.proc.returncode or 0)


def session(cfg: DaemonConfig, token: str) -> aiohttp.ClientSession:
    ctx = ssl.create_default_context(cafile=str(cfg.ca_cert))
    return aiohttp.ClientSession(cfg.url, headers={"Authorization": f"Bearer {token}"},
                                 connector=aiohttp.TCPConnector(ssl=ctx), timeout=aiohttp.ClientTimeout(total=10))


async def wait_for(session: aiohttp.ClientSession, name: str, pred, timeout: float = 15) -> dict:
    async def get() -> dict:
        async with session.get(f"{CSR_PATH}/{name}") as r:
            return await r.json()

    return await wait_value(get, pred, timeout, f"CSR {name}", interval=0.1)

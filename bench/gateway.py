"""The gateway under test, run as its own process (``python -m tunneld serve``, uvloop), and its status API.

Running it out of process keeps the benchmark's clients off its event loop and lets us read its RSS and CPU time from
/proc. The inventory lives in a separate file so a run can start the gateway empty (baseline memory) and then load N
nodes with SIGHUP, timing from that signal until every tunnel is up.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from certs.files import write_secret
from tunneld.cli.localapi import UnixHTTPConnection


@dataclass(frozen=True)
class NodeEntry:
    """One inventory entry."""

    name: str
    address: str
    ssh_port: int = 22


@dataclass
class GatewaySettings:
    """What the benchmark varies in the gateway's config."""

    user: str
    private_key: Path
    known_hosts: Path
    keepalive_interval: float = 30.0
    keepalive_count_max: int = 3
    health_enabled: bool = True
    health_period: float = 10.0
    health_port: int = 10248
    node_ports: tuple[int, ...] = ()
    proxy_port: int | None = None
    proxy_token: str | None = None
    """A bearer token (user ``bench``, in ``system:masters``) for the proxy front; written to ``tokens.csv``."""
    max_connections: int = 20_000
    max_channels_per_tunnel: int = 20_000
    max_concurrent_connects: int | None = None
    """``[ssh] max_concurrent_connects`` (None: the daemon's default)."""
    grpc: bool = False
    gc_full_collection_interval: float | None = None
    """``[gc] full_collection_interval`` (None: the daemon's default; 0: CPython's own collector settings)."""


def write_inventory(path: Path, nodes: Iterable[NodeEntry]) -> None:
    """Write an inventory file of ``[[nodes]]`` tables (atomically, so a reload never reads half a file)."""
    text = "".join(
        f'[[nodes]]\nname = "{n.name}"\naddress = "{n.address}"\nssh_port = {n.ssh_port}\n\n' for n in nodes
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text or "nodes = []\n")
    os.replace(tmp, path)


def write_config(workdir: Path, s: GatewaySettings) -> Path:
    """Write the gateway's TOML config under ``workdir``; the inventory is ``workdir/nodes.toml``."""
    ports = ", ".join(str(p) for p in s.node_ports)
    proxy = f'[proxy]\nlisten = "127.0.0.1:{s.proxy_port}"\n\n' if s.proxy_port else ""
    if s.proxy_token:
        tokens = workdir / "tokens.csv"
        write_secret(tokens, f'{s.proxy_token},bench,bench,"system:masters"\n'.encode())
        proxy += f'[auth]\ntoken_file = "{tokens}"\n\n'
    text = (
        f'[ssh]\nuser = "{s.user}"\nprivate_key = "{s.private_key}"\nknown_hosts = "{s.known_hosts}"\n'
        f"keepalive_interval = {s.keepalive_interval}\nkeepalive_count_max = {s.keepalive_count_max}\n"
        "connect_timeout = 30\n"
        + ("" if s.max_concurrent_connects is None else f"max_concurrent_connects = {s.max_concurrent_connects}\n")
        + "backoff_initial = 0.5\nbackoff_max = 5\n\n"
        f'[health]\nenabled = {"true" if s.health_enabled else "false"}\nperiod = {s.health_period}\n'
        f'timeout = 5\nhost = "127.0.0.1"\nport = {s.health_port}\n\n'
        f'[status]\nsocket = "{workdir / "status.sock"}"\n\n'
        f'[egress]\nsocket = "{workdir / "egress.sock"}"\n'
        + (f'grpc_socket = "{workdir / "grpc.sock"}"\n' if s.grpc else "") + "\n"
        f"{proxy}"
        f"[policy]\nnode_ports = [{ports}]\n\n"
        f"[limits]\nmax_connections = {s.max_connections}\nmax_channels_per_tunnel = {s.max_channels_per_tunnel}\n"
        "idle_timeout = 600\n\n"
        '[log]\nlevel = "warning"\n\n'
        + ("" if s.gc_full_collection_interval is None
           else f"[gc]\nfull_collection_interval = {s.gc_full_collection_interval}\n\n")
        + f'[inventory]\nfile = "{workdir / "nodes.toml"}"\n'
    )
    path = workdir / "tunneld.toml"
    path.write_text(text)
    return path


class GatewayProcess:
    """A ``tunneld serve`` child process with its config, sockets and status client."""

    def __init__(self, workdir: Path, settings: GatewaySettings, nodes: Iterable[NodeEntry] = ()) -> None:
        self.workdir = workdir
        self.settings = settings
        write_inventory(workdir / "nodes.toml", nodes)
        self.config = write_config(workdir, settings)
        self.status_socket = workdir / "status.sock"
        self.egress_socket = workdir / "egress.sock"
        self.grpc_socket = workdir / "grpc.sock"
        self.proc: Any = None
        self._status: UnixHTTPConnection | None = None

    def start(self, timeout: float = 20.0) -> None:
        """Start and wait until the status API answers."""
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
        profile = os.environ.get("BENCH_GATEWAY_PROFILE")  # a path: run the gateway under cProfile, stats there
        prefix = ["-m", "cProfile", "-o", profile] if profile else []
        self.proc = procs.spawn([sys.executable, *prefix, "-m", "tunneld", "serve", "--config", str(self.config),
                                 "--grace", "1"], log=self.workdir / "gateway.log", env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited (rc={self.proc.returncode}); see {self.workdir}/gateway.log")
            try:
                if self.get("/healthz", raw=True) == b"ok":
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("gateway status API did not come up")

    @property
    def pid(self) -> int:
        return int(self.proc.pid)

    def reload(self, nodes: Iterable[NodeEntry]) -> float:
        """Write a new inventory and SIGHUP; returns the monotonic time of the signal."""
        write_inventory(self.workdir / "nodes.toml", nodes)
        at = time.monotonic()
        os.kill(self.pid, signal.SIGHUP)
        return at

    def get(self, path: str, *, raw: bool = False, timeout: float = 30.0) -> Any:
        """GET from the status API over a kept-alive unix socket connection (reconnecting once if it broke)."""
        for attempt in (0, 1):
            if self._status is None:
                self._status = UnixHTTPConnection(str(self.status_socket), timeout)
            try:
                self._status.request("GET", path)
                resp = self._status.getresponse()
                body = resp.read()
                break
            except (OSError, http.client.HTTPException):
                self._status.close()
                self._status = None
                if attempt:
                    raise
        if resp.status != 200:
            raise RuntimeError(f"status API {path}: {resp.status} {body[:200]!r}")
        return body if raw else json.loads(body)

    def states(self) -> dict[str, int]:
        """How many tunnels are in each state (the gateway's count: polling the whole tunnel list, 5,000 entries,
        four times a second would cost the gateway a tenth of its CPU while it is measured)."""
        counts: dict[str, int] = self.get("/gateway")["states"]
        return counts

    def wait_up(self, count: int, timeout: float, poll: float = 0.5) -> float:
        """Wait until ``count`` tunnels are up; returns the monotonic time it was first seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.states().get("up", 0) >= count:
                return time.monotonic()
            time.sleep(poll)
        raise RuntimeError(f"not all {count} tunnels up within {timeout}s: {self.states()}")

    def usage(self) -> procs.Usage:
        return procs.usage(self.pid)

    def stop(self) -> None:
        if self._status is not None:
            self._status.close()
        procs.stop(self.proc, grace=10.0)

"""Scale: N simulated nodes (:mod:`bench.simnodes`, in separate processes) against one gateway process.

For each N: start the gateway with an empty inventory (baseline RSS), load N nodes with SIGHUP and time until every
tunnel is up, then measure RSS per tunnel, CPU while idle (keepalives only, health probes off), and how long the
gateway takes to notice a node that stops answering (its process is SIGSTOPped: TCP stays open, nothing answers, so
only keepalives can tell). At the largest N whose tunnels and streams fit under the open-file limit, idle streams are
opened through the CONNECT front and the status API's latency is measured while they open and while they are held.
The OpenSSH comparison for memory is one ``ssh -N`` client process (measured) times N. At the storm point (full
run: N = 5,000) the gateway is then restarted with every node up, and the time until all its tunnels are up again is
the restart-storm figure.

``parts`` picks which of the measurements after "all up" run (:data:`PARTS`: idle CPU with the stopped node, the
restart storm, the idle streams), so one of them can be measured again without the others' minutes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncssh

from bench import clients, openssh, procs, simnodes
from bench.gateway import GatewayProcess, GatewaySettings, NodeEntry

SSH_PORT = 2022
NODES_PER_WORKER = 1250
STREAM_PORT = 10250
KiB = 1024
PARTS = ("idle", "storm", "streams")
"""The measurements after "all up" that :func:`run` can be limited to (all by default)."""


def _material(workdir: Path) -> tuple[Path, Path]:
    """CA, client key and known_hosts for the simulated nodes; returns (client key, known_hosts)."""
    ca = asyncssh.generate_private_key("ssh-ed25519", comment="bench-ca")
    client = asyncssh.generate_private_key("ssh-ed25519", comment="bench-gateway")
    ca.write_private_key(str(workdir / "ssh_ca"))
    client.write_private_key(str(workdir / "client"))
    os.chmod(workdir / "ssh_ca", 0o600)
    os.chmod(workdir / "client", 0o600)
    (workdir / "client.pub").write_bytes(client.export_public_key())
    known_hosts = workdir / "known_hosts"
    known_hosts.write_text(f"@cert-authority * {ca.export_public_key().decode().strip()}\n")
    return workdir / "client", known_hosts


class _StatusProbe(threading.Thread):
    """Measures the status API's latency in a loop (its own connection) until stopped."""

    def __init__(self, gw: GatewayProcess, path: str) -> None:
        super().__init__(daemon=True)
        self.gw = GatewayProcess.__new__(GatewayProcess)
        self.gw.__dict__.update(gw.__dict__)
        self.gw._status = None
        self.path = path
        self.samples: list[float] = []
        self.errors = 0
        self.first_error = ""
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            t0 = time.perf_counter()
            try:
                self.gw.get(self.path, raw=True, timeout=10)
                self.samples.append((time.perf_counter() - t0) * 1000)
            except (OSError, RuntimeError) as exc:
                self.errors += 1
                self.first_error = self.first_error or f"{type(exc).__name__}: {exc}"[:200]
            self._halt.wait(0.02)

    def _status_conn_open(self) -> bool:
        return self.gw._status is not None

    def finish(self) -> dict[str, Any]:
        self._halt.set()
        self.join(15)
        lat = clients.Latency(self.samples or [0.0])
        if self._status_conn_open():
            self.gw._status.close()  # type: ignore[union-attr]
        return {"n": len(self.samples), "errors": self.errors, "first_error": self.first_error,
                "p50_ms": round(lat.pct(50), 2),
                "p99_ms": round(lat.pct(99), 2), "max_ms": round(max(self.samples, default=0.0), 2)}


async def _hold_streams(egress: str, nodes: list[NodeEntry], count: int, parallel: int) -> tuple[list[Any], int, float]:
    """Open ``count`` idle CONNECT streams spread over ``nodes``; returns (writers, failures, seconds)."""
    writers: list[Any] = []
    failures = 0
    reasons: dict[str, int] = {}
    retried = [0]
    todo = iter(range(count))

    async def worker() -> None:
        nonlocal failures
        for i in todo:
            node = nodes[i % len(nodes)]
            for attempt in range(50):
                try:
                    _, writer = await asyncio.wait_for(clients.open_connect(egress, node.address, STREAM_PORT), 60)
                    writers.append(writer)
                    break
                except (OSError, clients.BenchError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    # A full accept backlog on the unix socket shows up as EAGAIN, or (asyncio) as ENOTCONN on
                    # first use: the client backs off and retries, as a real one would.
                    if isinstance(exc, OSError) and exc.errno in (errno.EAGAIN, errno.ENOTCONN) and attempt < 49:
                        retried[0] += 1
                        await asyncio.sleep(0.01 * (attempt + 1))
                        continue
                    failures += 1
                    why = f"{type(exc).__name__}: {exc}"[:80]
                    reasons[why] = reasons.get(why, 0) + 1
                    break

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(parallel)))
    if reasons or retried[0]:
        print(f"stream failures: {reasons}; retried after a full accept backlog: {retried[0]}", file=sys.stderr)
    return writers, failures, time.perf_counter() - t0


def _streams(gw: GatewayProcess, nodes: list[NodeEntry], count: int, hold: float, log: Any) -> dict[str, Any]:
    """Open and hold ``count`` idle streams; status latency while opening and while holding."""
    before = gw.usage()

    async def go() -> dict[str, Any]:
        probe = _StatusProbe(gw, f"/tunnels/{nodes[0].name}")
        probe.start()
        writers, failures, seconds = await _hold_streams(str(gw.egress_socket), nodes, count, 64)
        opening = probe.finish()
        log(f"  {len(writers)} streams open ({failures} failed) in {seconds:.1f} s; status p99 while opening "
            f"{opening['p99_ms']} ms")
        held = _StatusProbe(gw, f"/tunnels/{nodes[0].name}")
        held.start()
        await asyncio.sleep(hold)
        holding = held.finish()
        usage = gw.usage()
        collector = gw.get("/gateway")["gc"]
        log(f"  status p99 while holding {holding['p99_ms']} ms; full garbage collections "
            f"{collector['full_collections']}"
            f", longest {collector['longest_full_collection_seconds'] * 1000:.0f} ms")
        opened = len(writers)
        for w in writers:
            w.close()
        return {"requested": count, "opened": opened, "failed": failures, "open_seconds": round(seconds, 2),
                "status_p99_ms_while_opening": opening["p99_ms"], "status_while_opening": opening,
                "status_p99_ms_while_holding": holding["p99_ms"], "status_while_holding": holding,
                "gateway_gc": collector,
                "rss_per_stream_kib": round((usage.rss - before.rss) / max(opened, 1) / KiB, 1)}

    return asyncio.run(go())


def _storm(gw: GatewayProcess, n: int, nodes: list[NodeEntry], settings: GatewaySettings, gdir: Path,
           sims: list[int], log: Any) -> tuple[GatewayProcess, dict[str, Any]]:
    """Restart the gateway with ``n`` nodes up; time until all are up again, and the CPU the gateway and the
    simulated nodes (processes ``sims``) spent meanwhile. Returns the new gateway process."""
    gw.wait_up(n, timeout=120)  # the node that was stopped is back
    gw.stop()
    sdir = gdir.with_name(gdir.name + "-restart")
    sdir.mkdir()
    again = GatewayProcess(sdir, settings, nodes)
    sims0 = sum(procs.usage(pid).cpu_seconds for pid in sims)
    t0 = time.monotonic()
    try:
        again.start(timeout=60)
        answering = time.monotonic() - t0
        up_at = again.wait_up(n, timeout=300, poll=0.25)
    except BaseException:
        again.stop()
        raise
    seconds = up_at - t0
    cpu = again.usage().cpu_seconds
    sims_cpu = sum(procs.usage(pid).cpu_seconds for pid in sims) - sims0
    log(f"  restart storm: gateway restarted with {n} nodes, all up again in {seconds:.1f} s (status API answering "
        f"after {answering:.1f} s; CPU: gateway {cpu:.1f} s, simulated nodes {sims_cpu:.1f} s)")
    return again, {"nodes": n, "all_up_again_seconds": round(seconds, 2), "answering_seconds": round(answering, 2),
                   "gateway_cpu_seconds": round(cpu, 2), "sim_nodes_cpu_seconds": round(sims_cpu, 2)}


def _idle(gw: GatewayProcess, stall_pid: int, stall_name: str, keepalive: float, idle_window: float,
          log: Any) -> dict[str, Any]:
    """Idle CPU (keepalives only), while one node (process ``stall_pid``) stops answering: how long until its
    tunnel is seen down."""
    idle0 = gw.usage()
    stopped_at = time.monotonic()
    os.kill(stall_pid, signal.SIGSTOP)
    log(f"  node {stall_name} stopped (SIGSTOP); measuring idle CPU for {idle_window:g} s")
    noticed: float | None = None
    deadline = stopped_at + max(idle_window, keepalive * 5 + 10)
    idle1 = None
    try:
        while time.monotonic() < deadline and (noticed is None or idle1 is None):
            if idle1 is None and time.monotonic() - stopped_at >= idle_window:
                idle1 = gw.usage()
            if noticed is None and gw.get(f"/tunnels/{stall_name}")["state"] != "up":
                noticed = time.monotonic() - stopped_at
            time.sleep(0.25)
    finally:
        os.kill(stall_pid, signal.SIGCONT)
    idle1 = idle1 or gw.usage()
    idle_cpu = procs.cpu_percent(idle0, idle1)
    log(f"  idle CPU {idle_cpu:.2f}% of one core over {idle1.at - idle0.at:.0f} s; stopped node noticed after "
        f"{noticed if noticed is None else round(noticed, 1)} s (keepalive {keepalive:g} s x 3)")
    return {"idle_cpu_percent": round(idle_cpu, 2), "idle_window_s": round(idle1.at - idle0.at, 1),
            "keepalive_interval_s": keepalive, "keepalive_count_max": 3,
            "notice_seconds": None if noticed is None else round(noticed, 1)}


def run_one(n: int, *, workdir: Path, key: Path, known_hosts: Path, keepalive: float, idle_window: float,
            streams: int, hold: float, log: Any, storm: bool = False, parts: tuple[str, ...] = PARTS
            ) -> dict[str, Any]:
    """One scale point: N nodes (the last one is the one that stops answering)."""
    workers: list[Any] = []
    gw: GatewayProcess | None = None
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    try:
        regular = n - 1
        t0 = time.monotonic()
        for first in range(0, regular, NODES_PER_WORKER):
            count = min(NODES_PER_WORKER, regular - first)
            workers.append(procs.spawn([sys.executable, "-m", "bench.simnodes", "--first", str(first), "--count",
                                        str(count), "--port", str(SSH_PORT), "--workdir", str(workdir)],
                                       log=workdir / f"sim-{first}.log", env=env, stdout_pipe=True))
        stall = procs.spawn([sys.executable, "-m", "bench.simnodes", "--first", str(regular), "--count", "1",
                             "--port", str(SSH_PORT), "--workdir", str(workdir)], log=workdir / "sim-stall.log",
                            env=env, stdout_pipe=True)
        workers.append(stall)
        for w in workers:
            procs.wait_line(w, b"READY", 300)
        log(f"N={n}: {n} simulated nodes in {len(workers)} processes ready in {time.monotonic() - t0:.1f} s")
        nodes = [NodeEntry(simnodes.name(i), simnodes.address(i), SSH_PORT) for i in range(n)]
        # A/B of settings (unset: the daemon's defaults): BENCH_GATEWAY_GC_INTERVAL ("0": CPython's own collector
        # settings) and BENCH_GATEWAY_CONNECTS (the bound on connection attempts under way).
        gc_interval, connects = os.environ.get("BENCH_GATEWAY_GC_INTERVAL"), os.environ.get("BENCH_GATEWAY_CONNECTS")
        settings = GatewaySettings(user="root", private_key=key, known_hosts=known_hosts,
                                   keepalive_interval=keepalive, keepalive_count_max=3, health_enabled=False,
                                   gc_full_collection_interval=None if gc_interval is None else float(gc_interval),
                                   max_concurrent_connects=None if connects is None else int(connects))
        gdir = workdir / f"gw-{n}"
        gdir.mkdir()
        gw = GatewayProcess(gdir, settings)
        gw.start()
        time.sleep(1.0)
        base = gw.usage()
        started = gw.reload(nodes)
        up_at = gw.wait_up(n, timeout=600, poll=0.5)
        up_seconds = up_at - started
        log(f"  all {n} tunnels up in {up_seconds:.1f} s")
        time.sleep(3.0)
        loaded = gw.usage()
        rss_per = (loaded.rss - base.rss) / n
        log(f"  gateway RSS {base.rss / 2**20:.1f} MiB empty -> {loaded.rss / 2**20:.1f} MiB: "
            f"{rss_per / KiB:.1f} KiB per tunnel")

        out: dict[str, Any] = {
            "nodes": n, "sim_processes": len(workers), "up_seconds": round(up_seconds, 2),
            "gateway_rss_empty": base.rss, "gateway_rss_loaded": loaded.rss,
            "rss_per_tunnel_kib": round(rss_per / KiB, 1),
            "idle_cpu_percent": None, "notice_seconds": None,
        }
        if "idle" in parts:
            out.update(_idle(gw, stall.pid, nodes[-1].name, keepalive, idle_window, log))
        if storm and "storm" in parts:
            gw, out["restart_storm"] = _storm(gw, n, nodes, settings, gdir, [w.pid for w in workers], log)
        if streams and "streams" in parts:
            log(f"  opening {streams} idle streams over {n - 1} tunnels")
            gw.wait_up(n - 1, timeout=60)
            out["streams"] = _streams(gw, nodes[:-1], streams, hold, log)
        return out
    finally:
        if gw is not None:
            gw.stop()
        for w in workers:
            procs.stop(w)


def ssh_client_memory(workdir: Path, key: Path, known_hosts: Path) -> dict[str, Any]:
    """RSS and PSS of one idle ``ssh -N`` client (with a -L forward) connected to a simulated node."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    w = procs.spawn([sys.executable, "-m", "bench.simnodes", "--first", "0", "--count", "1", "--port",
                     str(SSH_PORT), "--workdir", str(workdir)], log=workdir / "sim-ssh.log", env=env, stdout_pipe=True)
    fwd = None
    try:
        procs.wait_line(w, b"READY", 60)
        fwd = openssh.SSHForward(user="root", address=simnodes.address(0), ssh_port=SSH_PORT, key=key,
                                 known_hosts=known_hosts, cipher="aes128-gcm@openssh.com", log=workdir / "ssh.log",
                                 targets=[("127.0.0.1", STREAM_PORT)])
        fwd.wait_ready()
        time.sleep(0.5)
        u = fwd.usage()
        return {"rss": u.rss, "pss": u.pss, "version": openssh.version()}
    finally:
        if fwd is not None:
            fwd.stop()
        procs.stop(w)


def run(ns: list[int], *, keepalive: float, idle_window: float, streams: int, hold: float, log: Any,
        storm_at: int = 0, keep: bool = False, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
    """Every scale point, plus the ``ssh -N`` memory reference."""
    workdir = Path(tempfile.mkdtemp(prefix="tdscale", dir="/tmp"))
    try:
        key, known_hosts = _material(workdir)
        ssh_mem = ssh_client_memory(workdir, key, known_hosts)
        log(f"one ssh -N client: RSS {ssh_mem['rss'] / KiB:.0f} KiB, PSS {ssh_mem['pss'] / KiB:.0f} KiB")
        # The gateway holds a descriptor per tunnel and per open stream: the streams go to the largest N whose
        # tunnels and streams fit under the open-file limit (20,000 on a machine where it cannot be raised).
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        fits = [n for n in ns if n + streams + 1000 <= nofile] or [min(ns)]
        stream_n = max(fits)
        if stream_n != max(ns):
            log(f"open-file limit {nofile}: the {streams} streams are held at N = {stream_n}, not {max(ns)}")
        points = []
        for n in ns:
            points.append(run_one(n, workdir=workdir, key=key, known_hosts=known_hosts, keepalive=keepalive,
                                  idle_window=idle_window, streams=streams if n == stream_n else 0, hold=hold,
                                  log=log, storm=n == storm_at, parts=parts))
            p = points[-1]
            p["ssh_clients_rss_estimate"] = ssh_mem["rss"] * n
            p["ssh_clients_pss_estimate"] = ssh_mem["pss"] * n
        return {"ssh_client": ssh_mem, "points": points, "nofile_limit": nofile,
                "median_rss_per_tunnel_kib": statistics.median(p["rss_per_tunnel_kib"] for p in points)}
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

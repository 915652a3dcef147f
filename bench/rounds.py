"""One round of the side-by-side comparison, and the median over interleaved rounds.

A round measures every path once, in an order that alternates between rounds (odd rounds start with OpenSSH, even
ones with the gateway), so background load that drifts during a run hits both alike. Each ratio is computed within a
round and the reported ratio is the median over rounds: single runs on this 2-core machine move about 15 %.

CPU figures are read from ``/proc/PID/task/*/schedstat`` (nanoseconds) of the process that does the work on each
side: the gateway (``tunneld serve``) and the ``ssh -N -L`` client. The benchmark's own clients and the sshd are the
same for both paths and not counted.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import clients, grpcclient, procs

GiB = 1024 ** 3
MiB = 1024 ** 2
TRANSFER_PATHS = ("ssh -L", "gateway CONNECT", "gateway gRPC", "direct")


@dataclass
class Paths:
    """How each path reaches node 0 (one stream) and every node (the parallel streams), and whose CPU counts."""

    gateway_pid: int
    ssh_pid: int
    ssh_pids: list[int]
    direct_sink: clients.Opener
    direct_http: clients.Opener
    ssh_sink: clients.Opener
    ssh_http: clients.Opener
    gw_sink: clients.Opener
    gw_http: clients.Opener
    proxy: clients.Opener
    proxy_path: str
    proxy_headers: str
    egress: str
    grpc_socket: str
    sink_address: str
    http_address: str
    ssh_http_port: int
    http_port: int
    node_address: str
    ssh_sinks: list[clients.Opener] = field(default_factory=list)
    gw_sinks: list[clients.Opener] = field(default_factory=list)


def _cpu(pids: list[int]) -> float:
    return sum(procs.cpu_seconds(p) for p in pids)


def _timed(pids: list[int], fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run ``fn``; return its result and the CPU seconds ``pids`` spent meanwhile."""
    before = _cpu(pids)
    out = fn()
    return out, _cpu(pids) - before


def _ordered(names: tuple[str, ...], round_no: int) -> tuple[str, ...]:
    return names if round_no % 2 == 0 else tuple(reversed(names))


def one_round(p: Paths, round_no: int, *, nbytes: int, requests: int, opens_seq: int, opens_conc: int,
              concurrency: int, parallel_bytes: int, log: Any) -> dict[str, Any]:
    """Every measurement once; returns raw figures (MiB/s, CPU seconds, latency samples, opens per second)."""
    out: dict[str, Any] = {"throughput": {}, "latency": {}, "cpu_per_request_ms": {}, "channel_open": {},
                           "parallel": {}}
    gw, ssh = [p.gateway_pid], [p.ssh_pid]
    # 1. one stream, both directions
    for direction in ("up", "down"):
        move = clients.transfer(direction)
        row: dict[str, Any] = {}
        for name in _ordered(TRANSFER_PATHS, round_no):
            if name == "gateway gRPC":
                seconds, cpu = _timed(gw, lambda d=direction: grpcclient.transfer(  # type: ignore[misc]
                    p.grpc_socket, p.sink_address, nbytes, d))
            else:
                opener = {"ssh -L": p.ssh_sink, "gateway CONNECT": p.gw_sink, "direct": p.direct_sink}[name]
                who = {"ssh -L": ssh, "gateway CONNECT": gw, "direct": []}[name]
                seconds, cpu = _timed(who, lambda o=opener, m=move: m(o, nbytes))  # type: ignore[misc]
            row[name] = {"mib_per_s": nbytes / seconds / MiB,
                         "cpu_s_per_gib": cpu * GiB / nbytes if name != "direct" else None}
        out["throughput"][direction] = row
        log(f"  round {round_no + 1} {direction:4} " + "  ".join(f"{k} {v['mib_per_s']:.0f}" for k, v in row.items())
            + " MiB/s")
    # 2. small requests: latency, and CPU per request of the process that forwards them
    plan: dict[str, tuple[Callable[[], clients.Latency], list[int]]] = {
        "direct (keep-alive)": (lambda: clients.latency_keepalive(p.direct_http, "/healthz", requests), []),
        "direct (new connection)": (lambda: clients.latency_fresh(p.direct_http, "/healthz", requests), []),
        "ssh -L (keep-alive)": (lambda: clients.latency_keepalive(p.ssh_http, "/healthz", requests), ssh),
        "ssh -L (new connection = new channel)": (
            lambda: clients.latency_fresh(p.ssh_http, "/healthz", requests), ssh),
        "gateway CONNECT (keep-alive)": (lambda: clients.latency_keepalive(p.gw_http, "/healthz", requests), gw),
        "gateway CONNECT (new CONNECT = new channel)": (
            lambda: clients.latency_fresh(p.gw_http, "/healthz", requests), gw),
        "gateway gRPC (new dial = new channel)": (
            lambda: grpcclient.dial_latency(p.grpc_socket, p.http_address, requests), gw),
        "gateway proxy URL (new channel per request)": (
            lambda: clients.latency_keepalive(p.proxy, p.proxy_path, requests, headers=p.proxy_headers), gw),
    }
    for name in _ordered(tuple(plan), round_no):
        fn, who = plan[name]
        lat, cpu = _timed(who, fn)
        out["latency"][name] = lat.samples
        if who:
            out["cpu_per_request_ms"][name] = cpu * 1000 / (requests + 1)
    # 3. channel opens on one tunnel
    def ssh_open() -> Any:
        return clients.open_tcp("127.0.0.1", p.ssh_http_port)

    def gw_open() -> Any:
        return clients.open_connect(p.egress, p.node_address, p.http_port)

    async def rates() -> dict[str, Any]:
        res: dict[str, Any] = {}
        for name in _ordered(("ssh -L", "gateway CONNECT"), round_no):
            opener = ssh_open if name == "ssh -L" else gw_open
            res[name] = {"sequential": await clients.channel_rate(opener, "/healthz", opens_seq, 1),
                         "concurrent": await clients.channel_rate(opener, "/healthz", opens_conc, concurrency)}
        return res

    out["channel_open"] = asyncio.run(rates())
    # 4. one stream per tunnel, all at once: the gateway's tunnels against one ssh -L process each
    if p.gw_sinks:
        for direction in ("up", "down"):
            row = {}
            for name in _ordered(("ssh -L", "gateway CONNECT"), round_no):
                openers, who = (p.ssh_sinks, p.ssh_pids) if name == "ssh -L" else (p.gw_sinks, gw)
                (run0, wait0), busy0, t0 = procs.sched_seconds(who), procs.machine_busy_seconds(), time.monotonic()
                mib, cpu = _timed(who, lambda o=openers, d=direction: clients.parallel(  # type: ignore[misc]
                    o, parallel_bytes, d))
                wall = time.monotonic() - t0
                (run1, wait1), busy1 = procs.sched_seconds(who), procs.machine_busy_seconds()
                row[name] = {"aggregate_mib_per_s": mib, "cpu_s_per_gib": cpu * GiB / (parallel_bytes * len(openers)),
                             # Where the forwarding process(es) stood, per wall second: on a CPU, and runnable but
                             # waiting for one; and how busy the whole machine was (all cores, anyone's processes).
                             "on_cpu_cores": (run1 - run0) / wall, "runqueue_wait_per_s": (wait1 - wait0) / wall,
                             "machine_busy_cores": (busy1 - busy0) / wall}
            out["parallel"][direction] = row
            log(f"  round {round_no + 1} {len(p.gw_sinks)} streams {direction:4} " + "  ".join(
                f"{k} {v['aggregate_mib_per_s']:.0f} MiB/s (on CPU {v['on_cpu_cores']:.2f}, waiting for one "
                f"{v['runqueue_wait_per_s']:.2f}; machine {v['machine_busy_cores']:.2f} cores busy)"
                for k, v in row.items()))
    return out


def _med(xs: list[float], digits: int = 3) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), digits) if xs else None


def _ratio_summary(values: list[float | None], digits: int = 3) -> dict[str, Any]:
    return {"median": _med([v for v in values if v is not None], digits),
            "rounds": [None if v is None else round(v, digits) for v in values]}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds; every ratio computed within a round first (``*_rounds`` keep the per-round values)."""
    out: dict[str, Any] = {"rounds": len(rounds), "throughput": {}, "parallel": {}}
    for direction, label in (("up", "upload"), ("down", "download")):
        sec: dict[str, Any] = {}
        for name in TRANSFER_PATHS:
            runs = [r["throughput"][direction][name] for r in rounds]
            sec[name] = {"mib_per_s": _med([x["mib_per_s"] for x in runs], 1),
                         "runs": [round(x["mib_per_s"], 1) for x in runs]}
            if name != "direct":
                sec[name]["cpu_s_per_gib"] = _med([x["cpu_s_per_gib"] for x in runs], 3)
                sec[name]["cpu_runs"] = [round(x["cpu_s_per_gib"], 3) for x in runs]
        for key, num, den, field_ in (
            ("ratio_gateway_to_ssh", "gateway CONNECT", "ssh -L", "mib_per_s"),
            ("cpu_ratio_gateway_to_ssh", "gateway CONNECT", "ssh -L", "cpu_s_per_gib"),
            ("ratio_grpc_to_connect", "gateway gRPC", "gateway CONNECT", "mib_per_s"),
        ):
            vals = [r["throughput"][direction][num][field_] / r["throughput"][direction][den][field_] for r in rounds]
            sec[key] = _med(vals)
            sec[key + "_rounds"] = [round(v, 3) for v in vals]
        out["throughput"][label] = sec
        if rounds[0]["parallel"]:
            par: dict[str, Any] = {}
            for name in ("ssh -L", "gateway CONNECT"):
                runs = [r["parallel"][direction][name] for r in rounds]
                par[name] = {"aggregate_mib_per_s": _med([x["aggregate_mib_per_s"] for x in runs], 1),
                             "runs": [round(x["aggregate_mib_per_s"], 1) for x in runs],
                             "cpu_s_per_gib": _med([x["cpu_s_per_gib"] for x in runs], 3),
                             **{k: _med([x[k] for x in runs], 3) for k in
                                ("on_cpu_cores", "runqueue_wait_per_s", "machine_busy_cores")}}
            vals = [r["parallel"][direction]["gateway CONNECT"]["aggregate_mib_per_s"]
                    / r["parallel"][direction]["ssh -L"]["aggregate_mib_per_s"] for r in rounds]
            par["ratio_gateway_to_ssh"] = _med(vals)
            par["ratio_gateway_to_ssh_rounds"] = [round(v, 3) for v in vals]
            out["parallel"][label] = par
    # latency: all rounds' samples together for p50/p99; the added-latency ratio per round, then the median
    names = list(rounds[0]["latency"])
    out["latency"] = {n: clients.Latency([x for r in rounds for x in r["latency"][n]]).summary() for n in names}

    def p50(r: dict[str, Any], n: str) -> float:
        return clients.Latency(r["latency"][n]).pct(50)

    added_proxy = [p50(r, "gateway proxy URL (new channel per request)") - p50(r, "direct (keep-alive)")
                   for r in rounds]
    added_ssh = [p50(r, "ssh -L (new connection = new channel)") - p50(r, "direct (new connection)") for r in rounds]
    added_ssh_ka = [p50(r, "ssh -L (keep-alive)") - p50(r, "direct (keep-alive)") for r in rounds]
    added_connect = [p50(r, "gateway CONNECT (new CONNECT = new channel)") - p50(r, "direct (new connection)")
                     for r in rounds]
    out["latency_added"] = {
        "proxy_url_added_ms": _med(added_proxy), "ssh_L_new_channel_added_ms": _med(added_ssh),
        "ssh_L_keepalive_added_ms": _med(added_ssh_ka), "connect_new_channel_added_ms": _med(added_connect),
        "proxy_url_vs_ssh_L_new_channel": _ratio_summary(
            [a / b if b > 0 else None for a, b in zip(added_proxy, added_ssh, strict=True)], 2),
        "proxy_url_vs_ssh_L_keepalive": _ratio_summary(
            [a / b if b > 0 else None for a, b in zip(added_proxy, added_ssh_ka, strict=True)], 2),
        "grpc_dial_vs_connect_new_channel": _ratio_summary(
            [p50(r, "gateway gRPC (new dial = new channel)") / p50(r, "gateway CONNECT (new CONNECT = new channel)")
             for r in rounds], 2),
    }
    out["cpu_ms_per_request"] = {n: _ratio_summary([r["cpu_per_request_ms"][n] for r in rounds], 4)
                                 for n in rounds[0]["cpu_per_request_ms"]}
    ch: dict[str, Any] = {}
    for name in ("ssh -L", "gateway CONNECT"):
        ch[name] = {}
        for mode in ("sequential", "concurrent"):
            runs = [r["channel_open"][name][mode] for r in rounds]
            ch[name][mode] = {"per_second": _med([x["per_second"] for x in runs], 1),
                              "runs": [x["per_second"] for x in runs], "errors": sum(x["errors"] for x in runs),
                              "p99_ms": _med([x["p99_ms"] for x in runs], 3), "concurrency": runs[0]["concurrency"]}
    for mode in ("sequential", "concurrent"):
        ch[f"ratio_gateway_to_ssh_{mode}"] = _ratio_summary(
            [r["channel_open"]["gateway CONNECT"][mode]["per_second"] / r["channel_open"]["ssh -L"][mode]["per_second"]
             for r in rounds])
    out["channel_open"] = ch
    return out

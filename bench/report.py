"""Presenting results: the side-by-side table (rich), ``results.json`` and a PNG plot (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

KiB = 1024
MiB = 1024 * 1024


Row = tuple[str, str, str, bool | None]


def _row(metric: str, value: float | None, fmt: str, target: str, ok: bool | None) -> Row:
    return (metric, "n/a" if value is None else fmt.format(value), target, None if value is None else ok)


def _med(v: Any) -> float | None:
    return v["median"] if isinstance(v, dict) else v


def _sshd_targets(s: dict[str, Any]) -> list[Row]:
    """Issue 16's targets for the comparison against sshd, each from the median over interleaved rounds."""
    up, down = s["throughput"]["upload"], s["throughput"]["download"]
    a, cpu, ch = s["latency_added"], s["cpu_ms_per_request"], s["channel_open"]
    rows = [
        _row("throughput upload, gateway / ssh -L", up["ratio_gateway_to_ssh"], "{:.2f}x", ">= 1.0x",
             (up["ratio_gateway_to_ssh"] or 0) >= 1.0),
        _row("throughput download, gateway / ssh -L", down["ratio_gateway_to_ssh"], "{:.2f}x", ">= 0.9x",
             (down["ratio_gateway_to_ssh"] or 0) >= 0.9),
        _row("CPU per GiB upload, gateway / ssh", up["cpu_ratio_gateway_to_ssh"], "{:.2f}x", "<= 1.1x",
             (up["cpu_ratio_gateway_to_ssh"] or 99) <= 1.1),
        _row("CPU per GiB download, gateway / ssh", down["cpu_ratio_gateway_to_ssh"], "{:.2f}x", "<= 1.1x",
             (down["cpu_ratio_gateway_to_ssh"] or 99) <= 1.1),
    ]
    v = _med(a["proxy_url_vs_ssh_L_new_channel"])
    rows.append(_row("proxy URL added latency / ssh -L (new channel)", v, "{:.2f}x", "<= 1.6x", (v or 99) <= 1.6))
    v = _med(cpu.get("gateway proxy URL (new channel per request)"))
    rows.append(_row("gateway CPU per proxy-URL request", v, "{:.3f} ms", "<= 0.35 ms", (v or 99) <= 0.35))
    for mode in ("sequential", "concurrent"):
        v = _med(ch[f"ratio_gateway_to_ssh_{mode}"])
        rows.append(_row(f"channel opens {mode}, gateway / ssh -L", v, "{:.2f}x", ">= 0.8x", (v or 0) >= 0.8))
    for label in ("upload", "download"):
        par = s.get("parallel", {}).get(label)
        if par:
            v = par["ratio_gateway_to_ssh"]
            rows.append(_row(f"{s['tunnels']} streams over {s['tunnels']} tunnels {label}, gateway / "
                             f"{s['tunnels']} ssh -L", v, "{:.2f}x", ">= 0.8x", (v or 0) >= 0.8))
    return rows


def _scale_targets(sc: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for p in sc["points"]:
        n = p["nodes"]
        if n >= 10_000:
            rows.append(_row(f"{n} tunnels up", p["up_seconds"], "{:.1f} s", "< 60 s", p["up_seconds"] < 60))
        rows.append(_row(f"RSS per idle tunnel (N={n})", p["rss_per_tunnel_kib"], "{:.0f} KiB", "< 40 KiB",
                         p["rss_per_tunnel_kib"] < 40))
        if n >= 5000 and p["idle_cpu_percent"] is not None:
            rows.append(_row(f"idle CPU at {n} (keepalive {p['keepalive_interval_s']:g} s)", p["idle_cpu_percent"],
                             "{:.1f} %", "< 5 %", p["idle_cpu_percent"] < 5))
        st = p.get("restart_storm")
        if st:
            rows.append(_row(f"restart storm at {st['nodes']}: all up again", st["all_up_again_seconds"], "{:.1f} s",
                             "< 30 s", st["all_up_again_seconds"] < 30))
        st = p.get("streams")
        if st:
            rows.append(_row(f"status p99 while opening {st['requested']} streams",
                             st["status_p99_ms_while_opening"], "{} ms", "< 100 ms",
                             st["status_p99_ms_while_opening"] < 100))
            rows.append(_row(f"status p99 with {st['opened']} idle streams held", st["status_p99_ms_while_holding"],
                             "{} ms", "< 100 ms", st["status_p99_ms_while_holding"] < 100))
    return rows


def _targets(results: dict[str, Any]) -> list[Row]:
    """(metric, measured, target, met?) rows."""
    rows: list[Row] = []
    if results.get("sshd"):
        rows += _sshd_targets(results["sshd"])
    if results.get("scale"):
        rows += _scale_targets(results["scale"])
    return rows


def _sshd_tables(s: dict[str, Any], console: Console) -> None:
    n = s["rounds"]
    for label in ("upload", "download"):
        sec = s["throughput"][label]
        t = Table(title=f"One stream {label} through a real sshd ({s['cipher']}, {s['bytes'] // MiB} MiB; median of "
                        f"{n} rounds)")
        for col in ("path", "MiB/s", "runs", "CPU s per GiB", "CPU runs"):
            t.add_column(col, justify="left" if col == "path" else "right")
        for name in ("direct", "ssh -L", "gateway CONNECT", "gateway gRPC"):
            v = sec[name]
            t.add_row(name, f"{v['mib_per_s']:.0f}", " ".join(f"{x:.0f}" for x in v["runs"]),
                      "" if v.get("cpu_s_per_gib") is None else f"{v['cpu_s_per_gib']:.2f}",
                      " ".join(f"{x:.2f}" for x in v.get("cpu_runs", [])))
        console.print(t)
        console.print(f"  {label}: gateway / ssh -L {sec['ratio_gateway_to_ssh']:.2f}x (rounds "
                      f"{sec['ratio_gateway_to_ssh_rounds']}), gRPC / CONNECT {sec['ratio_grpc_to_connect']:.2f}x")
    t = Table(title=f"Small requests (sequential GETs of a tiny response; {s['requests_per_round']} per path "
                    "per round)")
    for col in ("path", "p50 ms", "p99 ms", "CPU ms per request"):
        t.add_column(col, justify="left" if col == "path" else "right")
    cpu = s["cpu_ms_per_request"]
    for name, v in s["latency"].items():
        c = cpu.get(name)
        t.add_row(name, f"{v['p50_ms']:.3f}", f"{v['p99_ms']:.3f}", "" if c is None else f"{c['median']:.3f}")
    console.print(t)
    t = Table(title="Channel opens on one tunnel (open, one GET, close)")
    for col in ("path", "sequential /s", "concurrent /s", "concurrent p99 ms"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for name in ("ssh -L", "gateway CONNECT"):
        v = s["channel_open"][name]
        c = v["concurrent"]
        t.add_row(name, f"{v['sequential']['per_second']:.0f}", f"{c['per_second']:.0f} (x{c['concurrency']})",
                  f"{c['p99_ms']:.1f}")
    console.print(t)
    if s.get("parallel"):
        t = Table(title=f"{s['tunnels']} streams at once, one per tunnel ({s['parallel_bytes_per_stream'] // MiB} MiB "
                        f"each): the gateway's {s['tunnels']} tunnels vs {s['tunnels']} ssh -L processes")
        for col in ("direction", "ssh -L MiB/s", "gateway MiB/s", "ratio", "ssh CPU s/GiB", "gateway CPU s/GiB",
                    "gateway on CPU / waiting for one", "machine busy (gateway's run)"):
            t.add_column(col, justify="left" if col == "direction" else "right")
        for label, v in s["parallel"].items():
            g = v["gateway CONNECT"]
            t.add_row(label, f"{v['ssh -L']['aggregate_mib_per_s']:.0f}", f"{g['aggregate_mib_per_s']:.0f}",
                      f"{v['ratio_gateway_to_ssh']:.2f}x", f"{v['ssh -L']['cpu_s_per_gib']:.2f}",
                      f"{g['cpu_s_per_gib']:.2f}",
                      f"{g.get('on_cpu_cores', 0):.2f} / {g.get('runqueue_wait_per_s', 0):.2f}",
                      f"{g.get('machine_busy_cores', 0):.2f} cores")
        console.print(t)


def print_tables(results: dict[str, Any], console: Console | None = None) -> None:
    """Print the side-by-side tables and every target beside its measured figure."""
    console = console or Console(width=140)
    if results.get("sshd"):
        _sshd_tables(results["sshd"], console)
    sc = results.get("scale")
    if sc:
        t = Table(title="Scale: simulated nodes (asyncssh sshds in other processes), gateway in its own process")
        for col in ("N", "all up s", "gateway RSS MiB", "KiB/tunnel", "N x ssh -N RSS MiB (est.)", "idle CPU %",
                    "notice s", "restart storm s"):
            t.add_column(col, justify="right")
        for p in sc["points"]:
            storm = p.get("restart_storm")
            t.add_row(str(p["nodes"]), f"{p['up_seconds']:.1f}", f"{p['gateway_rss_loaded'] / MiB:.0f}",
                      f"{p['rss_per_tunnel_kib']:.0f}", f"{p['ssh_clients_rss_estimate'] / MiB:.0f}",
                      "" if p["idle_cpu_percent"] is None else f"{p['idle_cpu_percent']:.2f}", str(p["notice_seconds"]),
                      "" if not storm else f"{storm['all_up_again_seconds']:.1f}")
        console.print(t)
    di = results.get("dialin")
    if di:
        t = Table(title=f"Dial-in beside dial-out, one gateway, {di['cipher']}")
        for col in ("path", "MiB/s", "GET p50 ms (keep-alive)", "GET p50 ms (new channel)"):
            t.add_column(col, justify="right")
        for name in ("dial-out", "dial-in"):
            lat = di["latency"]
            t.add_row(name, f"{di['throughput'][name]['mib_per_s']:.1f}",
                      f"{lat[f'{name} (keep-alive)']['p50_ms']:.3f}",
                      f"{lat[f'{name} (new CONNECT = new channel)']['p50_ms']:.3f}")
        console.print(t)
    rows = _targets(results)
    if rows:
        t = Table(title="Targets (issue 16; ratios are medians of interleaved rounds)")
        for col in ("metric", "measured", "target", "met"):
            t.add_column(col)
        for metric, measured, target, met in rows:
            t.add_row(metric, measured, target, "n/a" if met is None else "yes" if met else "NO")
        console.print(t)


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")


def plot(results: dict[str, Any], path: Path) -> None:
    """Throughput, latency and scale side by side in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, sc = results.get("sshd"), results.get("scale")
    panels = (3 if s else 0) + (1 if sc else 0)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    axes = list(axes) if panels > 1 else [axes]
    colors = {"ssh -L": "#1f77b4", "gateway": "#d62728"}
    if s:
        ax = axes.pop(0)
        names = ["direct", "ssh -L", "gateway CONNECT", "gateway gRPC"]
        x = range(len(names))
        for off, label in ((-0.2, "upload"), (0.2, "download")):
            ax.bar([i + off for i in x], [s["throughput"][label][n]["mib_per_s"] for n in names], width=0.4,
                   label=label)
        ax.set_xticks(list(x), ["direct", "ssh -L", "CONNECT", "gRPC"])
        ax.set_title(f"one stream, {s['cipher'].split('@')[0]}")
        ax.set_ylabel("MiB/s")
        ax.legend()
        ax = axes.pop(0)
        labels = list(s["latency"])
        short = [lbl.replace("gateway ", "gw ").replace(" = new channel", "").replace("(new channel per request)",
                                                                                        "") for lbl in labels]
        p50 = [s["latency"][k]["p50_ms"] for k in labels]
        p99 = [s["latency"][k]["p99_ms"] for k in labels]
        y = range(len(labels))
        ax.barh([i + 0.2 for i in y], p50, height=0.4, label="p50", color="#1f77b4")
        ax.barh([i - 0.2 for i in y], p99, height=0.4, label="p99", color="#ff7f0e")
        ax.set_yticks(list(y), short, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("ms per GET")
        ax.set_title("small requests")
        ax.legend()
        ax = axes.pop(0)
        names = ["ssh -L", "gateway CONNECT"]
        seq = [s["channel_open"][n]["sequential"]["per_second"] for n in names]
        conc = [s["channel_open"][n]["concurrent"]["per_second"] for n in names]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], seq, width=0.4, label="sequential")
        ax.bar([i + 0.2 for i in x], conc, width=0.4, label="100 concurrent")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("channel opens / s")
        ax.set_title("channel opens, one tunnel")
        ax.legend()
    if sc:
        ax = axes.pop(0)
        ns = [p["nodes"] for p in sc["points"]]
        ax.plot(ns, [p["gateway_rss_loaded"] / MiB for p in sc["points"]], "o-", color=colors["gateway"],
                label="gateway RSS")
        ax.plot(ns, [p["ssh_clients_rss_estimate"] / MiB for p in sc["points"]], "s--", color=colors["ssh -L"],
                label="N x ssh -N RSS (est.)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tunnels (N)")
        ax.set_ylabel("MiB")
        ax.set_title("memory at scale")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

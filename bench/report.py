"""Presenting results: the side-by-side table (rich), ``results.json`` and a PNG plot (matplotlib)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

KiB = 1024
MiB = 1024 * 1024


def _targets(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(metric, measured, target, met?) rows."""
    rows: list[tuple[str, str, str, bool | None]] = []
    s = results.get("sshd")
    if s:
        r = s["throughput"]["ratio_gateway_to_ssh"]
        rows.append(("throughput gateway / ssh -L", f"{r:.2f}x", ">= 0.9x", r >= 0.9))
        a = s["latency_added"]
        v = a["proxy_url_vs_ssh_L_new_channel"]
        if v is not None:
            rows.append(("proxy URL added latency / ssh -L (new channel)", f"{v:.2f}x", "<= 1.5x", v <= 1.5))
        v = a["proxy_url_vs_ssh_L_keepalive"]
        if v is not None:
            rows.append(("proxy URL added latency / ssh -L (keep-alive)", f"{v:.2f}x", "<= 1.5x", v <= 1.5))
    sc = results.get("scale")
    if sc:
        for p in sc["points"]:
            n = p["nodes"]
            if n >= 5000:
                rows.append((f"{n} tunnels up", f"{p['up_seconds']:.1f} s", "< 60 s", p["up_seconds"] < 60))
            rows.append((f"RSS per idle tunnel (N={n})", f"{p['rss_per_tunnel_kib']:.0f} KiB", "< 100 KiB",
                         p["rss_per_tunnel_kib"] < 100))
            if n >= 5000:
                rows.append((f"idle CPU at {n} (keepalive {p['keepalive_interval_s']:g} s)",
                             f"{p['idle_cpu_percent']:.1f} %", "< 5 %", p["idle_cpu_percent"] < 5))
            st = p.get("streams")
            if st:
                rows.append((f"status p99 with {st['opened']} idle streams held", f"{st['status_p99_ms_while_holding']}"
                             " ms", "< 100 ms", st["status_p99_ms_while_holding"] < 100))
                rows.append((f"status p99 while opening {st['requested']} streams",
                             f"{st['status_p99_ms_while_opening']} ms", "< 100 ms",
                             st["status_p99_ms_while_opening"] < 100))
    return rows


def print_tables(results: dict[str, Any], console: Console | None = None) -> None:
    """Print the side-by-side tables and the targets."""
    console = console or Console()
    s = results.get("sshd")
    if s:
        t = Table(title=f"One stream through a real sshd ({s['cipher']}, {s['bytes'] // MiB} MiB to a sink)")
        t.add_column("path")
        t.add_column("MiB/s", justify="right")
        t.add_column("CPU s per GiB", justify="right")
        for name in ("direct", "ssh -L", "gateway"):
            v = s["throughput"][name]
            t.add_row(name, f"{v['mib_per_s']:.0f}", f"{v.get('cpu_s_per_gib', '')}")
        console.print(t)
        t = Table(title="Small requests (sequential GETs of a tiny response)")
        for col in ("path", "p50 ms", "p99 ms"):
            t.add_column(col, justify="left" if col == "path" else "right")
        for name, v in s["latency"].items():
            t.add_row(name, f"{v['p50_ms']:.3f}", f"{v['p99_ms']:.3f}")
        console.print(t)
        t = Table(title="Channel opens on one tunnel (open, one GET, close)")
        for col in ("path", "sequential /s", "concurrent /s", "concurrent p99 ms"):
            t.add_column(col, justify="left" if col == "path" else "right")
        for name, v in s["channel_open"].items():
            c = v["concurrent"]
            t.add_row(name, f"{v['sequential']['per_second']:.0f}", f"{c['per_second']:.0f} (x{c['concurrency']})",
                      f"{c['p99_ms']:.1f}")
        console.print(t)
    sc = results.get("scale")
    if sc:
        t = Table(title="Scale: simulated nodes (asyncssh sshds in other processes), gateway in its own process")
        for col in ("N", "all up s", "gateway RSS MiB", "KiB/tunnel", f"{len('x')} ssh -N RSS MiB (est.)",
                    "idle CPU %", "notice s"):
            t.add_column(col, justify="right")
        for p in sc["points"]:
            t.add_row(str(p["nodes"]), f"{p['up_seconds']:.1f}", f"{p['gateway_rss_loaded'] / MiB:.0f}",
                      f"{p['rss_per_tunnel_kib']:.0f}", f"{p['ssh_clients_rss_estimate'] / MiB:.0f}",
                      f"{p['idle_cpu_percent']:.2f}", str(p["notice_seconds"]))
        t.columns[4].header = "N x ssh -N RSS MiB (est.)"
        console.print(t)
    rows = _targets(results)
    if rows:
        t = Table(title="Targets")
        for col in ("metric", "measured", "target", "met"):
            t.add_column(col)
        for metric, measured, target, met in rows:
            t.add_row(metric, measured, target, "yes" if met else "NO")
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
    colors = {"direct": "#999999", "ssh -L": "#1f77b4", "gateway": "#d62728"}
    if s:
        ax = axes.pop(0)
        names = ["direct", "ssh -L", "gateway"]
        vals = [s["throughput"][n]["mib_per_s"] for n in names]
        ax.bar(names, vals, color=[colors[n] for n in names])
        ax.set_title(f"one stream, {s['cipher'].split('@')[0]}")
        ax.set_ylabel("MiB/s")
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
        names = list(s["channel_open"])
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

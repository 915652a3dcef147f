"""Plain-text rendering of tunnel status for the CLI (unhealthy tunnels first)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

_ORDER = {"down": 0, "degraded": 1, "connecting": 2, "stopped": 3, "up": 4}
COLUMNS = ("NODE", "ADDRESS", "STATE", "SINCE", "CHANNELS", "IN", "OUT", "PROBE", "LAST ERROR")


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    secs = max(0, int((now or time.time()) - ts))
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


def sort_tunnels(tunnels: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(tunnels, key=lambda t: (_ORDER.get(t["state"], 0), t["node"]))


def row(t: dict[str, Any], now: float | None = None) -> tuple[str, ...]:
    probe = t.get("last_probe")
    probe_text = "-" if not probe else ("ok" if probe["ok"] else "FAIL") + f" {ago(probe['at'], now)} ago"
    return (
        t["node"], f"{t['address']}:{t['ssh_port']}", t["state"], ago(t["since"], now), str(t["open_channels"]),
        human_bytes(t["bytes_in"]), human_bytes(t["bytes_out"]), probe_text, (t.get("last_error") or "")[:80],
    )


def table(tunnels: Sequence[dict[str, Any]], now: float | None = None) -> str:
    rows = [COLUMNS, *(row(t, now) for t in sort_tunnels(tunnels))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

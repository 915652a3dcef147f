"""Rendering of tunnel status for people (rich): the table, one node's detail, and the console to print them on.

Unhealthy tunnels sort first (refused, gave-up, down, degraded, connecting, stopped, up). Colour only goes to a
terminal: a refused, gave-up, down or degraded row is red, connecting yellow, up green; piped output is plain text
whose columns split on whitespace, and a LAST ERROR longer than its column is cut at a word boundary (``...``).

Every string of the status API came from a peer at some point (an sshd's DISCONNECT text, a probe's answer, a node
address): :func:`safe` passes each through :func:`netnames.text.printable` before anything is rendered, so an
escape sequence in it is shown, never obeyed, whatever ``--color`` says.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from click import ClickException
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from netnames.text import printable

_ORDER = {"refused": 0, "gave-up": 1, "down": 2, "degraded": 3, "waiting": 4, "connecting": 4, "stopped": 5, "up": 6}
COLUMNS = ("NODE", "ADDRESS", "STATE", "SINCE", "CHANNELS", "IN", "OUT", "PATH", "PROBE", "LAST ERROR")
ROW_STYLE = {"refused": "red", "gave-up": "red", "down": "red", "degraded": "red", "connecting": "yellow",
             "waiting": "yellow",
             "stopped": "dim", "up": ""}
STATE_STYLE = {"refused": "bold red", "gave-up": "bold red", "down": "bold red", "degraded": "bold red",
               "connecting": "yellow", "waiting": "yellow", "stopped": "dim", "up": "green"}
PLAIN_WIDTH = 400
"""Width used when not on a terminal, so that piped rows are never wrapped."""
ERROR_WIDTH = 80
"""LAST ERROR is cut to this many characters in the table (``tunneld status NODE`` shows all of it)."""


def safe(value: Any) -> Any:
    """``value`` (a decoded JSON document) with every string made printable."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {safe(k): safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [safe(v) for v in value]
    return value


def shorten(text: str, width: int, placeholder: str = "...") -> str:
    """``text`` cut to at most ``width`` characters at a word boundary, ``placeholder`` marking the cut (inside a
    word only when the last word would leave less than half the width)."""
    if len(text) <= width:
        return text
    room = max(width - len(placeholder), 0)
    head = text[: room + 1]
    cut = head.rsplit(" ", 1)[0] if " " in head else ""
    if len(cut) < room // 2:
        cut = text[:room]
    return cut.rstrip(" ,;:") + placeholder


def human_bytes(n: int) -> str:
    """``1536`` -> ``1.5KiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"


def ago(ts: float | None, now: float | None = None) -> str:
    """A short age such as ``42s``, ``5m``, ``3h``; ``-`` for None."""
    if ts is None:
        return "-"
    secs = max(0, int((now or time.time()) - ts))
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


def sort_tunnels(tunnels: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Unhealthy first, then by node name."""
    return sorted(tunnels, key=lambda t: (_ORDER.get(t["state"], 0), t["node"]))


def _probe(t: dict[str, Any], now: float | None) -> str:
    probe = t.get("last_probe")
    if not probe:
        return "-"
    return ("ok" if probe["ok"] else "FAIL") + f" {ago(probe['at'], now)} ago"


def _where(t: dict[str, Any]) -> str:
    """``address:ssh_port`` of a dial-out tunnel; ``address dial-in[ from peer]`` of a dial-in one."""
    if t.get("mode") == "dial-in":
        return f"{t['address']} dial-in" + (f" from {t['peer']}" if t.get("peer") else "")
    return f"{t['address']}:{t['ssh_port']}"


def row(t: dict[str, Any], now: float | None = None) -> tuple[str, ...]:
    """One table row as text cells, in :data:`COLUMNS` order."""
    t = safe(t)
    return (
        t["node"], _where(t), t["state"], ago(t["since"], now), str(t["open_channels"]),
        human_bytes(t["bytes_in"]), human_bytes(t["bytes_out"]), t.get("packet_path") or "-", _probe(t, now),
        shorten(t.get("last_error") or "", ERROR_WIDTH),
    )


def tunnel_table(tunnels: Sequence[dict[str, Any]], now: float | None = None) -> Table:
    """The tunnel table as a rich renderable (unhealthy first, rows coloured by state)."""
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 2, 0, 0))
    for name in COLUMNS:
        table.add_column(name, no_wrap=name != "LAST ERROR", overflow="fold")
    for t in sort_tunnels(tunnels):
        cells = list(row(t, now))
        state = t["state"]
        cells_r: list[RenderableType] = [*cells[:2], Text(cells[2], style=STATE_STYLE.get(state, "")), *cells[3:]]
        table.add_row(*cells_r, style=ROW_STYLE.get(state, ""))
    return table


def overview(data: dict[str, Any], now: float | None = None) -> RenderableType:
    """``tunneld status``: the daemon's warnings about insecure settings in force, then the tunnel table."""
    warnings = [Text(f"WARNING: {w}", style="bold red") for w in data.get("gateway", {}).get("warnings") or ()]
    table = tunnel_table(data["tunnels"], now)
    return Group(*warnings, table) if warnings else table


def detail(t: dict[str, Any], now: float | None = None) -> Table:
    """One node's tunnel in detail (``tunneld status NODE``)."""
    now = now or time.time()
    t = safe(t)
    state = t["state"]
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0))
    table.add_column(style="bold")
    table.add_column(overflow="fold")

    def when(ts: float | None) -> str:
        if ts is None:
            return "-"
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f" ({ago(ts, now)} ago)"

    table.add_row("Node", t["node"])
    table.add_row("Address", _where(t))
    table.add_row("Mode", t.get("mode", "dial-out") + (f" ({t['replacements']} replaced connections)"
                                                       if t.get("replacements") else ""))
    table.add_row("State", Text(state, style=STATE_STYLE.get(state, "")))
    table.add_row("Since", when(t["since"]))
    table.add_row("Last error", Text(t.get("last_error") or "-", style="red" if t.get("last_error") else ""))
    table.add_row("Connects", f"{t.get('connects', 0)} (consecutive failures: {t.get('connect_failures', 0)})")
    retry = t.get("next_retry")
    table.add_row("Next retry", "-" if retry is None else f"in {max(0.0, retry - now):.1f}s")
    table.add_row("Channels", f"{t['open_channels']} open, {t.get('channels_total', 0)} total")
    path = t.get("packet_path")
    table.add_row("SSH packets", "-" if path is None else f"{path} path ({t.get('cipher') or '?'})")
    table.add_row("Bytes", f"in {human_bytes(t['bytes_in'])} ({t['bytes_in']}), "
                           f"out {human_bytes(t['bytes_out'])} ({t['bytes_out']})")
    probe = t.get("last_probe")
    if probe:
        verdict = Text("ok" if probe["ok"] else "FAILED", style="green" if probe["ok"] else "bold red")
        table.add_row("Last probe", Text.assemble(verdict, f" at {when(probe['at'])}, {probe['latency_ms']} ms"))
        table.add_row("Probe said", probe.get("detail") or "-")
    else:
        table.add_row("Last probe", "-")
    return table


def console(color: str = "auto", file: TextIO | None = None) -> Console:
    """A console for ``color`` = ``auto`` (colour on a terminal only), ``always`` or ``never`` (plain text, no
    escape sequence at all, even on a terminal)."""
    force = {"always": True, "never": False}.get(color)
    con = Console(file=file, force_terminal=force, color_system=None if color == "never" else "auto", highlight=False,
                  soft_wrap=False)
    out = file or sys.stdout
    if not (hasattr(out, "isatty") and out.isatty()):
        con.width = PLAIN_WIDTH
    return con


def to_text(renderable: RenderableType) -> str:
    """``renderable`` as plain text, trailing spaces removed (for logs and non-terminal output)."""
    buf = io.StringIO()
    Console(file=buf, width=PLAIN_WIDTH, color_system=None, highlight=False).print(renderable)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


def table(tunnels: Sequence[dict[str, Any]], now: float | None = None) -> str:
    """The tunnel table as plain text."""
    return to_text(tunnel_table(tunnels, now))


def show(con: Console, view: RenderableType) -> None:
    """Print ``view`` once: with colour on a (possibly forced) terminal, as plain text otherwise."""
    if isinstance(view, str):
        con.file.write(view + "\n")
        con.file.flush()
    elif con.is_terminal:
        con.print(view)
    else:
        con.file.write(to_text(view) + "\n")
        con.file.flush()


def _frame(title: str, view: Callable[[], RenderableType], interval: float) -> RenderableType:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        body = view()
    except ClickException as exc:  # the daemon went away or restarted: keep watching
        body = Text(f"error: {printable(exc.format_message())}", style="bold red")
    header = Text(f"Every {interval:g}s: {title}    {stamp}", style="dim")
    return Group(header, Text(), body)


def watch(con: Console, view: Callable[[], RenderableType], title: str, interval: float, count: int = 0,
          live: bool = True) -> None:
    """Refresh ``view`` every ``interval`` seconds until Ctrl-C (or ``count`` refreshes, when not 0).

    On a terminal the frame is redrawn in place (rich's Live); otherwise (or with ``live=False``, for JSON) each
    refresh is printed after the previous one.
    """
    n = 0
    try:
        if live and con.is_terminal:
            with Live(console=con, auto_refresh=False, transient=False) as screen:
                while count == 0 or n < count:
                    screen.update(_frame(title, view, interval), refresh=True)
                    n += 1
                    if count == 0 or n < count:
                        time.sleep(interval)
            return
        while count == 0 or n < count:
            if live:
                if n:
                    con.file.write("\n")
                show(con, _frame(title, view, interval))
            else:
                try:
                    show(con, view())
                except ClickException as exc:
                    sys.stderr.write(f"error: {printable(exc.format_message())}\n")
            n += 1
            if count == 0 or n < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        con.file.write("\n")

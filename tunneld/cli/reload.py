"""``tunneld reload``: SIGHUP the running daemon and wait for its answer (systemd's ``ExecReload=``).

``kill -HUP`` returns before the daemon has even seen the signal, and succeeds when the daemon refuses the new file.
This command reads the daemon's reload count from the status API, sends SIGHUP, and waits (bounded) until the count
moves: it exits 0 when the daemon applied the file, 1 (with the daemon's reasons) when it refused it or failed.
"""

from __future__ import annotations

import os
import signal
import time

import click

from tunneld.cli.localapi import DEFAULT_SOCKET, get_json

POLL_INTERVAL = 0.05


@click.command()
@click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True, envvar="TUNNELD_SOCKET",
              help="The daemon's status socket.")
@click.option("--pid", type=click.IntRange(1), default=None,
              help="The daemon's PID (systemd passes $MAINPID); default: the PID the status API reports.")
@click.option("--timeout", default=90.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds to wait for the daemon's answer.")
def reload(socket_path: str, pid: int | None, timeout: float) -> None:
    """Reload the running daemon's configuration and wait until it has; exit 1 if it refused the file."""
    info = get_json(socket_path, "/gateway")
    before = int(info["reload"]["generation"])
    target = pid if pid is not None else int(info["pid"])
    try:
        os.kill(target, signal.SIGHUP)
    except ProcessLookupError as exc:
        raise click.ClickException(f"no process {target} (is the daemon running?)") from exc
    except PermissionError as exc:
        raise click.ClickException(f"no permission to signal process {target} (run as root or as the daemon's "
                                   "user)") from exc
    deadline = time.monotonic() + timeout
    while True:
        last = get_json(socket_path, "/gateway")["reload"]
        if int(last["generation"]) > before:
            break
        if time.monotonic() >= deadline:
            raise click.ClickException(f"the daemon did not finish reloading within {timeout:g} s")
        time.sleep(POLL_INTERVAL)
    if last["outcome"] == "reloaded":
        click.echo("reloaded")
        return
    for problem in last["problems"] or ["(no reason given)"]:
        click.echo(f"error: {problem}", err=True)
    raise click.ClickException(f"reload {last['outcome']}: the daemon keeps its previous configuration")

"""The ``tunneld`` command line (click)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from tunneld import __version__
from tunneld.cli import render
from tunneld.cli.localapi import DEFAULT_CONFIG, DEFAULT_SOCKET, get_json, load_or_exit


@click.group()
@click.version_option(__version__, prog_name="tunneld")
def main() -> None:
    """SSH-tunnel proxy gateway for control-plane to node traffic."""


@main.command("check-config")
@click.argument("config", default=DEFAULT_CONFIG, type=click.Path(dir_okay=False))
def check_config(config: str) -> None:
    """Validate CONFIG and its inventory; print every mistake, exit non-zero if there is one."""
    cfg = load_or_exit(config)
    nodes = f"{len(cfg.nodes)} nodes"
    if cfg.inventory_source == "kubernetes":
        nodes = f"{len(cfg.nodes)} static nodes; the others come from the Kubernetes API at run time"
    click.echo(f"{cfg.path}: ok ({nodes})")
    if cfg.proxy.insecure_anonymous_loopback:
        from tunneld.config.access import INSECURE_ANONYMOUS
        click.echo(f"warning: {INSECURE_ANONYMOUS}", err=True)


@main.command()
@click.option("--config", "-c", default=DEFAULT_CONFIG, show_default=True, type=click.Path(dir_okay=False))
@click.option("--grace", default=10.0, show_default=True, help="Seconds open streams may take to finish on SIGTERM.")
def serve(config: str, grace: float) -> None:
    """Run the gateway daemon."""
    cfg = load_or_exit(config)  # before the heavy imports: a bad file is refused at once
    from tunneld.app import Gateway
    from tunneld.ops import lifecycle, logs

    logs.setup(cfg.log_level, cfg.log_format)

    from certs.ca import CAError
    from certs.store import StoreError
    from tunneld.tunnels.k8s_watch import KubeInventoryError

    async def main_() -> None:
        gateway = Gateway(cfg)
        await lifecycle.serve(gateway, grace, collector=gateway.collector)

    try:
        lifecycle.run(main_())
    # a port in use, an unreadable file, a CA key not matching its certificate, the API server refusing us
    except (OSError, CAError, StoreError, KubeInventoryError) as exc:
        click.echo(f"error: cannot start: {exc}", err=True)
        raise SystemExit(1) from exc


@main.command()
@click.option("--nodes", "-n", default=3, show_default=True, type=click.IntRange(1, 250))
@click.option("--ssh-port", default=2222, show_default=True, type=click.IntRange(1, 65535))
@click.option("--base-address", default="127.0.1.1", show_default=True, help="Address of the first node.")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), help="Where keys and config go.")
@click.option("--check", is_flag=True, help="Print status and a healthz through every tunnel, then exit.")
@click.option("--proxy-port", type=click.IntRange(0, 65535),
              help="Port of the proxy URLs on 127.0.0.1 (default 8001; with --check any free port; 0: any).")
@click.option("--log-level", default="warning", show_default=True)
def dev(nodes: int, ssh_port: int, base_address: str, workdir: Path | None, check: bool, proxy_port: int | None,
        log_level: str) -> None:
    """Start N simulated nodes and a gateway against them (nothing outside this package needed)."""
    from tunneld.dev import cluster
    from tunneld.ops import lifecycle, logs

    logs.setup(log_level)
    try:
        code = lifecycle.run(cluster.run(nodes, ssh_port, base_address, workdir, check, proxy_port))
    except cluster.DevStartError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C before the signal handlers are in place
        sys.exit(130)
    sys.exit(code)


@main.command()
@click.argument("node", required=False)
@click.option("--socket", "socket_path", default=DEFAULT_SOCKET, show_default=True, envvar="TUNNELD_SOCKET")
@click.option("--output", "-o", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.option("--watch", "-w", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.1, 3600),
              help="Seconds between refreshes with --watch.")
@click.option("--count", default=0, type=click.IntRange(0), help="With --watch: stop after this many refreshes.")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True,
              help="auto: colour on a terminal only.")
def status(node: str | None, socket_path: str, output: str, watch: bool, interval: float, count: int,
           color: str) -> None:
    """Show the tunnels of the running daemon (unhealthy first), or one NODE in detail."""
    path = f"/tunnels/{node}" if node else "/tunnels"
    con = render.console(color)

    def view() -> Any:
        data = get_json(socket_path, path)
        if output == "json":
            return json.dumps(data, indent=None if watch else 2)
        return render.detail(data) if node else render.overview(data)

    if not watch:
        render.show(con, view())
        return
    title = "tunneld status" + (f" {node}" if node else "")
    render.watch(con, view, title, interval, count, live=output != "json")

"""What the CLI shares to reach the running daemon: loading its config (or exiting with the problems) and HTTP over
the daemon's local unix socket."""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

import click

from netnames.text import printable
from tunneld.config import Config, load_checked, load_config
from tunneld.errors import ConfigError

DEFAULT_CONFIG = "/etc/tunneld/tunneld.toml"
"""The config file the commands read unless ``--config`` says otherwise (where the unit expects it)."""
DEFAULT_SOCKET = "/run/tunneld/tunneld.sock"
"""Where the daemon's status API listens unless ``[status] socket`` says otherwise."""


def load_or_exit(path: str, *, files: bool = True) -> Config:
    """The validated config at ``path``; on mistakes, print each one and exit with status 2.

    ``files``: also require the files it names to exist and be readable (not for commands that create them).
    """
    try:
        return load_checked(path) if files else load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            click.echo(f"error: {problem}", err=True)
        raise SystemExit(2) from exc


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (the daemon's status/admin socket, or the egress socket with ``set_tunnel``)."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock
        # As http.client does over TCP: CONNECT first when set_tunnel() was called (its attributes are not typed).
        if self._tunnel_host:  # type: ignore[attr-defined]  # set by http.client's set_tunnel()
            self._tunnel()  # type: ignore[attr-defined]  # http.client's own CONNECT step


def get_json(socket_path: str, path: str) -> Any:
    """GET ``path`` from the daemon's status API at ``socket_path``; any failure is a one-line ClickException."""
    conn = UnixHTTPConnection(socket_path, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        msg = f"cannot reach the daemon at {socket_path}: {exc.strerror} (is it running?)"
        raise click.ClickException(msg) from exc
    except PermissionError as exc:
        msg = f"no permission to use {socket_path} (run as root or as the daemon's group)"
        raise click.ClickException(msg) from exc
    except OSError as exc:
        raise click.ClickException(f"talking to {socket_path}: {exc}") from exc
    finally:
        conn.close()
    if resp.status == 404:
        raise click.ClickException(printable(body.decode("utf-8", "replace").strip()))
    if resp.status != 200:
        raise click.ClickException(f"daemon answered {resp.status}: {printable(body.decode('utf-8', 'replace')[:200])}")
    return json.loads(body)

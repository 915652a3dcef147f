"""Listening sockets and the one accept loop every listener runs (the fronts, and the certificates API).

``accept()`` fails when the process is out of file descriptors (EMFILE), the system is (ENFILE), or the kernel is
short of memory (ENOBUFS, ENOMEM); a client may also reset before it is accepted (ECONNABORTED). None of these may end
a listener: the loop logs the failure (once per episode, with a count when it clears), pauses so a connection still
waiting in the backlog does not spin it, and accepts again. asyncio's own server logs a traceback per failure and
uvloop's drops connections without a word; this loop is the same under both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("proxy.accept")

BACKLOG = 1024
"""Listen queue: an apiserver opens a connection per dial, in bursts (asyncio's default is 100)."""
ACCEPT_PAUSE = 0.1
"""Seconds to wait after a failed accept() before trying again."""


async def accept_forever(name: str, listener: socket.socket, admit: Callable[[socket.socket], None],
                         pause: float = ACCEPT_PAUSE) -> None:
    """Accept connections on ``listener`` until cancelled, handing each to ``admit`` (which must not block).

    A failed accept is logged and retried after ``pause``; it never ends the loop.
    """
    loop = asyncio.get_running_loop()
    failures = 0
    while True:
        try:
            conn, _ = await loop.sock_accept(listener)
        except OSError as exc:
            if failures == 0:
                log.warning("%s: accept failed, retrying every %.1f s: %s", name, pause, exc,
                            extra={"front": name, "errno": exc.errno})
            failures += 1
            await asyncio.sleep(pause)
            continue
        if failures:
            log.warning("%s: accepting again after %d failed attempts", name, failures, extra={"front": name})
            failures = 0
        conn.setblocking(False)
        admit(conn)


async def tcp_listener(host: str, port: int) -> socket.socket:
    """A non-blocking TCP socket listening on ``host:port`` (first address ``host`` resolves to)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def unix_listener(path: Path, mode: int) -> socket.socket:
    """A non-blocking unix socket listening on ``path``, created with ``mode`` (no window with looser permissions).

    The caller makes room for the path first (:func:`proxy.unixsock.prepare_socket_path`)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock

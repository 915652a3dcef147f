"""The peer of a unix socket connection, from the kernel (``SO_PEERCRED``): who is calling, not who they claim."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class PeerCred:
    """The process on the other end of a unix socket, as it was when it connected."""

    pid: int
    uid: int
    gid: int


def peer_cred(sock: socket.socket | None) -> PeerCred | None:
    """The peer's pid, uid and gid; None when ``sock`` is not a unix socket or the kernel cannot say."""
    if sock is None or sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (OSError, ValueError):  # ValueError: uvloop's socket object once the connection is closed
        return None
    if len(raw) != _UCRED.size:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCred(pid, uid, gid)


def peer_uid(sock: socket.socket | None) -> int | None:
    """The peer's uid (see :func:`peer_cred`)."""
    cred = peer_cred(sock)
    return cred.uid if cred is not None else None

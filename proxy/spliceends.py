"""How a splice ends, whichever way it copies: its bounds, its result, the reset of a client, the audit of an expiry.

Shared by :mod:`proxy.splice` (a task per direction) and :mod:`proxy.fastsplice` (callbacks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

audit = logging.getLogger("proxy.audit")

SPLICES: Counter[str] = Counter()
"""Splices started, by how they copy: ``callbacks`` (:mod:`proxy.fastsplice`) or ``tasks`` (:mod:`proxy.splice`)."""


@dataclass(frozen=True)
class StreamLimits:
    """Bounds on one spliced stream, in seconds; 0 turns a bound off."""

    idle_timeout: float = 14400.0
    """No byte in either direction for this long: the stream is ended as broken."""
    max_lifetime: float = 0.0
    """The stream is ended as broken this long after it started, busy or not."""


@dataclass
class SpliceResult:
    """Bytes moved, and whether a side broke (as opposed to both ending cleanly)."""

    upstream_bytes: int = 0
    downstream_bytes: int = 0
    broken: str | None = None
    last_activity: float = field(default_factory=time.monotonic)


def reset(writer: asyncio.StreamWriter) -> None:
    """Drop the client connection so that a TCP client sees a reset (ECONNRESET), not an end of data.

    ``transport.abort()`` alone closes the socket with a FIN; ``SO_LINGER`` with a zero timeout makes the close a RST.
    A unix socket has no reset: it is simply closed. A connection already closed is left alone (uvloop's socket
    object then raises ValueError, not OSError, for any option).
    """
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError, ValueError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def expired(limits: StreamLimits, started: float, last_activity: float) -> str | None:
    """Why the stream is over its bounds now, or None."""
    now = time.monotonic()
    if limits.max_lifetime > 0 and now - started >= limits.max_lifetime:
        return f"open for {limits.max_lifetime:g}s (limits.stream_max_lifetime)"
    if limits.idle_timeout > 0 and now - last_activity >= limits.idle_timeout:
        return f"idle for {limits.idle_timeout:g}s (limits.stream_idle_timeout)"
    return None


def next_check(limits: StreamLimits, started: float, last_activity: float) -> float | None:
    """Seconds until a bound could next expire (None: no bound)."""
    deadlines = []
    if limits.max_lifetime > 0:
        deadlines.append(started + limits.max_lifetime)
    if limits.idle_timeout > 0:
        deadlines.append(last_activity + limits.idle_timeout)
    if not deadlines:
        return None
    return max(0.0, min(deadlines) - time.monotonic()) + 0.01


def audit_expiry(why: str, result: SpliceResult, peer: str, target: str) -> None:
    """The audit line of a stream ended at its bounds."""
    audit.warning("stream ended: %s", why, extra={"peer": peer, "target": target, "up": result.upstream_bytes,
                                                  "down": result.downstream_bytes})

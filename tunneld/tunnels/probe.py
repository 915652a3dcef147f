"""The health probe: one HTTP/1.1 GET through a tunnel, judged by its status and a bounded read of its body."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proxy.client import get
from proxy.dialer import DialError, Stream, StreamError

MAX_RESPONSE = 16 * 1024


class ProbeFailed(Exception):
    """The probe did not get a 200 in time."""


Connect = Callable[[str, int], Awaitable[Stream]]


async def http_get(connect: Connect, host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """GET ``path`` from ``host:port`` over a stream from ``connect``; returns (status, body), the body cut at
    :data:`MAX_RESPONSE` bytes.

    Raises :class:`ProbeFailed`.
    """
    try:
        async with asyncio.timeout(timeout):
            stream = await connect(host, port)
            try:
                status, body, _ = await get(stream, host, path, max_body=MAX_RESPONSE,
                                            headers=[("User-Agent", "tunneld-probe"), ("Connection", "close")])
            finally:
                await stream.close()
    except TimeoutError as exc:
        raise ProbeFailed(f"GET {host}:{port}{path} timed out after {timeout:g}s") from exc
    except (DialError, StreamError) as exc:
        raise ProbeFailed(f"GET {host}:{port}{path}: {exc}") from exc
    return status, body


async def probe(connect: Connect, host: str, port: int, path: str, timeout: float) -> str:
    """Run the health probe; returns the body on 200, raises :class:`ProbeFailed` otherwise."""
    status, body = await http_get(connect, host, port, path, timeout)
    if status != 200:
        raise ProbeFailed(f"GET {host}:{port}{path} answered {status}: {body[:80].decode('utf-8', 'replace')}")
    return body.decode("utf-8", "replace").strip()

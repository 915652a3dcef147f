"""The health probe: one HTTP/1.1 GET through a tunnel, judged by its status line and a bounded read.

Deliberately tiny (no HTTP library) because it only needs ``200`` and must never buffer more than a few KiB.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from proxy.dialer import DialError, Stream, StreamError

MAX_RESPONSE = 16 * 1024


class ProbeFailed(Exception):
    """The probe did not get a 200 in time."""


Connect = Callable[[str, int], Awaitable[Stream]]


async def http_get(connect: Connect, host: str, port: int, path: str, timeout: float) -> tuple[int, bytes]:
    """GET ``path`` from ``host:port`` over a stream from ``connect``; returns (status, body).

    Raises :class:`ProbeFailed`.
    """
    try:
        async with asyncio.timeout(timeout):
            stream = await connect(host, port)
            try:
                request = (
                    f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tunneld-probe\r\nConnection: close\r\n\r\n"
                )
                await stream.write(request.encode("ascii"))
                buf = bytearray()
                while len(buf) <= MAX_RESPONSE:
                    chunk = await stream.read(MAX_RESPONSE)
                    if not chunk:
                        break
                    buf += chunk
                    if _complete(buf):
                        break
            finally:
                await stream.close()
    except TimeoutError as exc:
        raise ProbeFailed(f"GET {host}:{port}{path} timed out after {timeout:g}s") from exc
    except (DialError, StreamError) as exc:
        raise ProbeFailed(f"GET {host}:{port}{path}: {exc}") from exc
    return _parse(bytes(buf), f"{host}:{port}{path}")


def _complete(buf: bytearray) -> bool:
    head, sep, body = bytes(buf).partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            return len(body) >= int(value.strip())
    return False


def _parse(raw: bytes, what: str) -> tuple[int, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0]
    parts = status_line.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ProbeFailed(f"GET {what}: not an HTTP response ({status_line[:60]!r})")
    return int(parts[1]), body[:MAX_RESPONSE]


async def probe(connect: Connect, host: str, port: int, path: str, timeout: float) -> str:
    """Run the health probe; returns the body on 200, raises :class:`ProbeFailed` otherwise."""
    status, body = await http_get(connect, host, port, path, timeout)
    if status != 200:
        raise ProbeFailed(f"GET {host}:{port}{path} answered {status}: {body[:80].decode('utf-8', 'replace')}")
    return body.decode("utf-8", "replace").strip()

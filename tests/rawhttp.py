"""A deliberately plain HTTP/1.1 client for fault and abuse tests (h11 framing over asyncio streams).

It reports exactly how a response ended -- a complete message (final chunk or full Content-Length), a clean close
before the end, or a reset -- which is what the fault tests assert on: a truncated body must never look complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import h11

READ = 256 * 1024


@dataclass
class Result:
    """How one response went."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body_bytes: int = 0
    sha256: str = ""
    complete: bool = False
    """True only when h11 saw the end of the message (the final chunk, or all of Content-Length)."""
    error: str | None = None
    """Why it did not complete: ``reset``, ``truncated`` (clean close mid-body), or a protocol error."""
    body: bytes = b""
    """The first 64 KiB of the body (for messages)."""


async def open_egress(socket_path: Path | str, host: str, port: int,
                      timeout: float = 10.0) -> tuple[int, bytes, asyncio.StreamReader, asyncio.StreamWriter]:
    """CONNECT ``host:port`` over the egress unix socket; returns (status, head+body bytes read, reader, writer).

    On a 200 the reader/writer are the raw tunnel; on an error the body follows the head in the returned bytes.
    """
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if status != 200:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                head += await reader.read(65536)
        writer.close()
    return status, head, reader, writer


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, target: str,
                   *, body: bytes | None = None, headers: list[tuple[str, str]] | None = None,
                   timeout: float = 60.0, progress: asyncio.Event | None = None,
                   progress_after: int = 0) -> Result:
    """Send one request on an open connection and read the response; never raises for a broken response.

    ``progress`` is set once ``progress_after`` body bytes have arrived (so a test can inject a fault mid-body).
    """
    conn = h11.Connection(h11.CLIENT)
    hdrs = [("Host", "target"), *(headers or [])]
    if body is not None:
        hdrs.append(("Content-Length", str(len(body))))
    result = Result()
    digest = hashlib.sha256()
    try:
        writer.write(conn.send(h11.Request(method=method, target=target, headers=hdrs)))
        if body:
            writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        async with asyncio.timeout(timeout):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(READ))
                elif isinstance(event, h11.Response):
                    result.status = event.status_code
                    result.headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    digest.update(event.data)
                    result.body_bytes += len(event.data)
                    if len(result.body) < 65536:
                        result.body += bytes(event.data[: 65536 - len(result.body)])
                    if progress is not None and result.body_bytes >= progress_after:
                        progress.set()
                elif isinstance(event, h11.EndOfMessage):
                    result.complete = True
                    break
                else:
                    result.error = "truncated"
                    break
    except (ConnectionResetError, BrokenPipeError):
        result.error = "reset"
    except h11.RemoteProtocolError as exc:
        result.error = "truncated" if "without sending complete message body" in str(exc) else f"protocol: {exc}"
    except TimeoutError:
        result.error = "timeout"
    finally:
        result.sha256 = digest.hexdigest()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return result


async def get(host: str, port: int, target: str, **kw: object) -> Result:
    """One request on a fresh TCP connection."""
    reader, writer = await asyncio.open_connection(host, port)
    return await exchange(reader, writer, str(kw.pop("method", "GET")), target, **kw)  # type: ignore[arg-type]


async def raw(host_or_path: str | Path, port: int | None, data: bytes, *, timeout: float = 10.0,
              hold: float = 0.0) -> tuple[bytes, str]:
    """Send ``data`` as is, then read until the server closes; returns (bytes read, how it ended: eof/reset/timeout)."""
    if port is None:
        reader, writer = await asyncio.open_unix_connection(str(host_or_path))
    else:
        reader, writer = await asyncio.open_connection(str(host_or_path), port)
    out = bytearray()
    how = "eof"
    try:
        writer.write(data)
        await writer.drain()
        if hold:
            await asyncio.sleep(hold)
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(READ):
                out += chunk
    except (ConnectionResetError, BrokenPipeError):
        how = "reset"
    except TimeoutError:
        how = "timeout"
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    return bytes(out), how


def status_of(response: bytes) -> int:
    """The status code of a raw response (0 if there is none)."""
    parts = response.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return 0
    return int(parts[1])

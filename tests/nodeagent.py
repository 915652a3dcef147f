# Node agent for the SSH test bed (tests/sshbed.py).
#
# A tiny stdlib-only asyncio program that the bed starts inside every simulated node (inside the node's
# network namespace, or on the node's loopback address in fallback mode).  It stands in for the services a
# gateway would reach *through* an SSH tunnel:
#
#   * an HTTP/1.1 server answering ``GET /healthz`` with ``200 ok`` (any other path: 404), like the kubelet's
#     healthz endpoint on port 10248;
#   * on the same HTTP server, for fault tests: ``GET /stream?chunks=N&size=S&delay=SECONDS&seed=K`` (a chunked
#     response of N chunks of S bytes, given by :func:`pattern`, paced by ``delay``; the final chunk comes only
#     after the last one; ``&reset=K`` sends a TCP reset instead of chunk K) and ``POST /sink`` (reads the whole
#     body and answers ``<bytes> <sha256>``);
#   * optionally (``--app-host``/``--app-port``) the same HTTP server on the node's own address, where the
#     gateway's proxy URLs (``/api/v1/nodes/{name}:{port}/proxy/...``) reach it;
#   * a TCP echo server that echoes every byte back and honours half-close (after the client's EOF it finishes
#     echoing what it received, then closes).
#
# Once the listeners are bound it prints one line ``READY healthz=<port> echo=<port>[ app=<port>]`` on stdout,
# which the bed waits for.  SIGTERM/SIGINT make it exit promptly.
"""Healthz + echo agent run inside each simulated node of the SSH test bed."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import random
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

READ_SIZE = 256 * 1024
WRITE_HIGH_WATER = 4 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_LINES = 100
MAX_REQUESTS_PER_CONNECTION = 10_000
MAX_DISCARDED_BODY = 16 * 1024 * 1024
HTTP_IDLE_TIMEOUT = 60.0
MAX_STREAM_BYTES = 1024 * 1024 * 1024
MAX_SINK_BYTES = 1024 * 1024 * 1024


def pattern(seed: int, size: int, index: int) -> bytes:
    """Chunk ``index`` of a /stream response: a seeded random block, rotated by ``index`` (reordering shows)."""
    block = random.Random(seed).randbytes(size)
    shift = index % size if size else 0
    return block[shift:] + block[:shift]


class EchoProtocol(asyncio.Protocol):
    """Echo every received byte back; on EOF flush what is pending and close (half-close aware)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport and set generous write buffer limits for throughput."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        """Queue the bytes straight back to the peer."""
        if self.transport is not None:
            self.transport.write(data)

    def eof_received(self) -> bool:
        """Peer finished sending: returning False lets the transport flush its buffer and then close."""
        return False

    def pause_writing(self) -> None:
        """Backpressure: stop reading while our send buffer is above the high-water mark."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        """Send buffer drained: resume reading."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the transport."""
        self.transport = None


def _response(status: str, body: bytes, *, keep_alive: bool, head: bool) -> bytes:
    """Build a complete HTTP/1.1 response."""
    lines = [
        f"HTTP/1.1 {status}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        "",
        "",
    ]
    return "\r\n".join(lines).encode("ascii") + (b"" if head else body)


async def _read_request_head(reader: asyncio.StreamReader) -> list[bytes] | None:
    """Read the request line and headers; None on clean EOF before a request started."""
    lines: list[bytes] = []
    total = 0
    for _ in range(MAX_HEADER_LINES + 1):
        line = await asyncio.wait_for(reader.readline(), HTTP_IDLE_TIMEOUT)
        if not line:
            if lines:
                raise ConnectionError("EOF inside request head")
            return None
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise ValueError("request head too large")
        if line in (b"\r\n", b"\n"):
            if not lines:
                continue  # tolerate stray CRLF between requests
            return lines
        lines.append(line.rstrip(b"\r\n"))
    raise ValueError("too many header lines")


async def handle_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Serve HTTP/1.1 requests on one connection (keep-alive unless the client asks to close)."""
    try:
        for _ in range(MAX_REQUESTS_PER_CONNECTION):
            head = await _read_request_head(reader)
            if head is None:
                break
            parts = head[0].decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                writer.write(_response("400 Bad Request", b"bad request\n", keep_alive=False, head=False))
                await writer.drain()
                break
            method, target, version = parts
            headers: dict[str, str] = {}
            for raw in head[1:]:
                name, sep, value = raw.decode("latin-1").partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
            if version == "HTTP/1.0":
                keep_alive = "keep-alive" in connection
            else:
                keep_alive = "close" not in connection
            length = int(headers.get("content-length", "0") or "0")
            if length < 0 or (length > MAX_DISCARDED_BODY and not target.startswith("/sink")):
                raise ValueError("unacceptable Content-Length")
            if length and not target.startswith("/sink"):
                await asyncio.wait_for(reader.readexactly(length), HTTP_IDLE_TIMEOUT)
            path, _, query = target.partition("?")
            is_head = method == "HEAD"
            if path == "/stream" and method == "GET":
                await _stream(writer, parse_qs(query))
                break
            if path == "/sink" and method == "POST":
                await _sink(reader, writer, headers, keep_alive)
                if not keep_alive:
                    break
                continue
            if path != "/healthz":
                resp = _response("404 Not Found", b"not found\n", keep_alive=keep_alive, head=is_head)
            elif method in ("GET", "HEAD"):
                resp = _response("200 OK", b"ok", keep_alive=keep_alive, head=is_head)
            else:
                resp = _response("405 Method Not Allowed", b"method not allowed\n", keep_alive=keep_alive,
                                 head=False)
            writer.write(resp)
            await writer.drain()
            if not keep_alive:
                break
    except (ConnectionError, OSError, ValueError, TimeoutError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def _int(params: dict[str, list[str]], key: str, default: int) -> int:
    return int(params.get(key, [str(default)])[0])


async def _stream(writer: asyncio.StreamWriter, params: dict[str, list[str]]) -> None:
    """A chunked response paced by ``delay``; the terminating chunk only after every chunk was written."""
    chunks, size, seed = _int(params, "chunks", 10), _int(params, "size", 1024), _int(params, "seed", 0)
    delay = float(params.get("delay", ["0"])[0])
    reset_at = _int(params, "reset", -1)  # send a TCP reset instead of chunk number ``reset``
    if not (0 <= chunks and 0 < size and chunks * size <= MAX_STREAM_BYTES and 0 <= delay <= 60):
        raise ValueError("bad /stream parameters")
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    for i in range(chunks):
        if i == reset_at:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        data = pattern(seed, size, i)
        writer.write(b"%x\r\n%b\r\n" % (len(data), data))
        await writer.drain()
        if delay:
            await asyncio.sleep(delay)
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, headers: dict[str, str],
                keep_alive: bool) -> None:
    """Read a request body (Content-Length or chunked) and answer with its size and SHA-256."""
    digest, total = hashlib.sha256(), 0

    async def take(n: int) -> None:
        nonlocal total
        while n:
            data = await asyncio.wait_for(reader.read(min(n, READ_SIZE)), HTTP_IDLE_TIMEOUT)
            if not data:
                raise ConnectionError("EOF inside the request body")
            digest.update(data)
            total += len(data)
            n -= len(data)
            if total > MAX_SINK_BYTES:
                raise ValueError("body too large")

    if "chunked" in headers.get("transfer-encoding", "").lower():
        for _ in range(MAX_SINK_BYTES):
            size = int((await asyncio.wait_for(reader.readline(), HTTP_IDLE_TIMEOUT)).split(b";")[0], 16)
            if size == 0:
                await asyncio.wait_for(reader.readline(), HTTP_IDLE_TIMEOUT)
                break
            await take(size)
            await asyncio.wait_for(reader.readexactly(2), HTTP_IDLE_TIMEOUT)
    else:
        await take(int(headers.get("content-length", "0") or "0"))
    body = f"{total} {digest.hexdigest()}\n".encode()
    writer.write(_response("200 OK", body, keep_alive=keep_alive, head=False))
    await writer.drain()


async def _listen(start: Callable[[int], Awaitable[asyncio.Server]], port: int,
                  fallback: bool) -> asyncio.Server:
    """Call start(port); if the port is busy and fallback is set, retry once with an ephemeral port."""
    try:
        return await start(port)
    except OSError as exc:
        if not fallback or exc.errno != errno.EADDRINUSE:
            raise
        return await start(0)


async def main_async(args: argparse.Namespace) -> int:
    """Run both servers until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def start_http(port: int) -> asyncio.Server:
        return await asyncio.start_server(handle_http, args.host, port, reuse_address=True,
                                          limit=MAX_HEADER_BYTES)

    async def start_echo(port: int) -> asyncio.Server:
        return await loop.create_server(EchoProtocol, args.host, port, reuse_address=True, backlog=512)

    async def start_app(port: int) -> asyncio.Server:
        return await asyncio.start_server(handle_http, args.app_host, port, reuse_address=True,
                                          limit=MAX_HEADER_BYTES)

    http_srv = await _listen(start_http, args.healthz_port, args.fallback_ephemeral)
    echo_srv = await _listen(start_echo, args.echo_port, args.fallback_ephemeral)
    servers = [http_srv, echo_srv]
    hport = http_srv.sockets[0].getsockname()[1]
    eport = echo_srv.sockets[0].getsockname()[1]
    ready = f"READY healthz={hport} echo={eport}"
    if args.app_host:
        app_srv = await _listen(start_app, args.app_port, args.fallback_ephemeral)
        servers.append(app_srv)
        ready += f" app={app_srv.sockets[0].getsockname()[1]}"
    sys.stdout.write(ready + "\n")
    sys.stdout.flush()
    await stop.wait()
    for srv in servers:
        srv.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the agent."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--healthz-port", type=int, default=10248)
    parser.add_argument("--echo-port", type=int, default=7777)
    parser.add_argument("--app-host", default="", help="also serve HTTP on this (the node's own) address")
    parser.add_argument("--app-port", type=int, default=8080)
    parser.add_argument("--fallback-ephemeral", action="store_true",
                        help="if a port is already in use, listen on an ephemeral port instead")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())

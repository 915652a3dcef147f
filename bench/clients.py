"""Benchmark clients: how bytes and requests reach a node target by each path under comparison.

Paths: ``direct`` (TCP to the node's address, no SSH), ``ssh -L`` (TCP to the OpenSSH client's local port),
``CONNECT`` (the gateway's egress unix socket, then ``CONNECT host:port``) and the gateway's proxy URLs
(``/api/v1/nodes/{name}:{port}/proxy/...`` over one kept-alive TCP connection; the gateway opens a fresh channel per
request). Each opener returns a connected, ready-to-use blocking socket, so every path is measured by the same loop.
"""

from __future__ import annotations

import asyncio
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

Opener = Callable[[], socket.socket]
MiB = 1024 * 1024
BLOCK = 1 * MiB


class BenchError(RuntimeError):
    """A client saw something other than what the benchmark expects (a refused CONNECT, a bad status...)."""


def tcp(host: str, port: int) -> Opener:
    """Open plain TCP connections to ``host:port``."""
    def open_() -> socket.socket:
        s = socket.create_connection((host, port), timeout=30)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s
    return open_


def _read_head(s: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise BenchError(f"connection closed before a response head ({buf[:200]!r})")
        buf += chunk
        if len(buf) > 65536:
            raise BenchError("response head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def connect_via(socket_path: str, host: str, port: int) -> Opener:
    """Open streams through the gateway's CONNECT front on ``socket_path``."""
    request = f"CONNECT {host}:{port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    def open_() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(socket_path)
        s.sendall(request)
        head, rest = _read_head(s)
        if not head.startswith(b"HTTP/1.1 200"):
            s.close()
            raise BenchError(f"CONNECT {host}:{port} refused: {head[:200]!r}")
        if rest:
            raise BenchError("bytes after the CONNECT answer")
        return s
    return open_


def get(s: socket.socket, path: str, host: str = "node", headers: str = "") -> bytes:
    """One HTTP/1.1 GET on a kept-alive connection; returns the body (Content-Length or chunked framing).

    ``headers``: extra header lines, each ending in CRLF (the proxy front's Authorization, for instance).
    """
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: tunneld-bench\r\n{headers}\r\n".encode())
    head, body = _read_head(s)
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"GET {path}: {head.splitlines()[0]!r}")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        while not body.endswith(b"0\r\n\r\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise BenchError("chunked body cut short")
            body += chunk
        return body
    length = int(lower.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            raise BenchError("body cut short")
        body += chunk
    return body


@dataclass
class Latency:
    """Per-request latencies of one path, in milliseconds."""

    samples: list[float]

    def pct(self, p: float) -> float:
        xs = sorted(self.samples)
        return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]

    def summary(self) -> dict[str, float]:
        return {"n": len(self.samples), "p50_ms": round(self.pct(50), 3), "p99_ms": round(self.pct(99), 3),
                "mean_ms": round(statistics.fmean(self.samples), 3)}


def latency_keepalive(opener: Opener, path: str, count: int, headers: str = "") -> Latency:
    """``count`` sequential GETs on one connection."""
    s = opener()
    try:
        get(s, path, headers=headers)  # warm-up
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            get(s, path, headers=headers)
            out.append((time.perf_counter() - t0) * 1000)
        return Latency(out)
    finally:
        s.close()


def latency_fresh(opener: Opener, path: str, count: int) -> Latency:
    """``count`` sequential GETs, each on a new connection (a new SSH channel for the tunnelled paths)."""
    out = []
    for _ in range(count + 1):
        t0 = time.perf_counter()
        s = opener()
        try:
            get(s, path)
        finally:
            s.close()
        out.append((time.perf_counter() - t0) * 1000)
    return Latency(out[1:])


def upload(opener: Opener, nbytes: int) -> float:
    """Send ``nbytes`` to the node's transfer port; seconds from connect until it confirmed them all."""
    block = memoryview(bytes(BLOCK))
    t0 = time.perf_counter()
    s = opener()
    try:
        s.settimeout(600)
        s.sendall(b"up %d\n" % nbytes)
        left = nbytes
        while left > 0:
            n = min(left, BLOCK)
            s.sendall(block[:n])
            left -= n
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            answer += chunk
        elapsed = time.perf_counter() - t0
    finally:
        s.close()
    if answer.strip() != str(nbytes).encode():
        raise BenchError(f"sink confirmed {answer!r}, expected {nbytes}")
    return elapsed


def download(opener: Opener, nbytes: int) -> float:
    """Have the node's transfer port send ``nbytes``; seconds from connect until the last one arrived."""
    buf = bytearray(BLOCK)
    t0 = time.perf_counter()
    s = opener()
    try:
        s.settimeout(600)
        s.sendall(b"down %d\n" % nbytes)
        got = 0
        while got < nbytes:
            n = s.recv_into(buf)
            if not n:
                raise BenchError(f"download cut short at {got} of {nbytes} bytes")
            got += n
        elapsed = time.perf_counter() - t0
    finally:
        s.close()
    if got != nbytes:
        raise BenchError(f"downloaded {got} bytes, expected {nbytes}")
    return elapsed


def transfer(direction: str) -> Callable[[Opener, int], float]:
    """:func:`upload` or :func:`download` by name."""
    return upload if direction == "up" else download


def parallel(openers: list[Opener], nbytes: int, direction: str) -> float:
    """One transfer of ``nbytes`` per opener, all at once (a thread each); aggregate MiB/s."""
    errors: list[BaseException] = []
    move = transfer(direction)

    def one(opener: Opener) -> None:
        try:
            move(opener, nbytes)
        except BaseException as exc:  # reported below, after every thread ended
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(o,), daemon=True) for o in openers]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    elapsed = time.perf_counter() - t0
    if errors or any(t.is_alive() for t in threads):
        raise BenchError(f"parallel {direction}: {errors[:1]!r}")
    return len(openers) * nbytes / elapsed / MiB


# -- concurrent channel opens (asyncio) ---------------------------------------------------------------------------

AsyncOpener = Callable[[], "asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]]"]


async def _async_get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> None:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"GET {path}: {head[:100]!r}")
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    await reader.readexactly(length)


async def open_tcp(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(host, port)


async def open_connect(socket_path: str, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    writer.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        writer.close()
        raise BenchError(f"CONNECT refused: {head[:200]!r}")
    return reader, writer


async def channel_rate(open_: Callable[[], object], path: str, total: int, concurrency: int) -> dict[str, float]:
    """Open ``total`` streams (``concurrency`` at a time), one GET on each, close; returns opens per second."""
    latencies: list[float] = []
    todo = iter(range(total))
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for _ in todo:
            t0 = time.perf_counter()
            try:
                reader, writer = await open_()  # type: ignore[misc]
                try:
                    await _async_get(reader, writer, path)
                finally:
                    writer.close()
            except (OSError, BenchError, asyncio.IncompleteReadError):
                errors += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    lat = Latency(latencies or [0.0])
    return {"opens": total, "errors": errors, "concurrency": concurrency, "seconds": round(elapsed, 3),
            "per_second": round((total - errors) / elapsed, 1), "p50_ms": round(lat.pct(50), 3),
            "p99_ms": round(lat.pct(99), 3)}

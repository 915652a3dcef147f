"""The Konnectivity gRPC front measured like CONNECT: per-dial latency (dial, one GET, close) and throughput.

The client is the apiserver-shaped one the tests use (:mod:`tests.konnectivity`): one ``/ProxyService/Proxy``
stream per dial over one gRPC channel on the gateway's ``grpc_socket``, as kube-apiserver's konnectivity-client.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bench.clients import BenchError, Latency

CHUNK = 256 * 1024
GET = b"GET /healthz HTTP/1.1\r\nHost: node\r\nUser-Agent: tunneld-bench\r\n\r\n"


def _client(socket_path: str):  # type: ignore[no-untyped-def]
    from tests.konnectivity import Client  # grpcio and the generated module: imported when measured

    return Client(Path(socket_path))


async def _get(conn: object) -> None:
    await conn.write(GET)  # type: ignore[attr-defined]
    buf = b""
    while b"\r\n\r\n" not in buf:
        buf += await conn.read()  # type: ignore[attr-defined]
    head, _, body = buf.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise BenchError(f"gRPC GET: {head[:100]!r}")
    length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
    while len(body) < length:
        body += await conn.read()  # type: ignore[attr-defined]


def dial_latency(socket_path: str, address: str, count: int) -> Latency:
    """``count`` sequential dials, each with one GET and CLOSE_REQ (the first one is a warm-up)."""

    async def go() -> Latency:
        client = _client(socket_path)
        try:
            out = []
            for _ in range(count + 1):
                t0 = time.perf_counter()
                conn = await client.dial(address)
                await _get(conn)
                await conn.close()
                out.append((time.perf_counter() - t0) * 1000)
            return Latency(out[1:])
        finally:
            await client.close()

    return asyncio.run(go())


def transfer(socket_path: str, address: str, nbytes: int, direction: str) -> float:
    """One stream: ``up`` sends ``nbytes`` in DATA packets until the node confirms, ``down`` receives them."""

    async def go() -> float:
        client = _client(socket_path)
        try:
            t0 = time.perf_counter()
            conn = await client.dial(address)
            if direction == "up":
                await conn.write(b"up %d\n" % nbytes)
                block = bytes(CHUNK)
                left = nbytes
                while left > 0:
                    n = min(left, CHUNK)
                    await conn.write(block if n == CHUNK else block[:n])
                    left -= n
                answer = await conn.read()
                if answer.strip() != str(nbytes).encode():
                    raise BenchError(f"gRPC sink confirmed {answer!r}, expected {nbytes}")
            else:
                await conn.write(b"down %d\n" % nbytes)
                got = 0
                while got < nbytes:
                    got += len(await conn.read())
                if got != nbytes:
                    raise BenchError(f"gRPC download: {got} bytes, expected {nbytes}")
            elapsed = time.perf_counter() - t0
            rest, error = await conn.read_all()  # the node closes after the transfer: CLOSE_RSP, empty error
            if rest or error:
                raise BenchError(f"gRPC {direction}: after the transfer {len(rest)} bytes, error {error!r}")
            return elapsed
        finally:
            await client.close()

    return asyncio.run(go())

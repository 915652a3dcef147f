"""A tunnel's byte counters, in status and in metrics, equal exactly what a CONNECT client moved through it: 1 GiB
down and 1 GiB up under real OpenSSH sshd, spliced in callbacks (:mod:`proxy.fastsplice`)."""

from __future__ import annotations

import asyncio
import hashlib
import time

import pytest

from proxy.splice import SPLICES
from tests.sshbed import SshBed
from tunneld.app import Gateway
from tunneld.config import load_config

from .conftest import wait_for, write_config

pytestmark = pytest.mark.system

MiB = 1024 * 1024
GiB = 1024 * MiB


def counted(gw: Gateway, node: str) -> tuple[int, int, int, int]:
    """(in, out) from the status snapshot, then (in, out) from the metrics exposition."""
    snap = gw.pool.tunnels[node].snapshot()
    text = gw.metrics.exposition().decode()

    def metric(direction: str) -> int:
        for line in text.splitlines():
            if line.startswith("tunneld_tunnel_bytes_total{") and f'node="{node}"' in line \
                    and f'direction="{direction}"' in line:
                return int(float(line.rsplit(" ", 1)[1]))
        raise AssertionError(f"no tunneld_tunnel_bytes_total for {node} {direction} in:\n{text}")

    return snap["bytes_in"], snap["bytes_out"], metric("in"), metric("out")


@pytest.mark.slow
async def test_one_gib_each_way_is_counted_exactly(bed: SshBed) -> None:
    node = bed.add_node("node-0")
    path = write_config(bed, [node.name])
    # No health probe while the bytes move (only the first, before): it goes through the same tunnel's counters.
    text = path.read_text().replace("period = 0.5", "period = 3600")
    path.write_text(text + f'[egress]\nsocket = "{bed.workdir / "egress.sock"}"\n\n'
                    f"[policy]\nnode_ports = [{node.app_port}]\n")
    gw = Gateway(load_config(path))
    await gw.start()
    try:
        await wait_for(lambda: gw.pool.tunnels[node.name].state.value == "up", what="tunnel up")
        await wait_for(lambda: gw.pool.tunnels[node.name].last_probe is not None, what="the first (and last) probe")
        before = counted(gw, node.name)
        splices = SPLICES["callbacks"]
        moved_in = moved_out = 0
        started = time.monotonic()

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_unix_connection(str(bed.workdir / "egress.sock"))
            writer.write(f"CONNECT {node.address}:{node.app_port} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 "), head
            return reader, writer

        # 1 GiB down: a raw GET of the node agent's /stream, read to the end of the tunnel.
        reader, writer = await connect()
        request = b"GET /stream?chunks=16384&size=65536&seed=9 HTTP/1.1\r\nHost: node\r\n\r\n"
        writer.write(request)
        moved_out += len(request)
        async with asyncio.timeout(60):
            while data := await reader.read(1024 * 1024):
                moved_in += len(data)
        writer.close()
        assert moved_in > GiB

        # 1 GiB up: a POST to /sink, which answers with the size and digest it received.
        reader, writer = await connect()
        head = f"POST /sink HTTP/1.1\r\nHost: node\r\nContent-Length: {GiB}\r\nConnection: close\r\n\r\n".encode()
        writer.write(head)
        moved_out += len(head)
        digest = hashlib.sha256()
        async with asyncio.timeout(60):
            block = bytes(range(256)) * 4096  # 1 MiB
            for _ in range(GiB // MiB):
                writer.write(block)
                digest.update(block)
                await writer.drain()
            moved_out += GiB
            answer = await reader.read(-1)
        moved_in += len(answer)
        writer.close()
        assert answer.split(b"\r\n\r\n", 1)[1] == f"{GiB} {digest.hexdigest()}\n".encode(), answer[-200:]
        print(f"2 GiB through the tunnel in {time.monotonic() - started:.1f} s")

        assert SPLICES["callbacks"] == splices + 2  # both went through the callback splice
        await wait_for(lambda: gw.pool.open_channels == 0 and gw.egress.connections == 0, 10, "released")
        after = counted(gw, node.name)
        assert [a - b for a, b in zip(after, before, strict=True)] == [moved_in, moved_out, moved_in, moved_out]
    finally:
        await gw.stop()

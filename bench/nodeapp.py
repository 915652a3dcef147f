"""Targets on a benchmark node: a byte sink and a tiny kubelet-like HTTP server (stdlib asyncio, uvloop if present).

Run inside the node's network namespace (``python -I bench/nodeapp.py --sink-port P --http-port Q``), bound to all
of the namespace's addresses, so both the node's sshd (``127.0.0.1`` or the node address) and a direct client (the
node address over the veth) reach them.

* Sink: reads and discards everything; after the client's end of data (half-close) it answers one line with the
  byte count and closes. The sender stops its clock on that line, so all bytes have arrived when it does.
* HTTP: answers every request head (no bodies expected) with ``200`` and a small JSON body, keeping the
  connection alive, like a kubelet answering ``/healthz`` or a small ``/stats`` call.

Prints ``READY`` on stdout once both listeners are bound; exits on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

BODY = b'{"kind":"Status","apiVersion":"v1","status":"Success","message":"ok","code":200}\n'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\n\r\n"
    + BODY
)
MAX_HEAD = 64 * 1024


class Sink(asyncio.Protocol):
    """Discard bytes; report the count on end of data."""

    def __init__(self) -> None:
        self.count = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        """Count and drop."""
        self.count += len(data)

    def eof_received(self) -> bool:
        """Answer the count, then close."""
        if self.transport is not None:
            self.transport.write(b"%d\n" % self.count)
        return False


class TinyHTTP(asyncio.Protocol):
    """Answer each request head with the same small response (keep-alive)."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        """Answer every complete head in the buffer."""
        self.buf += data
        assert self.transport is not None
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            self.buf = self.buf[end + 4:]
            self.transport.write(RESPONSE)
        if len(self.buf) > MAX_HEAD:
            self.transport.abort()


async def main(sink_port: int, http_port: int) -> None:
    """Serve until SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sink = await loop.create_server(Sink, None, sink_port, reuse_address=True, backlog=1024)
    http = await loop.create_server(TinyHTTP, None, http_port, reuse_address=True, backlog=1024)
    print("READY", flush=True)
    await stop.wait()
    sink.close()
    http.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sink-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.run(main(args.sink_port, args.http_port))
    except ImportError:
        asyncio.run(main(args.sink_port, args.http_port))

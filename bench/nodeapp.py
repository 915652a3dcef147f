"""Targets on a benchmark node: a byte sink and a tiny kubelet-like HTTP server (stdlib asyncio, uvloop if present).

Run inside the node's network namespace (``python -I bench/nodeapp.py --sink-port P --http-port Q``), bound to all
of the namespace's addresses, so both the node's sshd (``127.0.0.1`` or the node address) and a direct client (the
node address over the veth) reach them.

* Transfer (the "sink" port): ``up N`` reads and discards N bytes, then answers one line with the count and closes
  (the sender stops its clock on that line, so all bytes have arrived when it does); ``down N`` sends N bytes, then
  closes (the receiver stops its clock at the N-th byte).
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
BLOCK = 256 * 1024
ZEROS = memoryview(bytes(BLOCK))


class Transfer(asyncio.Protocol):
    """One transfer per connection, named by its first line: ``up N`` or ``down N``.

    ``up N``: read and discard N bytes, then answer ``N`` and a newline and close. ``down N``: send N bytes (with
    the transport's flow control), then close. The end is by count, not by half-close, so a path without a
    half-close (Konnectivity's gRPC, whose CLOSE_REQ drops what is in flight) is measured by the same rule.
    """

    def __init__(self) -> None:
        self.head = b""
        self.total = -1  # bytes to read (up), -1 until the command line arrived
        self.seen = 0
        self.send_left = 0
        self.paused = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        """Parse the command, then count (up)."""
        assert self.transport is not None
        if self.total < 0:
            self.head += data
            if b"\n" not in self.head:
                if len(self.head) > 64:
                    self.transport.abort()
                return
            line, _, data = self.head.partition(b"\n")
            verb, _, count = line.partition(b" ")
            if not count.isdigit() or verb not in (b"up", b"down"):
                self.transport.abort()
                return
            self.total = int(count) if verb == b"up" else 0
            if verb == b"down":
                self.send_left = int(count)
                self._send()
                return
        self.seen += len(data)
        if self.seen >= self.total and self.send_left == 0:
            self.transport.write(b"%d\n" % self.seen)
            self.transport.close()

    def _send(self) -> None:
        assert self.transport is not None
        while self.send_left > 0 and not self.paused:
            n = min(self.send_left, BLOCK)
            self.transport.write(ZEROS[:n])
            self.send_left -= n
        if self.send_left == 0:
            self.transport.close()

    def pause_writing(self) -> None:
        """The transport's buffer is full: stop until resumed."""
        self.paused = True

    def resume_writing(self) -> None:
        """Go on sending."""
        self.paused = False
        self._send()


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
    sink = await loop.create_server(Transfer, None, sink_port, reuse_address=True, backlog=1024)
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

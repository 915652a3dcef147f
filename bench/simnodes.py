"""A process holding many simulated nodes for the scale benchmark: one asyncssh sshd per node on its own 127.x address.

    python -m bench.simnodes --first I --count C --port P --workdir DIR

Node ``i`` listens on :func:`address` (i) port P with its own ed25519 host key and a host certificate from the CA in
DIR (``ssh_ca``), and accepts the gateway's key (``client.pub``). A ``direct-tcpip`` channel to any destination is
accepted and answered in process: each HTTP request head gets ``200 ok`` (closing after it when the request says
``Connection: close``, as the health probe does); a channel on which nothing is sent just stays open, which is what
the idle-stream test holds. Several hundred nodes share one process so that thousands of them do not need
thousands of processes, and none of them shares the gateway's process. Prints ``READY <count>`` once all listen.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

import asyncssh

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


def address(i: int) -> str:
    """The loopback address of simulated node ``i`` (127.200.0.1 upwards; loopback tests use 127.100-139)."""
    return f"127.{200 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


def name(i: int) -> str:
    """The inventory name of simulated node ``i``."""
    return f"sim-{i:05d}"


class _Session(asyncssh.SSHTCPSession[bytes]):
    def __init__(self) -> None:
        self._chan: Any = None
        self._buf = b""

    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        self._buf += data
        while (end := self._buf.find(b"\r\n\r\n")) >= 0:
            head, self._buf = self._buf[:end].lower(), self._buf[end + 4:]
            self._chan.write(RESPONSE)
            if b"connection: close" in head:
                self._chan.write_eof()
                self._chan.close()
                return
        if len(self._buf) > 65536:
            self._chan.close()


class _Server(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        return _Session()


async def serve(first: int, count: int, port: int, workdir: Path) -> None:
    """Start ``count`` nodes from index ``first``; serve until SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    ca = asyncssh.read_private_key(str(workdir / "ssh_ca"))
    authorized = asyncssh.import_authorized_keys((workdir / "client.pub").read_text())
    servers = []
    for i in range(first, first + count):
        key = asyncssh.generate_private_key("ssh-ed25519")
        cert = ca.generate_host_certificate(key, name(i), principals=[name(i), address(i)], valid_after="-5m",
                                            valid_before="+1d")
        servers.append(await asyncssh.create_server(
            _Server, address(i), port, server_host_keys=[(key, cert)], authorized_client_keys=authorized,
            allow_scp=False, line_editor=False, reuse_address=True, backlog=64,
        ))
    print(f"READY {count}", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.first, args.count, args.port, args.workdir))
    else:
        uvloop.run(serve(args.first, args.count, args.port, args.workdir))


if __name__ == "__main__":
    main()

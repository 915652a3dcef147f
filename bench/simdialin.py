"""A process holding many simulated *dial-in* nodes: asyncssh clients that each do what ``ssh -N -R 1080`` does.

    python -m bench.simdialin --first I --count C --gateway HOST:PORT --workdir DIR [--jitter S]

Node ``i`` (named and addressed as in :mod:`bench.simnodes`) makes its own ed25519 key with a user certificate from
the user CA in DIR (``ssh_user_ca``: principal ``node:<name>``, only port forwarding), trusts the gateway's host key
only through the ``@cert-authority`` line for the host CA (``ssh_ca.pub``), logs in as ``node:<name>``, asks for one
``tcpip-forward`` of port 1080 and answers every ``forwarded-tcpip`` channel the gateway opens to it as OpenSSH's
reverse dynamic forward does: as a SOCKS5 server (no authentication, CONNECT only). Behind the SOCKS reply each
HTTP request head gets ``200 ok`` (as :mod:`bench.simnodes` answers), or, with ``--echo``, the bytes come back.

Like ``systemd/tunneld-node@.service`` (``Restart=always`` after a random 0-30 s sleep), a node whose connection ends
or fails sleeps a random 0 to ``--jitter`` seconds and connects again. Prints ``READY <count>`` once every node has
its key, then runs until SIGTERM; ``STATS <connects> <failures>`` on stdout at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import struct
from pathlib import Path
from typing import Any

import asyncssh

from bench.simnodes import RESPONSE, address, name

SOCKS_PORT = 1080


class _Socks(asyncssh.SSHTCPSession[bytes]):
    """One forwarded channel: a SOCKS5 CONNECT, then HTTP answers (or an echo)."""

    def __init__(self, echo: bool) -> None:
        self._chan: Any = None
        self._buf = b""
        self._stage = 0  # 0 greeting, 1 request, 2 connected
        self._echo = echo

    def connection_made(self, chan: Any) -> None:
        self._chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self._stage == 2 and self._echo:
            self._chan.write(data)
            return
        self._buf += data
        if self._stage == 0:
            if len(self._buf) < 2 or len(self._buf) < 2 + self._buf[1]:
                return
            if self._buf[0] != 5 or 0 not in self._buf[2:2 + self._buf[1]]:
                self._chan.close()
                return
            self._buf = self._buf[2 + self._buf[1]:]
            self._chan.write(b"\x05\x00")
            self._stage = 1
        if self._stage == 1:
            need = _request_length(self._buf)
            if need is None or len(self._buf) < need:
                if len(self._buf) > 300:
                    self._chan.close()
                return
            if self._buf[1] != 1:
                self._chan.write(b"\x05\x07\x00\x01" + bytes(6))
                self._chan.close()
                return
            self._buf = self._buf[need:]
            self._chan.write(b"\x05\x00\x00\x01" + bytes(4) + struct.pack("!H", 0))
            self._stage = 2
            if self._echo:
                if self._buf:
                    self._chan.write(self._buf)
                self._buf = b""
                return
        while (end := self._buf.find(b"\r\n\r\n")) >= 0:
            head, self._buf = self._buf[:end].lower(), self._buf[end + 4:]
            self._chan.write(RESPONSE)
            if b"connection: close" in head:
                self._chan.write_eof()
                self._chan.close()
                return
        if len(self._buf) > 65536:
            self._chan.close()

    def eof_received(self) -> bool:
        return False


def _request_length(buf: bytes) -> int | None:
    """The length of a SOCKS5 request at the start of ``buf``, or None until enough of it arrived."""
    if len(buf) < 5:
        return None
    atyp = buf[3]
    if atyp == 1:
        return 4 + 4 + 2
    if atyp == 4:
        return 4 + 16 + 2
    if atyp == 3:
        return 4 + 1 + buf[4] + 2
    return 4  # unknown: answered as unsupported once this much is here


class Node:
    """One simulated dial-in node and its reconnect loop."""

    def __init__(self, i: int, ca: asyncssh.SSHKey, known_hosts: Any, gateway: tuple[str, int], jitter: float,
                 echo: bool) -> None:
        self.name = name(i)
        self.address = address(i)
        key = asyncssh.generate_private_key("ssh-ed25519")
        cert = ca.generate_user_certificate(key, f"{self.name}-cert", principals=[f"node:{self.name}"],
                                            valid_after="-5m", valid_before="+1d", permit_port_forwarding=True,
                                            permit_agent_forwarding=False, permit_x11_forwarding=False,
                                            permit_pty=False, permit_user_rc=False)
        self.keys = [(key, cert)]
        self.known_hosts = known_hosts
        self.gateway = gateway
        self.jitter = jitter
        self.echo = echo
        self.connects = 0
        self.failures = 0

    async def run(self, stop: asyncio.Event, first_delay: float) -> None:
        delay = first_delay
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), delay)
                return
            except TimeoutError:
                pass
            try:
                await self._once(stop)
            except (OSError, asyncssh.Error, TimeoutError):
                self.failures += 1
            delay = random.uniform(0, self.jitter) + 0.1

    async def _once(self, stop: asyncio.Event) -> None:
        host, port = self.gateway
        async with asyncssh.connect(
                host, port, username=f"node:{self.name}", client_keys=self.keys, known_hosts=self.known_hosts,
                agent_path=None, config=None, connect_timeout=30, keepalive_interval=15, keepalive_count_max=3,
                password_auth=False, kbdint_auth=False, gss_auth=False, host_based_auth=False) as conn:
            await conn.create_server(lambda orig_host, orig_port: _Socks(self.echo), "", SOCKS_PORT)
            self.connects += 1
            closed = asyncio.ensure_future(conn.wait_closed())
            stopping = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closed.cancel()
                stopping.cancel()


async def serve(first: int, count: int, gateway: tuple[str, int], workdir: Path, jitter: float, echo: bool) -> None:
    """Run ``count`` nodes from index ``first`` until SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    ca = asyncssh.read_private_key(str(workdir / "ssh_user_ca"))
    host_ca = (workdir / "ssh_ca.pub").read_text().strip()
    known_hosts = asyncssh.import_known_hosts(f"@cert-authority * {host_ca}\n")
    nodes = [Node(i, ca, known_hosts, gateway, jitter, echo) for i in range(first, first + count)]
    print(f"READY {count}", flush=True)
    await asyncio.gather(*(n.run(stop, random.uniform(0, jitter)) for n in nodes))
    print(f"STATS {sum(n.connects for n in nodes)} {sum(n.failures for n in nodes)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--first", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--gateway", required=True, help="HOST:PORT of the [dialin] listener")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--jitter", type=float, default=30.0, help="reconnect after a random 0..JITTER s")
    parser.add_argument("--echo", action="store_true", help="echo bytes after the SOCKS reply instead of HTTP")
    args = parser.parse_args()
    host, _, port = args.gateway.rpartition(":")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.first, args.count, (host, int(port)), args.workdir, args.jitter, args.echo))
    else:
        uvloop.run(serve(args.first, args.count, (host, int(port)), args.workdir, args.jitter, args.echo))


if __name__ == "__main__":
    main()

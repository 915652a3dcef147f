"""A SOCKS5 (RFC 1928) CONNECT client, spoken on a ``forwarded-tcpip`` channel to a dial-in node's OpenSSH client.

A node running ``ssh -R <port>`` (reverse *dynamic* forwarding) answers every channel opened to that forward as a
SOCKS server: we send a greeting offering only "no authentication" (``05 01 00``), expect ``05 00``, send
``CONNECT`` for the host exactly as the policy checked it (a domain name, or an IPv4/IPv6 address in binary), and
read the reply (``05 REP 00 ATYP BND.ADDR BND.PORT``). Reply codes map onto the typed dial errors; a channel that
ends before the reply (OpenSSH closes it when ``PermitRemoteOpen`` forbids the destination) counts as refused.

The request and reply formats are pure functions (:func:`connect_request`, :func:`parse_reply`); :func:`handshake`
does the I/O over any :class:`proxy.dialer.Stream`, with a timeout.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Protocol

from tunneld.errors import ChannelRefused, DialError, DialTimeout, StreamError, TunnelDown

VERSION = 5
NO_AUTH = 0
CMD_CONNECT = 1
ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6 = 1, 3, 4
GREETING = bytes((VERSION, 1, NO_AUTH))
MAX_REPLY = 4 + 1 + 255 + 2


class SocksRefused(ChannelRefused):
    """The node's SOCKS side refused the CONNECT (502)."""


class SocksUnreachable(ChannelRefused):
    """The node reports the destination network or host unreachable (502)."""


class SocksTimeout(DialTimeout):
    """No answer in time, or the node reports a TTL expiry (504)."""


# RFC 1928 section 6 reply codes -> (error class, what it means)
REPLIES: dict[int, tuple[type[DialError], str]] = {
    1: (SocksRefused, "general SOCKS server failure"),
    2: (SocksRefused, "connection not allowed by ruleset"),
    3: (SocksUnreachable, "network unreachable"),
    4: (SocksUnreachable, "host unreachable"),
    5: (SocksRefused, "connection refused"),
    6: (SocksTimeout, "TTL expired"),
    7: (SocksRefused, "command not supported"),
    8: (SocksRefused, "address type not supported"),
}


class ByteStream(Protocol):
    async def read(self, n: int = ...) -> bytes: ...
    async def write(self, data: bytes) -> None: ...


def connect_request(host: str, port: int) -> bytes:
    """The CONNECT request for ``host`` (already in normal form) and ``port``."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("ascii")
        if not 0 < len(name) < 256:
            raise ValueError(f"host name of {len(name)} bytes cannot be sent in SOCKS5") from None
        addr = bytes((ATYP_DOMAIN, len(name))) + name
    else:
        addr = bytes((ATYP_IPV4 if ip.version == 4 else ATYP_IPV6,)) + ip.packed
    return bytes((VERSION, CMD_CONNECT, 0)) + addr + port.to_bytes(2, "big")


def parse_reply(buf: bytes) -> tuple[int, int] | None:
    """``(reply code, length)`` of the complete reply at the start of ``buf``, or None if more bytes are needed.

    Raises :class:`ValueError` on a malformed reply (wrong version, reserved byte, address type)."""
    if len(buf) < 5:
        return None
    if buf[0] != VERSION or buf[2] != 0:
        raise ValueError(f"not a SOCKS5 reply (starts {buf[:3].hex()})")
    atyp = buf[3]
    if atyp == ATYP_IPV4:
        length = 4 + 4 + 2
    elif atyp == ATYP_IPV6:
        length = 4 + 16 + 2
    elif atyp == ATYP_DOMAIN:
        length = 4 + 1 + buf[4] + 2
    else:
        raise ValueError(f"SOCKS5 reply with unknown address type {atyp}")
    return (buf[1], length) if len(buf) >= length else None


async def _read_exact(stream: ByteStream, n: int, host: str, port: int, where: str) -> bytes:
    """Exactly ``n`` bytes (never more: what follows the reply belongs to the target)."""
    buf = b""
    for _ in range(n):  # bounded: each round reads at least one byte or ends
        try:
            data = await stream.read(n - len(buf))
        except StreamError as exc:
            raise TunnelDown(f"SOCKS to {host}:{port} via node {where}: {exc}") from exc
        if not data:
            raise SocksRefused(f"node {where} closed the channel before answering CONNECT {host}:{port} "
                               "(not permitted by its PermitRemoteOpen, or the connection failed)")
        buf += data
        if len(buf) == n:
            break
    return buf


async def handshake(stream: ByteStream, host: str, port: int, timeout: float, where: str) -> None:
    """Greet and CONNECT to ``host:port`` within ``timeout``; afterwards the stream carries the target's bytes.

    ``where`` names the node for messages. Raises :class:`SocksRefused`, :class:`SocksUnreachable`,
    :class:`SocksTimeout` or :class:`~tunneld.errors.TunnelDown`."""
    try:
        request = connect_request(host, port)
    except ValueError as exc:
        raise SocksRefused(f"cannot ask node {where} for {host}:{port}: {exc}") from exc
    try:
        async with asyncio.timeout(timeout):
            try:
                await stream.write(GREETING + request)  # pipelined: OpenSSH reads both from its buffer
            except StreamError as exc:
                raise TunnelDown(f"SOCKS to {host}:{port} via node {where}: {exc}") from exc
            method = await _read_exact(stream, 2, host, port, where)
            if method != bytes((VERSION, NO_AUTH)):
                raise SocksRefused(f"node {where} refused SOCKS5 without authentication ({method.hex()})")
            head = await _read_exact(stream, 5, host, port, where)
            try:
                parsed = parse_reply(head + bytes(MAX_REPLY))  # the length only depends on the first 5 bytes
            except ValueError as exc:
                raise SocksRefused(f"node {where}: {exc}") from exc
            assert parsed is not None
            code, length = parsed
            await _read_exact(stream, length - 5, host, port, where)
            if code != 0:
                cls, why = REPLIES.get(code, (SocksRefused, f"reply code {code}"))
                raise cls(f"node {where} could not connect to {host}:{port}: {why}")
    except TimeoutError as exc:
        raise SocksTimeout(f"SOCKS CONNECT to {host}:{port} via node {where} timed out after {timeout:g}s") from exc

"""The SSH boundary: the only module of the daemon that imports asyncssh.

:func:`connect` opens one client connection to a node's sshd with strict host-key checking and returns an
:class:`SSHLink`; :meth:`SSHLink.open_stream` opens a ``direct-tcpip`` channel through it. asyncssh's exceptions are
translated here into the project's typed errors (:mod:`tunneld.errors`), so nothing above this module needs to know
which SSH library carries the bytes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from netnames import normalize_host
from tunneld.config import Node, SSHSettings
from tunneld.errors import (
    AuthFailed,
    ChannelRefused,
    ConnectFailed,
    ConnectTimeout,
    DialTimeout,
    HostKeyRejected,
    StreamError,
    TunnelDown,
)

log = logging.getLogger("tunneld.ssh")

# Larger than asyncssh's default so one channel can fill a fast link; still a hard bound on what one slow reader
# can make the node's sshd buffer for us.
CHANNEL_WINDOW = 4 * 1024 * 1024
READ_SIZE = 256 * 1024
# Cipher preference: asyncssh's own list starts with chacha20-poly1305, which it computes in several calls per packet;
# AES-GCM is one call into OpenSSL (AES-NI) per packet. Same set of ciphers, AES-GCM first (measured: bench/).
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
ENCRYPTION_ALGS = [*PREFERRED_CIPHERS, *(
    alg.decode() for alg in asyncssh.encryption.get_default_encryption_algs() if alg.decode() not in PREFERRED_CIPHERS
)]
# asyncssh sends an empty SSH_MSG_IGNORE before every packet it encrypts: the RFC 4251 section 9.3.1 countermeasure
# against chosen-plaintext attacks on CBC's predictable IVs. AEAD ciphers have no such IVs (OpenSSH sends no such
# packets), and with them the extra packet only doubles the encryptions and socket writes per packet sent.
AEAD_CIPHERS = frozenset({"aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com"})
_EMPTY_STRING = b"\x00\x00\x00\x00"  # an SSH string of length 0 (RFC 4251 section 5), the IGNORE's data
# RFC 4254 section 5.1 reason codes: OpenSSH's description is often just "open failed", the code says why.
_OPEN_FAILURES = {
    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED: "administratively prohibited (sshd forbids forwarding there)",
    asyncssh.OPEN_CONNECT_FAILED: "connect failed",
    asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE: "unknown channel type",
    asyncssh.OPEN_RESOURCE_SHORTAGE: "resource shortage",
}


@dataclass
class Counters:
    """Traffic through one tunnel (all its channels)."""

    bytes_in: int = 0
    bytes_out: int = 0
    open_channels: int = 0
    channels_total: int = 0


class _Client(asyncssh.SSHClient):
    def __init__(self, dialled: str | None = None) -> None:
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._dialled = dialled

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        if self._dialled is not None:  # called before the key exchange: the host key is not checked yet
            _require_named_host_certificate(conn, self._dialled)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(_describe(exc) if exc else "connection closed")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncssh.DisconnectError):
        return f"disconnected: {exc.reason or type(exc).__name__}"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    return str(exc) or type(exc).__name__


def _known_hosts(node: Node, ssh: SSHSettings) -> Any:
    if node.host_key is not None:
        try:
            key = asyncssh.read_public_key(str(node.host_key))
        except (OSError, asyncssh.KeyImportError) as exc:
            raise HostKeyRejected(f"cannot read pinned host key {node.host_key}: {exc}") from exc
        return ([key], [], [])
    path = node.known_hosts or ssh.known_hosts
    if path is None:
        return None
    try:
        return asyncssh.read_known_hosts(str(path))
    except (OSError, ValueError) as exc:
        raise HostKeyRejected(f"cannot read known_hosts {path}: {exc}") from exc


def _require_named_host_certificate(conn: asyncssh.SSHClientConnection, dialled: str) -> None:
    """Refuse a host certificate (from a trusted CA) unless one of its principals is ``dialled``, the address the
    gateway connected to. OpenSSH and asyncssh take an empty principal list as "valid for every host": such a
    certificate would let whoever holds it impersonate every node, so it is refused too. asyncssh has no option for
    this; the connection's host-key check is wrapped (its own checks run first)."""
    validate = conn.validate_server_host_key

    def validate_named(key_data: bytes) -> asyncssh.SSHKey:
        key = validate(key_data)
        alg_len = int.from_bytes(key_data[:4], "big")
        alg = key_data[4:4 + alg_len].decode("ascii", errors="replace")
        if "-cert-" not in alg:
            return key  # a plain host key, trusted by known_hosts or a pin
        cert = asyncssh.import_certificate(f"{alg} {base64.b64encode(key_data).decode()}")
        named: list[str] = list(getattr(cert, "principals", ()))  # typed on the OpenSSH certificate class only
        principals = ["".join(c if c.isascii() and c.isprintable() else "?" for c in p) for p in named]
        if not principals:
            raise asyncssh.HostKeyNotVerifiable("the host certificate names no principals (valid for any host); "
                                                f"it must name {dialled}")
        if dialled not in principals:
            raise asyncssh.HostKeyNotVerifiable(f"the host certificate names {', '.join(principals)[:200]}, "
                                                f"not {dialled}")
        return key

    conn.validate_server_host_key = validate_named  # type: ignore[method-assign]  # asyncssh has no hook for it


def _client_keys(ssh: SSHSettings) -> list[Any]:
    if ssh.private_key is None:
        raise AuthFailed("no ssh.private_key configured")
    try:
        key = asyncssh.read_private_key(str(ssh.private_key))
        if ssh.certificate is not None:
            return [(key, asyncssh.read_certificate(str(ssh.certificate)))]
        return [key]
    except (OSError, asyncssh.KeyImportError) as exc:
        raise AuthFailed(f"cannot load client key: {exc}") from exc


def _known_hosts_lines(path: Path) -> str | None:
    """asyncssh skips a line it cannot use; a line that names no usable key is a mistake worth reporting."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            if fields[0].startswith("@"):
                if fields[0] not in ("@cert-authority", "@revoked"):
                    return f"line {number}: unknown marker {fields[0][:40]!r}"
                fields = fields[1:]
            if len(fields) < 3:
                return f"line {number}: expected host patterns, a key type and a key"
            try:
                asyncssh.import_public_key(f"{fields[1]} {fields[2]}")
            except (ValueError, asyncssh.KeyImportError) as exc:
                return f"line {number}: not a public key: {exc}"
    return None


def ssh_file_problem(kind: str, path: Path, other: Path | None = None) -> str | None:
    """Why ``path`` does not parse as ``kind`` (private_key, certificate, known_hosts, public_key) the way
    :func:`connect` reads it, or None; ``pair``: whether the certificate ``other`` is for the private key ``path``."""
    try:
        if kind == "private_key":
            asyncssh.read_private_key(str(path))
        elif kind == "certificate":
            asyncssh.read_certificate(str(path))
        elif kind == "known_hosts":
            asyncssh.read_known_hosts(str(path))
            return _known_hosts_lines(path)
        elif kind == "public_key":
            asyncssh.read_public_key(str(path))
        elif kind == "pair" and other is not None:
            key, cert = asyncssh.read_private_key(str(path)), asyncssh.read_certificate(str(other))
            if key.public_data != cert.key.public_data:
                return f"a certificate for another key than {path}"
    except (OSError, ValueError, asyncssh.KeyImportError) as exc:  # KeyImportError is a ValueError
        return f"does not parse: {exc}"
    return None


async def connect(node: Node, ssh: SSHSettings, counters: Counters | None = None) -> SSHLink:
    """Connect and authenticate to ``node``'s sshd; channels count their traffic in ``counters``.

    Raises :class:`ConnectFailed` subclasses.
    """
    if ssh.insecure_skip_host_key_check and node.host_key is None:
        log.warning(
            "host key of node %s is NOT verified (insecure_skip_host_key_check = true): "
            "anyone on the path can impersonate it",
            node.name,
            extra={"node": node.name},
        )
        known_hosts = None
    else:
        known_hosts = _known_hosts(node, ssh)
        if known_hosts is None:
            raise HostKeyRejected("no known_hosts configured")
    keys = _client_keys(ssh)
    try:
        conn, client = await asyncssh.create_connection(
            lambda: _Client(node.address if known_hosts is not None else None),
            node.address,
            node.ssh_port,
            username=ssh.user,
            client_keys=keys,
            known_hosts=known_hosts,
            config=None,
            agent_path=None,
            preferred_auth="publickey",
            connect_timeout=ssh.connect_timeout,
            login_timeout=ssh.connect_timeout,
            keepalive_interval=ssh.keepalive_interval,
            keepalive_count_max=ssh.keepalive_count_max,
            encryption_algs=ENCRYPTION_ALGS,
        )
    except asyncssh.HostKeyNotVerifiable as exc:
        raise HostKeyRejected(f"host key of {node.address}:{node.ssh_port} not trusted: {exc.reason}") from exc
    except asyncssh.PermissionDenied as exc:
        raise AuthFailed(f"authentication as {ssh.user!r} refused: {exc.reason}") from exc
    except (TimeoutError, asyncssh.ConnectionLost) as exc:
        raise ConnectTimeout(f"connect to {node.address}:{node.ssh_port}: {_describe(exc) or 'timed out'}") from exc
    except asyncssh.Error as exc:
        raise ConnectFailed(f"ssh to {node.address}:{node.ssh_port}: {_describe(exc)}") from exc
    except OSError as exc:
        raise ConnectFailed(f"connect to {node.address}:{node.ssh_port}: {_describe(exc)}") from exc
    assert isinstance(client, _Client)
    _skip_ignore_padding(conn)
    return SSHLink(conn, client, node.name, counters or Counters())


def _skip_ignore_padding(conn: asyncssh.SSHClientConnection) -> None:
    """Stop asyncssh's per-packet ``SSH_MSG_IGNORE`` while an AEAD cipher protects what we send.

    asyncssh has no option for it, so the connection's ``send_packet`` is wrapped: empty IGNORE packets are dropped
    while the negotiated cipher (looked up each time: a rekey may change it) is AEAD; everything else goes through.
    """
    send_packet = conn.send_packet

    def send_without_ignore(pkttype: int, *args: bytes, **kwargs: Any) -> None:
        if (pkttype == asyncssh.MSG_IGNORE and args == (_EMPTY_STRING,)
                and conn.get_extra_info("send_cipher") in AEAD_CIPHERS):
            return
        send_packet(pkttype, *args, **kwargs)

    conn.send_packet = send_without_ignore  # type: ignore[method-assign]  # asyncssh has no option for it


class SSHLink:
    """One established SSH connection to a node."""

    def __init__(self, conn: asyncssh.SSHClientConnection, client: _Client, node: str, counters: Counters) -> None:
        self._conn = conn
        self._client = client
        self.node = node
        self.counters = counters

    @property
    def closed(self) -> bool:
        return self._client.lost.done()

    async def wait_closed(self) -> str:
        """Wait until the connection is gone; returns why."""
        return await asyncio.shield(self._client.lost)

    def close(self) -> None:
        self._conn.close()

    async def open_stream(self, host: str, port: int, timeout: float) -> ChannelStream:
        """Open a ``direct-tcpip`` channel to ``host:port`` as seen from the node; the node is asked for the host in
        its normal form (:func:`netnames.normalize_host`), never another spelling of it."""
        host = normalize_host(host)
        if self.closed:
            raise TunnelDown(f"tunnel to node {self.node} is closed")
        try:
            async with asyncio.timeout(timeout):
                _, session = await self._conn.create_connection(_Session, host, port, window=CHANNEL_WINDOW)
        except TimeoutError as exc:
            raise DialTimeout(f"opening a channel to {host}:{port} via node {self.node} timed out") from exc
        except asyncssh.ChannelOpenError as exc:
            why = _OPEN_FAILURES.get(exc.code, f"code {exc.code}")
            detail = f" ({exc.reason})" if exc.reason and exc.reason.lower() != why else ""
            raise ChannelRefused(f"node {self.node} refused a channel to {host}:{port}: {why}{detail}") from exc
        except (asyncssh.Error, OSError) as exc:
            raise TunnelDown(f"tunnel to node {self.node} failed: {_describe(exc)}") from exc
        assert isinstance(session, _Session)
        return ChannelStream(session, self.counters, f"{host}:{port}")


class _ClosedWithoutEOF(Exception):
    """The channel was closed before the node sent its end of data."""


class _Session(asyncssh.SSHTCPSession[bytes]):
    """One channel's receiving end and flow control, for :class:`ChannelStream`.

    asyncssh's own streams (``open_connection``) add a general-purpose layer (read locks, separators, datatypes) that
    a byte pipe does not need and that costs CPU on every packet; this session keeps what a splice needs.

    Flow control: asyncssh gives the node its window back as soon as data reaches the session, so a stalled reader
    would let it hold up to twice the window. Instead the window is given back by hand, for the bytes the consumer has
    taken *and* finished with (a read's bytes are released by the next read: the splice only reads again once the
    client took the last chunk), so what the node sent and nobody has passed on never exceeds ``CHANNEL_WINDOW``; a
    node sending past its window is a protocol error asyncssh enforces. With an asyncssh that lacks the attributes
    this needs, it falls back to pausing the channel at a full window (bounded by twice the window).
    """

    def __init__(self) -> None:
        self.chan: asyncssh.SSHTCPChannel[bytes] | None = None
        self.buffer: deque[bytes] = deque()
        self.buffered = 0
        self.eof = False
        self.node_eof = False  # the node sent CHANNEL_EOF: its side ended cleanly
        self.error: Exception | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.manual_window = False  # we give the node its window back (see above)
        self.lent = 0  # bytes of the last read, released at the next one
        self.credit = 0  # bytes released whose window the node has not been given back yet
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    def connection_made(self, chan: asyncssh.SSHTCPChannel[bytes]) -> None:  # type: ignore[override]  # a TCP session's channel is this subclass
        self.chan = chan
        self.manual_window = hasattr(chan, "_init_recv_window") and hasattr(chan, "_recv_window")
        if self.manual_window:
            chan._init_recv_window = 0  # asyncssh's own window adjusts off (it adjusts below half of this)

    def release(self) -> None:
        """The consumer is done with the last read: give its window back (in batches of a quarter window)."""
        self.credit += self.lent
        self.lent = 0
        chan = self.chan
        if not self.manual_window or chan is None or self.credit < CHANNEL_WINDOW // 4 or self.eof:
            return
        credit, self.credit = self.credit, 0
        chan._recv_window += credit  # type: ignore[attr-defined]
        with contextlib.suppress(asyncssh.Error, OSError):
            chan.send_packet(asyncssh.constants.MSG_CHANNEL_WINDOW_ADJUST, credit.to_bytes(4, "big"))

    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self.buffer.append(data)
        self.buffered += len(data)
        if (not self.manual_window and self.buffered >= CHANNEL_WINDOW and not self.reading_paused
                and self.chan is not None):
            self.reading_paused = True
            self.chan.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self.eof = self.node_eof = True
        self._wake_reader()
        return True  # keep our direction open: the client may still be sending (half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and not self.node_eof:
            # A close without the node's EOF is a cut, not an end (the gateway closing the tunnel, for instance).
            exc = _ClosedWithoutEOF("channel closed without end of data")
        if exc is not None and self.error is None:
            self.error = exc
        self.eof = True
        self.writing_paused = False  # nothing will resume it: a writer must not wait any longer
        self._wake_reader()
        self._wake_writer()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake_writer()

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    async def wait_readable(self) -> None:
        self._readable = asyncio.get_running_loop().create_future()
        await self._readable

    async def wait_writable(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()
        await self._writable

    def take(self, n: int) -> bytes:
        """Up to ``n`` buffered bytes (the caller checked there are some)."""
        data = self.buffer.popleft()
        if len(data) > n:
            self.buffer.appendleft(data[n:])
            data = data[:n]
        elif self.buffer and len(data) + len(self.buffer[0]) <= n:
            parts, size = [data], len(data)
            while self.buffer and size + len(self.buffer[0]) <= n:
                size += len(self.buffer[0])
                parts.append(self.buffer.popleft())
            data = b"".join(parts)
        self.buffered -= len(data)
        self.lent = len(data)
        if self.reading_paused and self.buffered < CHANNEL_WINDOW // 2 and self.chan is not None:
            self.reading_paused = False
            self.chan.resume_reading()  # may deliver more data right away
        return data


class ChannelStream:
    """A forwarded channel as a :class:`proxy.dialer.Stream`, counting its bytes on the tunnel."""

    def __init__(self, session: _Session, counters: Counters, target: str) -> None:
        assert session.chan is not None
        self._session = session
        self._chan = session.chan
        self._counters = counters
        self._closed = False
        self.target = target
        counters.open_channels += 1
        counters.channels_total += 1

    def _broke(self, exc: BaseException) -> StreamError:
        return StreamError(f"channel to {self.target} broke: {_describe(exc)}")

    async def read(self, n: int = READ_SIZE) -> bytes:
        session = self._session
        session.release()
        while not session.buffer:
            if session.error is not None:
                raise self._broke(session.error)  # never a clean end: the tunnel or the channel failed
            if session.eof:
                return b""
            await session.wait_readable()
        data = session.take(n)
        self._counters.bytes_in += len(data)
        return data

    async def write(self, data: bytes) -> None:
        session = self._session
        if session.error is not None:
            raise self._broke(session.error)
        try:
            self._chan.write(data)
        except (asyncssh.Error, OSError) as exc:  # BrokenPipeError: the channel is closing
            raise self._broke(exc) from exc
        while session.writing_paused and session.error is None:
            await session.wait_writable()  # the node's window is spent, or our send buffer is full
        if session.error is not None:
            raise self._broke(session.error)
        self._counters.bytes_out += len(data)

    async def write_eof(self) -> None:
        try:
            if self._chan.can_write_eof():
                self._chan.write_eof()
        except (asyncssh.Error, OSError):
            pass

    async def close(self) -> None:
        """Close the channel: unsent data still goes out first, then ``CHANNEL_CLOSE``.

        The node's answering close is not awaited: asyncssh releases the channel when it arrives, and waiting for a
        round trip to the node here would delay the next request on the client's kept-alive connection.
        """
        if self._closed:
            return
        self._closed = True
        self._counters.open_channels -= 1
        self._chan.close()

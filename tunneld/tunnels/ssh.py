"""The SSH boundary (with :mod:`tunneld.tunnels.sshchannel`, its channels): the only modules of the daemon that
import asyncssh.

:func:`connect` opens one client connection to a node's sshd with strict host-key checking and returns an
:class:`SSHLink`; :meth:`SSHLink.open_stream` opens a ``direct-tcpip`` channel through it. asyncssh's exceptions are
translated here into the project's typed errors (:mod:`tunneld.errors`), so nothing above this module needs to know
which SSH library carries the bytes.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh.logging import SSHLogger

from netnames import normalize_host
from tunneld.config import Node, SSHSettings
from tunneld.errors import (
    AuthFailed,
    ChannelRefused,
    ConnectFailed,
    ConnectTimeout,
    DialTimeout,
    HostKeyRejected,
    TunnelDown,
)
from tunneld.tunnels import keepalive, leanpath
from tunneld.tunnels.sshchannel import CHANNEL_WINDOW, READ_SIZE, ChannelStream, Counters, Session
from tunneld.tunnels.sshchannel import describe as _describe

log = logging.getLogger("tunneld.ssh")

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
# RFC 4254 section 5.1 reason codes: OpenSSH's description is often just "open failed", the code says why.
_OPEN_FAILURES = {
    asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED: "administratively prohibited (sshd forbids forwarding there)",
    asyncssh.OPEN_CONNECT_FAILED: "connect failed",
    asyncssh.OPEN_UNKNOWN_CHANNEL_TYPE: "unknown channel type",
    asyncssh.OPEN_RESOURCE_SHORTAGE: "resource shortage",
}


class _QuietLogger(SSHLogger):
    """asyncssh's log adapter formats every argument of a line before the level is checked, and a channel's open and
    close log five info lines: on every proxied request that formatting was done for nothing. This one checks the
    level first (its children, the channels' loggers, are of this class too)."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            super().log(level, msg, *args, **kwargs)


def _quiet_logger(conn: asyncssh.SSHClientConnection) -> None:
    """Give ``conn`` (and so each channel it opens from now on) a :class:`_QuietLogger` with the same context."""
    logger = getattr(conn, "_logger", None)
    if type(logger) is SSHLogger:
        conn._logger = _QuietLogger(logger.logger, "", logger._context)  # type: ignore[attr-defined]  # private in asyncssh


class _Client(asyncssh.SSHClient):
    def __init__(self, dialled: str | None = None, lean: bool = False) -> None:
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._dialled = dialled
        self._lean = lean
        self._conn: asyncssh.SSHClientConnection | None = None

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        _quiet_logger(conn)
        self._conn = conn
        keepalive.install(conn)
        if self._dialled is not None:  # called before the key exchange: the host key is not checked yet
            _require_named_host_certificate(conn, self._dialled)
        if self._lean and leanpath.usable():
            why = leanpath.activate(conn)
            if why is not None:
                log.warning("lean SSH packet path not used for this connection: %s", why)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            keepalive.uninstall(self._conn)
            self._conn = None
        if not self.lost.done():
            self.lost.set_result(_describe(exc) if exc else "connection closed")


_PARSED: dict[tuple[str, str], tuple[tuple[int, int, int], Any]] = {}
"""Key and known_hosts files as parsed, by (what, path), with the (mtime, size, inode) they were parsed at."""


def _parsed(what: str, path: Path, parse: Callable[[str], Any]) -> Any:
    """``parse(path)``, parsed once per version of the file: thousands of tunnels connecting at once (a restart)
    share one parse of the same key and known_hosts, and a file replaced on disk is parsed again at the next
    connection. Raises what ``os.stat`` and ``parse`` raise."""
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    hit = _PARSED.get((what, str(path)))
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = parse(str(path))
    _PARSED[(what, str(path))] = (stamp, value)
    return value


def _known_hosts(node: Node, ssh: SSHSettings) -> Any:
    if node.host_key is not None:
        try:
            key = _parsed("public_key", node.host_key, asyncssh.read_public_key)
        except (OSError, asyncssh.KeyImportError) as exc:
            raise HostKeyRejected(f"cannot read pinned host key {node.host_key}: {exc}") from exc
        return ([key], [], [])
    path = node.known_hosts or ssh.known_hosts
    if path is None:
        return None
    try:
        return _parsed("known_hosts", path, asyncssh.read_known_hosts)
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
        key = _parsed("private_key", ssh.private_key, asyncssh.read_private_key)
        if ssh.certificate is not None:
            return [(key, _parsed("certificate", ssh.certificate, asyncssh.read_certificate))]
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
            lambda: _Client(node.address if known_hosts is not None else None, ssh.lean_packet_path),
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
            x509_trusted_certs=None,  # no X.509 (asyncssh would look for ~/.ssh/ca-bundle.crt and ~/.ssh/crt)
            x509_trusted_cert_paths=[],
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
    if not isinstance(conn, leanpath.LeanConnection):  # the lean path drops those packets itself
        leanpath.skip_ignore_padding(conn, AEAD_CIPHERS)
    return SSHLink(conn, client, node.name, counters or Counters())


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

    @property
    def packet_path(self) -> str:
        """``lean`` (:mod:`tunneld.tunnels.leanpath`) or ``asyncssh``: who seals and opens this link's packets."""
        return leanpath.path_of(self._conn)

    @property
    def cipher(self) -> str:
        return str(self._conn.get_extra_info("send_cipher") or "")

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
                _, session = await self._conn.create_connection(Session, host, port, window=CHANNEL_WINDOW)
        except TimeoutError as exc:
            raise DialTimeout(f"opening a channel to {host}:{port} via node {self.node} timed out") from exc
        except asyncssh.ChannelOpenError as exc:
            why = _OPEN_FAILURES.get(exc.code, f"code {exc.code}")
            detail = f" ({exc.reason})" if exc.reason and exc.reason.lower() != why else ""
            raise ChannelRefused(f"node {self.node} refused a channel to {host}:{port}: {why}{detail}") from exc
        except (asyncssh.Error, OSError) as exc:
            raise TunnelDown(f"tunnel to node {self.node} failed: {_describe(exc)}") from exc
        assert isinstance(session, Session)
        return ChannelStream(session, self.counters, f"{host}:{port}")


__all__ = ["CHANNEL_WINDOW", "READ_SIZE", "ChannelStream", "Counters", "SSHLink", "connect", "ssh_file_problem"]

"""The dial-in SSH boundary: the listener that dial-in nodes' plain OpenSSH clients connect to.

A node runs ``ssh -N -R <port> node:<name>@gateway`` (reverse *dynamic* forwarding). Here, with asyncssh:

1. The gateway presents its host key with a certificate from the cluster SSH (host) CA: the node's known_hosts has
   one ``@cert-authority`` line and nothing is trusted on first use.
2. The node logs in with a user certificate from the SSH *user* CA (``[dialin] user_ca``), its one principal
   ``node:<name>`` equal to the login name; :mod:`.dialin_identity` decides the rest (validity, revocation,
   inventory). No other authentication method exists.
3. Everything but one ``tcpip-forward`` (and keepalives) is refused: sessions (shell, exec, subsystem),
   ``direct-tcpip``, unix forwards, a second forward. The forward is virtual: nothing listens on the gateway;
   when it arrives the connection becomes the node's :class:`DialinLink` and the pool's tunnel is up.
4. :meth:`DialinLink.open_stream` opens a ``forwarded-tcpip`` channel addressed to the node's forward, which the
   node's ssh answers as a SOCKS5 server (:mod:`.socks`), and returns the same ChannelStream as a dial-out tunnel.

The listener is bounded: connections (``max_connections``), concurrent handshakes (``max_concurrent_handshakes``)
and the time to log in (``login_grace``). A connection is closed when its certificate expires. Every refusal is a
``tunneld.audit`` line naming the peer and the reason.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncssh

from netnames import normalize_host, split_host_port
from tunneld.config import DialinSettings
from tunneld.errors import ChannelRefused, DialTimeout, StreamError, TunnelDown
from tunneld.tunnels import socks
from tunneld.tunnels.dialin_identity import CertFacts, IdentityRefused, check_certificate, sanitize
from tunneld.tunnels.ssh import ENCRYPTION_ALGS
from tunneld.tunnels.sshchannel import CHANNEL_WINDOW, ChannelStream, Counters
from tunneld.tunnels.sshchannel import Session as _Session
from tunneld.tunnels.sshchannel import describe as _describe

log = logging.getLogger("tunneld.dialin")
audit = logging.getLogger("tunneld.audit")

Attach = Callable[[str, "DialinLink"], str | None]
"""``attach(node, link)``: hand an arrived link to the node's tunnel; returns why not (then it is closed)."""
CountersFor = Callable[[str], Counters]


@dataclass(frozen=True)
class Hooks:
    """What the listener asks of the pool."""

    is_dialin_node: Callable[[str], str | None]
    attach: Attach
    counters_for: CountersFor
    revoked: Callable[[CertFacts], str | None]


class _DialinStream(ChannelStream):
    """A forwarded channel counted on its link too, so a replaced link knows when its streams are done."""

    def __init__(self, session: _Session, counters: Counters, target: str, link: DialinLink) -> None:
        super().__init__(session, counters, target)
        self._link = link
        link.streams.add(self)

    def break_(self, why: str) -> None:
        """End the stream as broken (a reader sees :class:`StreamError`, never a clean end)."""
        self._session.fail(StreamError(why))

    async def close(self) -> None:
        self._link.streams.discard(self)
        await super().close()


class DialinLink:
    """A dial-in node's connection with its forward: the :class:`~.link.Link` of a dial-in tunnel."""

    def __init__(self, conn: asyncssh.SSHServerConnection, node: str, forward: tuple[str, int], counters: Counters,
                 lost: asyncio.Future[str], *, peer: str, socks_timeout: float, valid_before: int) -> None:
        self._conn = conn
        self.node = node
        self.forward = forward
        self.counters = counters
        self._lost = lost
        self.peer = peer
        self.socks_timeout = socks_timeout
        self.valid_before = valid_before
        self.streams: set[_DialinStream] = set()

    @property
    def closed(self) -> bool:
        return self._lost.done()

    packet_path = "asyncssh"  # the lean path serves client connections (dial-out) only

    @property
    def cipher(self) -> str:
        return str(self._conn.get_extra_info("send_cipher") or "")

    async def wait_closed(self) -> str:
        return await asyncio.shield(self._lost)

    def close(self, why: str = "closed by the gateway") -> None:
        """Close the connection; streams still open end as broken."""
        for stream in list(self.streams):
            stream.break_(f"dial-in connection of node {self.node} {why}")
        self._conn.close()

    async def open_stream(self, host: str, port: int, timeout: float) -> ChannelStream:
        """A ``forwarded-tcpip`` channel to the node's forward, then SOCKS5 CONNECT to ``host:port``."""
        host = normalize_host(host)
        if self.closed:
            raise TunnelDown(f"dial-in connection of node {self.node} is closed")
        started = time.monotonic()
        listen_host, listen_port = self.forward
        try:
            async with asyncio.timeout(timeout):
                _, session = await self._conn.create_connection(
                    _Session, listen_host, listen_port, "127.0.0.1", 0, window=CHANNEL_WINDOW)
        except TimeoutError as exc:
            raise DialTimeout(f"opening a channel to node {self.node}'s forward timed out") from exc
        except asyncssh.ChannelOpenError as exc:
            raise ChannelRefused(f"node {self.node} refused a channel to its forward: "
                                 f"{sanitize(exc.reason or str(exc.code))}") from exc
        except (asyncssh.Error, OSError) as exc:
            raise TunnelDown(f"dial-in connection of node {self.node} failed: {_describe(exc)}") from exc
        assert isinstance(session, _Session)
        stream = _DialinStream(session, self.counters, f"{host}:{port}", self)
        left = max(timeout - (time.monotonic() - started), 0.001)
        try:
            await socks.handshake(stream, host, port, min(self.socks_timeout, left), self.node)
        except BaseException:
            await stream.close()
            raise
        return stream


class _VirtualListener(asyncssh.SSHListener):
    """A ``tcpip-forward`` the gateway accepts without listening anywhere (channels are opened by the dialer)."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._port = port

    def get_port(self) -> int:
        return self._port

    def close(self) -> None:
        pass

    async def wait_closed(self) -> None:
        pass


class _NodeServer(asyncssh.SSHServer):
    """One dial-in connection: authentication, the one forward, refusals."""

    def __init__(self, listener: DialinListener) -> None:
        self._listener = listener
        self._conn: asyncssh.SSHServerConnection | None = None
        self.peer = "?"
        self.offered: CertFacts | None = None
        self.node: str | None = None
        self.refusal: str | None = None
        self.link: DialinLink | None = None
        self.handshaking = True
        self.lost: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._expiry: asyncio.TimerHandle | None = None

    # -- connection ---------------------------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        over = self._listener.admit(self)
        if over is not None:
            self._refuse(over)
            conn.close()
            return
        validate = conn.validate_public_key

        async def remember_certificate(username: str, key_data: bytes, msg: bytes, signature: bytes) -> bool:
            self.offered = _facts(key_data)
            return await validate(username, key_data, msg, signature)

        conn.validate_public_key = remember_certificate  # type: ignore[method-assign]  # asyncssh has no hook for it

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.release(self)
        if self._expiry is not None:
            self._expiry.cancel()
        if not self.lost.done():
            self.lost.set_result(_describe(exc) if exc else "connection closed")
        if self.link is not None:
            log.info("dial-in connection closed: %s", self.lost.result(),
                     extra={"node": self.node, "peer": self.peer})

    def _refuse(self, why: str) -> None:
        self.refusal = why
        self._listener.refused += 1
        audit.warning("dial-in refused: %s", why, extra={"peer": self.peer, "node": self.node or "-"})

    # -- authentication: user certificates from the user CA only -------------------------------------------

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        self._refuse(f"login as {sanitize(username)!r} with a plain key (a certificate from the user CA is "
                     "required)")
        return False

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        facts = self.offered
        if facts is None or not hmac.compare_digest(key.public_data, self._listener.user_ca_blob):
            self._refuse(f"login as {sanitize(username)!r}: certificate not signed by the SSH user CA")
            return False
        hooks = self._listener.hooks
        try:
            self.node = check_certificate(username, facts, now=time.time(), is_dialin_node=hooks.is_dialin_node,
                                          revoked=hooks.revoked)
        except IdentityRefused as exc:
            self._refuse(f"login as {sanitize(username)!r}: {exc}")
            return False
        return True

    def auth_completed(self) -> None:
        self.handshaking = False
        self._listener.handshake_done(self)
        facts = self.offered
        assert facts is not None and self._conn is not None
        delay = facts.valid_before - time.time()
        self._expiry = asyncio.get_running_loop().call_later(max(delay, 0), self._expired)
        log.info("dial-in login", extra={"node": self.node, "peer": self.peer, "key_id": sanitize(facts.key_id),
                                         "serial": facts.serial})

    def _expired(self) -> None:
        audit.warning("dial-in connection closed: its certificate expired", extra={"node": self.node,
                                                                                  "peer": self.peer})
        self.disconnect("closed: its certificate expired")

    def disconnect(self, why: str) -> None:
        """Close this connection (its streams end as broken)."""
        if self.link is not None:
            self.link.close(why)
        elif self._conn is not None:
            self._conn.close()

    # -- what a node may ask for: one tcpip-forward ----------------------------------------------------------

    def session_requested(self) -> bool:
        self._refuse("session (shell, exec or subsystem) requested: only a reverse forward is allowed")
        return False

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        self._refuse(f"direct-tcpip to {sanitize(dest_host)}:{dest_port} requested: only a reverse forward is "
                     "allowed")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._refuse("unix socket forwarding requested: only a reverse forward is allowed")
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        self._refuse("unix socket listener requested: only a reverse TCP forward is allowed")
        return False

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        if self.link is not None:
            self._refuse(f"a second forward ({sanitize(listen_host)}:{listen_port}) requested: a node may hold "
                         "one")
            return False
        assert self._conn is not None and self.node is not None and self.offered is not None
        listener = self._listener
        port = listen_port or 1080
        link = DialinLink(self._conn, self.node, (listen_host, port), listener.hooks.counters_for(self.node),
                          self.lost, peer=self.peer, socks_timeout=listener.settings.socks_timeout,
                          valid_before=self.offered.valid_before)
        self.link = link
        asyncio.get_running_loop().call_soon(self._attach, link)
        return _VirtualListener(port)

    def _attach(self, link: DialinLink) -> None:
        if link.closed:
            return
        why = self._listener.hooks.attach(link.node, link)
        if why is not None:
            self._refuse(f"node {link.node}: {why}")
            link.close("refused")


def _facts(key_data: bytes) -> CertFacts | None:
    """The facts of an OpenSSH user certificate blob (None for a plain key or anything undecodable)."""
    try:
        alg_len = int.from_bytes(key_data[:4], "big")
        alg = key_data[4:4 + alg_len].decode("ascii")
        if "-cert-v01@openssh.com" not in alg:
            return None
        cert: Any = asyncssh.import_certificate(f"{alg} {base64.b64encode(key_data).decode()}".encode())
        return CertFacts(
            key_id=str(getattr(cert, "_key_id", "")), serial=int(getattr(cert, "_serial", 0)),
            principals=tuple(getattr(cert, "principals", ())), valid_after=int(getattr(cert, "_valid_after", 0)),
            valid_before=int(getattr(cert, "_valid_before", 0)), ca_blob=bytes(cert.signing_key.public_data),
            key_blob=bytes(cert.key.public_data),
        )
    except (ValueError, UnicodeDecodeError, asyncssh.KeyImportError):
        return None


class DialinListener:
    """The ``[dialin]`` SSH server."""

    def __init__(self, settings: DialinSettings, hooks: Hooks) -> None:
        self.settings = settings
        self.hooks = hooks
        try:
            key = asyncssh.read_private_key(str(settings.host_key))
            cert = asyncssh.read_certificate(str(settings.host_certificate))
            self.user_ca_blob = bytes(asyncssh.read_public_key(str(settings.user_ca)).public_data)
        except (OSError, ValueError, asyncssh.KeyImportError) as exc:
            raise ValueError(f"[dialin] keys: {exc}") from exc
        self._host_keys = [(key, cert)]
        self._server: asyncssh.SSHAcceptor | None = None
        self.connections: set[_NodeServer] = set()
        self.handshakes = 0
        self.refused = 0

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.get_port())

    def admit(self, server: _NodeServer) -> str | None:
        """Count a new connection in, or say which bound it exceeds."""
        s = self.settings
        if len(self.connections) >= s.max_connections:
            return f"{len(self.connections)} connections open (dialin.max_connections)"
        if self.handshakes >= s.max_concurrent_handshakes:
            return f"{self.handshakes} handshakes under way (dialin.max_concurrent_handshakes)"
        self.connections.add(server)
        self.handshakes += 1
        return None

    def handshake_done(self, server: _NodeServer) -> None:
        self.handshakes -= 1

    def release(self, server: _NodeServer) -> None:
        if server in self.connections:
            self.connections.discard(server)
            if server.handshaking:
                self.handshakes -= 1
                if server.refusal is None:
                    audit.warning("dial-in connection ended before login: %s",
                                  "login_grace passed or the peer left", extra={"peer": server.peer})

    def close_revoked(self) -> list[str]:
        """Close every logged-in connection whose certificate is now revoked; returns the nodes closed."""
        closed = []
        for server in list(self.connections):
            facts = server.offered
            if server.handshaking or facts is None:
                continue
            why = self.hooks.revoked(facts)
            if why is None:
                continue
            audit.warning("dial-in connection closed: certificate %r (serial %d) is revoked: %s",
                          sanitize(facts.key_id), facts.serial, why, extra={"node": server.node, "peer": server.peer})
            server.disconnect("closed: its certificate was revoked")
            closed.append(server.node or "?")
        return closed

    async def start(self) -> None:
        host, port = split_host_port(self.settings.listen)
        s = self.settings
        self._server = await asyncssh.create_server(
            lambda: _NodeServer(self), host or None, port, server_host_keys=self._host_keys,
            login_timeout=s.login_grace, keepalive_interval=s.keepalive_interval,
            keepalive_count_max=s.keepalive_count_max, encryption_algs=ENCRYPTION_ALGS, allow_scp=False,
            agent_forwarding=False, x11_forwarding=False, sftp_factory=None, config=None,
        )
        log.info("dial-in listener started", extra={"listen": s.listen, "port": self.port})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for server in list(self.connections):
            if server._conn is not None:
                server._conn.close()

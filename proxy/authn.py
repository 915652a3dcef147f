"""Who is calling the proxy front, decided once per request from the connection and the request head.

* Unix socket: the kernel's peer credentials (``SO_PEERCRED``, ``SO_PEERGROUPS``). The caller is user ``uid:N``;
  root and the daemon's own user are in ``system:masters``; a process whose primary or supplementary groups include
  the socket's group (``[proxy] socket_group``) is in ``tunneld:proxy``. An ``Authorization`` header is ignored here.
* TCP: a bearer token (``Authorization: Bearer <token>``, looked up in constant time by the caller-supplied lookup,
  normally the ``[auth] token_file``) or, on a TLS listener with a client CA, the verified client certificate
  (CN = user, O = groups). A token, when sent, must be valid, whatever certificate came with it.
* With ``insecure_anonymous_loopback``, a TCP caller on a loopback address that sends no credentials is
  ``system:anonymous`` in ``system:unauthenticated``.

Anything else is :class:`Unauthenticated` (HTTP 401) with a one-line reason that never repeats the credentials;
the server core answers it and writes the ``proxy.audit`` line.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import h11
from cryptography import x509

from certs.tokens import ADMIN_GROUP, Identity, identity_from_certificate
from netnames import is_loopback, peer_cred
from proxy.errors import Refused

ANONYMOUS_USER = "system:anonymous"
UNAUTHENTICATED_GROUP = "system:unauthenticated"
PROXY_GROUP = "tunneld:proxy"
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
MAX_TOKEN = 4096

TokenLookup = Callable[[str], Awaitable[Identity | None]]


class Unauthenticated(Refused):
    """No acceptable credentials (HTTP 401, with ``WWW-Authenticate: Bearer``)."""

    status = 401

    def __init__(self, reason: str) -> None:
        super().__init__(f"Unauthorized: {reason}", headers=[("WWW-Authenticate", 'Bearer realm="tunneld"')])


def supplementary_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups as the kernel saw them at connect time (``SO_PEERGROUPS``, Linux >= 4.13);
    empty when the kernel does not say (beyond 256 groups, or an old kernel: the primary group still counts)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
    except OSError:
        return ()
    return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])


class Authenticator:
    """Turns a connection and a request head into an :class:`Identity`, or raises :class:`Unauthenticated`."""

    def __init__(self, tokens: TokenLookup | None = None, *, system_uids: frozenset[int] | None = None,
                 socket_gid: int | None = None, anonymous_loopback: bool = False) -> None:
        self.tokens = tokens
        self.system_uids = system_uids if system_uids is not None else frozenset({0, os.geteuid()})
        self.socket_gid = socket_gid
        self.anonymous_loopback = anonymous_loopback

    async def authenticate(self, writer: asyncio.StreamWriter, request: h11.Request) -> Identity:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family == socket.AF_UNIX:
            return self.unix(sock)
        headers = [value for name, value in request.headers if name == b"authorization"]
        if len(headers) > 1:
            raise Unauthenticated("more than one Authorization header")
        if headers:
            return await self._bearer(headers[0])
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if der:  # only present when the listener verified it against its client CA
            ident = identity_from_certificate(x509.load_der_x509_certificate(der))
            if not ident.user:
                raise Unauthenticated("the client certificate has no common name (CN = user)")
            return ident
        peer = writer.get_extra_info("peername")
        if self.anonymous_loopback and isinstance(peer, tuple) and is_loopback(str(peer[0])):
            return Identity(ANONYMOUS_USER, "", (UNAUTHENTICATED_GROUP,), method="anonymous")
        raise Unauthenticated("a valid bearer token or client certificate is required")

    def unix(self, sock: socket.socket) -> Identity:
        creds = peer_cred(sock)
        if creds is None:
            raise Unauthenticated("the peer's credentials are not available on this socket")
        groups = []
        if creds.uid in self.system_uids:
            groups.append(ADMIN_GROUP)
        gid = self.socket_gid
        if gid is not None and (creds.gid == gid or gid in supplementary_groups(sock)):
            groups.append(PROXY_GROUP)
        return Identity(f"uid:{creds.uid}", str(creds.uid), tuple(groups), method="local")

    async def _bearer(self, raw: bytes) -> Identity:
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Unauthenticated("the Authorization header is not valid UTF-8") from None
        scheme, _, token = value.strip().partition(" ")
        if not scheme:
            raise Unauthenticated("the Authorization header is empty")
        if scheme.lower() != "bearer":
            raise Unauthenticated("only the Bearer scheme is accepted in the Authorization header")
        token = token.strip()
        if not token:
            raise Unauthenticated("the Authorization header has no bearer token")
        if len(token) > MAX_TOKEN or not token.isascii() or not token.isprintable() or " " in token:
            raise Unauthenticated("the bearer token is malformed")
        if self.tokens is None:
            raise Unauthenticated("bearer tokens are not accepted here (no [auth] token_file)")
        ident = await self.tokens(token)
        if ident is None:
            raise Unauthenticated("the bearer token is not valid")
        return ident

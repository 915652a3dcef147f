"""How a forwarded message is framed: which headers cross the gateway, and which messages are refused as ambiguous.

The gateway never passes framing through: each message's body is parsed on one side (by h11; an upstream's response
by httptools with h11 as the arbiter of any unusual head, :mod:`proxy.upstreamhttp`) and framed again on the other,
so a request's ``Content-Length`` and ``Transfer-Encoding`` are dropped and exactly one framing header is written for
what was actually received. A message whose length could be read two ways is refused before any of it is
forwarded (RFC 9112 section 6): both ``Content-Length`` and ``Transfer-Encoding``, ``Transfer-Encoding`` in an
HTTP/1.0 message, an over-long ``Content-Length``. h11 itself refuses differing ``Content-Length`` values, a
``Content-Length`` that is not digits, any ``Transfer-Encoding`` but a single ``chunked``, a chunk size over 20 hex
digits and a malformed chunk line; it unfolds obs-fold lines into one space and accepts a bare LF as a line end (both
as RFC 9112 allows), and what it forwards is always written anew with CRLF.

Hop-by-hop headers (``Connection`` and the headers it names, ``Keep-Alive``, ``Proxy-*``, ``TE``, ``Trailer``,
``Transfer-Encoding``, ``Upgrade``) are dropped in both directions, except that an upgrade request keeps
``Connection: Upgrade`` and ``Upgrade``. The caller's ``Authorization`` is never passed on: credentials for the
gateway are not credentials for the target.
"""

from __future__ import annotations

from typing import Any

import h11

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade",
})
NEVER_FORWARD = frozenset({b"authorization", b"host", b"content-length"})
MAX_LENGTH_DIGITS = 18
"""A Content-Length beyond 10**18 - 1 bytes is refused: no real body is that long, and some peers overflow on it."""


def ambiguity(headers: Any, http_version: bytes) -> str | None:
    """Why a message's body length could be read two ways, or None. ``headers`` as h11 parsed them."""
    te, cl = [], []
    for n, v in headers:
        if n == b"transfer-encoding":
            te.append(v)
        elif n == b"content-length":
            cl.append(v)
    if te and cl:
        return "both Content-Length and Transfer-Encoding"
    if te and http_version == b"1.0":
        return "Transfer-Encoding in an HTTP/1.0 message"
    if any(len(v.strip()) > MAX_LENGTH_DIGITS for v in cl):
        return "Content-Length too large"
    return None


def content_length(headers: Any) -> int | None:
    """The message's Content-Length (h11 has checked it), or None."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return None


def is_chunked(headers: Any) -> bool:
    return any(name == b"transfer-encoding" for name, _ in headers)


def _connection_tokens(headers: Any) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens |= {t.strip().lower() for t in value.split(b",") if t.strip()}
    return tokens


def is_upgrade(request: h11.Request) -> bool:
    """True for a request asking to switch protocols (``Connection: Upgrade`` with an ``Upgrade`` header)."""
    return b"upgrade" in _connection_tokens(request.headers) and any(n == b"upgrade" for n, _ in request.headers)


def request_headers(request: h11.Request, authority: str, peer_address: str) -> list[tuple[bytes, bytes]]:
    """The headers to send upstream: end-to-end headers, a fresh ``Host``, ``X-Forwarded-For``, one framing header."""
    headers = list(request.headers)  # h11's headers are a Sequence that iterates item by item: once, not six times
    named = _connection_tokens(headers)
    out: list[tuple[bytes, bytes]] = [(b"host", authority.encode())]
    forwarded_for = peer_address.rsplit(":", 1)[0] if ":" in peer_address else peer_address
    xff = None
    for name, value in headers:
        if name in HOP_BY_HOP or name in NEVER_FORWARD or name in named:
            continue
        if name == b"x-forwarded-for":
            xff = value
            continue
        out.append((name, value))
    if forwarded_for and forwarded_for != "unix":
        out.append((b"x-forwarded-for", (xff + b", " if xff else b"") + forwarded_for.encode()))
    length = content_length(headers)
    if is_chunked(headers):
        out.append((b"transfer-encoding", b"chunked"))
    elif length is not None:
        out.append((b"content-length", str(length).encode()))
    upgrades = [v for n, v in headers if n == b"upgrade"]
    if b"upgrade" in named and upgrades:  # is_upgrade
        out.append((b"connection", b"Upgrade"))
        out.extend((b"upgrade", v) for v in upgrades)
    return out


def response_headers(headers: Any, location_prefix: str | None) -> list[tuple[bytes, bytes]]:
    """The upstream's response headers as the client should get them (at most one, canonical, Content-Length)."""
    named = _connection_tokens(headers)
    out = []
    for name, value in headers:
        if name in HOP_BY_HOP or name in named or name == b"content-length":
            continue
        if name == b"location" and location_prefix and value.startswith(b"/") and not value.startswith(b"//"):
            value = location_prefix.encode() + value
        out.append((name, value))
    length = content_length(headers)
    if length is not None and not is_chunked(headers):
        out.append((b"content-length", str(length).encode()))
    return out


def close_delimited(method: bytes, response: Any) -> bool:
    """True when the response's body runs until the upstream closes (no Content-Length, no chunking)."""
    if method == b"HEAD" or response.status_code in (204, 304):
        return False
    return content_length(response.headers) is None and not is_chunked(response.headers)

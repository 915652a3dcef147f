"""The fronts' typed errors: each carries the HTTP status a front answers with and a one-line message.

    ProxyError                      500  anything a front answers with a status
      Refused                            the caller's request is refused (audited)
        BadRequest                  400  malformed or ambiguous (request smuggling attempts end here)
        RouteError                  4xx  the URL is not one the gateway serves (404), or not this way (405, 400...)
        RequestTimeout              408  the request head did not arrive in time
        HeadersTooLarge             431
        Overcrowded                 503  the listener's connection cap
      DialError                     502  no stream to the destination (subclasses in :mod:`proxy.dialer`)
      UpstreamError                 502  the target (or the way to it) failed after the dial
        StreamError                 502  a stream broke while in use: never a clean end of data
        UpstreamProtocolError       502  the target's answer is not HTTP we may pass on
        UpstreamTimeout             504  the target did not answer, or stalled, within its time
      ClientGone                         the client closed, broke or stalled its side: nobody to answer

Only :func:`proxy.failures.answer` turns these into a response (or a cut connection).
"""

from __future__ import annotations

import re


class ProxyError(Exception):
    """A failure a front answers with ``status`` and ``message`` (one line, plain words)."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None,
                 headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = headers or []
        """Extra response headers (``Allow`` for a 405)."""
        self.details: dict[str, str] = {}
        """Extra fields for the audit line (who asked, what, which rules refused it); never credentials."""


class Refused(ProxyError):
    """The caller's request is refused: a 4xx, always an audit line."""

    status = 400


class BadRequest(Refused):
    """A malformed or ambiguous request (bad framing, bad parameters): 400, and the connection is closed."""

    status = 400


class RouteError(Refused):
    """The URL is not one the gateway serves (``status`` 404) or is malformed (400)."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> None:
        super().__init__(message, status, headers)


class RequestTimeout(Refused):
    """The request head did not arrive within ``header_timeout``."""

    status = 408


class HeadersTooLarge(Refused):
    """The request head is larger than ``max_header_bytes``."""

    status = 431


class Overcrowded(ProxyError):
    """The listener is at its connection cap."""

    status = 503


class UpstreamError(ProxyError):
    """The target, or the way to it, failed after the dial."""

    status = 502


class StreamError(UpstreamError):
    """A stream broke while in use (the tunnel dropped, the peer reset). Never a clean end of data."""


class UpstreamProtocolError(UpstreamError):
    """The target's answer is not HTTP the gateway may pass on (ambiguous framing, garbage, TLS on a plain port)."""


class UpstreamTimeout(UpstreamError):
    """The target did not answer within ``response_timeout``, or stalled for ``idle_timeout`` mid-exchange."""

    status = 504


class ClientGone(ProxyError):
    """The client closed, broke or stalled its side of the connection: there is nobody left to answer."""

    status = 499


def looks_like_tls(data: bytes) -> bool:
    """True when ``data`` starts like a TLS record (handshake, alert, change-cipher-spec or application data)."""
    return len(data) >= 2 and 0x14 <= data[0] <= 0x17 and data[1] == 0x03


_TLS_RECORD = re.compile(r"bytearray\(b'\\x1[5-7]\\x03")
_REPR = re.compile(r":?\s*bytearray\(.*\)\s*$", re.DOTALL)


def plain_words(message: str, *, from_client: bool) -> str:
    """An h11 parser message in plain words: no ``bytearray(b'...')`` dumps, no h11 state names.

    ``from_client`` says whose bytes failed to parse: a client's request or a target's response.
    """
    if _TLS_RECORD.search(message):
        return "TLS sent to a plain-HTTP port" if from_client else "the target spoke TLS; use the https: prefix"
    if "ConnectionClosed" in message or "unexpectedly closed" in message:
        return "connection closed before the message was complete"
    if "without sending complete message body" in message:
        return "connection closed before the body was complete"
    if message.startswith("illegal request line") or message.startswith("illegal status line"):
        return "malformed request line" if from_client else "malformed status line"
    if message.startswith("illegal header line"):
        return "malformed header line"
    if message.startswith("illegal chunk header"):
        return "malformed chunk size line"
    if "Transfer-Encoding" in message:
        return "Transfer-Encoding other than a single chunked is not supported"
    return _REPR.sub("", message).strip() or "malformed HTTP"

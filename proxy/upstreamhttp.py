"""The upstream side of a forwarded exchange: the request head as bytes, and the response parsed.

The response is parsed by httptools (llhttp, compiled), which is stricter than h11 about most things (bare LF,
obs-fold, control characters in a value, a repeated Content-Length, both Content-Length and Transfer-Encoding). Only
a head that httptools parses *and* that passes the checks below is taken from it; every other head, and every
``101``, is handed with all its bytes to h11, which then parses the whole response exactly as the gateway always
did (it accepts and normalises obs-fold, bare LF and a repeated identical Content-Length, and refuses the rest).
So h11 stays the arbiter of what is accepted; httptools is the fast path for the well-formed answers nearly every
upstream gives. The checks keep h11's rules where llhttp is more lenient:

* ``Transfer-Encoding`` must be exactly one ``chunked`` (llhttp reads ``gzip``, ``gzip, chunked``, a repeated
  ``chunked`` or an unknown coding as a body of some kind; h11 refuses them all);
* the status code is three digits from 100 and the reason phrase has no control character but HTAB;
* the head is at most ``max_head`` bytes (llhttp has no bound; h11 bounded only a head still incomplete after a
  read, so a larger one arriving whole in one read is now refused too).

A framing that could be read two ways is refused by the caller in either case (:func:`proxy.framing.ambiguity`).
Once the head is accepted the body is httptools': a malformed chunk ends the response with an error (as under h11),
with one difference: llhttp does not accept whitespace between a chunk size and its CRLF, which h11 did. Trailers
are dropped, as they were. At the upstream's end of data, a response that runs until the close ends, any other that
is incomplete is :data:`CUT`.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Any

import h11
import httptools

_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_REASON = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")


class ResponseError(Exception):
    """The upstream's response is not acceptable HTTP/1.1 (the message says why, in a parser's words)."""


class HeadError(ValueError):
    """A request head the gateway would write is unsafe (a control character, a space in the target)."""


@dataclass(slots=True)
class Head:
    """A response head: names lower-cased, values without surrounding whitespace (as h11 gives them)."""

    status_code: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    http_version: bytes


class _Marker:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA = _Marker("NEED_DATA")
END = _Marker("END")
"""The response is complete."""
CUT = _Marker("CUT")
"""The upstream closed before the response was complete."""
Event = Head | bytes | _Marker


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers as sent; raises :class:`HeadError` for a control character anywhere, or a space
    in the target (names and values from a parsed request are valid already: this guards what the gateway adds)."""
    lines = [method + b" " + target + b" HTTP/1.1"]
    lines += [name + b": " + value for name, value in headers]
    if _CTL.search(b"".join(lines)) or b" " in target or not target:
        raise HeadError("the request head to send upstream would be malformed")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


class _Fallback(Exception):
    """Raised from a callback: hand the response to h11."""


class _TooLarge(Exception):
    """Raised from a callback: the head is over ``max_head``."""


class ResponseParser:
    """Parses one response to one request sent with ``method`` (``upgrade``: it asked to switch protocols)."""

    def __init__(self, method: bytes, max_head: int, upgrade: list[tuple[bytes, bytes]] | None = None) -> None:
        self._method = method
        self._max_head = max_head
        self._upgrade = upgrade
        self._events: deque[Any] = deque()
        self._parser: Any = httptools.HttpResponseParser(self)
        self._h11: h11.Connection | None = None
        self._raw: list[bytes] | None = []  # every byte until the final head is accepted (for h11)
        self._raw_size = 0
        self._head_size = 0  # bytes of the head being parsed (headers, as received)
        self._informational = 0  # 1xx heads delivered (h11, taking over, would deliver them again)
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._te: list[bytes] = []
        self._length: bytes | None = None
        self._in_head = True
        self._final = False  # the current message is the final response (not 1xx)
        self._until_close = False  # the final response's body runs until the upstream closes
        self._complete = False
        self._error: str | None = None

    # -- httptools callbacks -------------------------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer: dropped
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self._max_head:
            raise _TooLarge
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"transfer-encoding":
            value = value.lower()  # as h11 gives it
            self._te.append(value)
        elif name == b"content-length":
            self._length = value
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        reason, self._reason = self._reason, b""
        if status == 101 or not 100 <= status <= 999 or not _REASON.fullmatch(reason):
            raise _Fallback
        if self._te and (len(self._te) != 1 or self._te[0].lower() != b"chunked"):
            raise _Fallback
        self._until_close = self._length is None and not self._te
        headers, self._headers, self._te = self._headers, [], []
        self._in_head = False
        self._head_size = 0
        self._events.append(Head(status, reason, headers, self._parser.get_http_version().encode()))
        if status >= 200:
            self._final = True
            self._raw = None  # accepted: h11 will not be needed
            if self._method == b"HEAD":
                self._complete = True
                self._events.append(END)

    def on_body(self, body: bytes) -> None:
        if not self._complete:
            self._events.append(bytes(body))

    def on_message_complete(self) -> None:
        if self._final:
            if not self._complete:
                self._complete = True
                self._events.append(END)
        else:  # an informational answer ended; the next head follows
            self._in_head = True
            self._length = None

    # -- feeding and events --------------------------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """The next bytes from the upstream; ``b""`` at its end of data."""
        if self._h11 is not None:
            self._h11.receive_data(data)
            return
        if self._complete:
            return  # anything after the response is not ours to read
        if not data:
            self._end_of_data()
            return
        if self._raw is not None:
            self._raw.append(data)
            self._raw_size += len(data)
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserCallbackError) as exc:
            if self._complete:
                return
            if isinstance(exc.__context__, _TooLarge):  # counted by header: the read may hold body bytes too
                self._raw = None
                self._error = "response head too large"
            elif self._raw is not None:
                self._to_h11()
            else:
                self._error = str(exc) or type(exc).__name__
            return
        if self._in_head and self._raw is not None and self._raw_size > self._max_head:
            self._raw = None  # not a head that ends in time, whoever parsed it (h11's bound is the same)
            self._error = "response head too large"

    def _end_of_data(self) -> None:
        if self._raw is not None:  # no final head yet: h11 says what was wrong with what came
            self._to_h11()
            assert self._h11 is not None
            self._h11.receive_data(b"")
            return
        self._complete = True
        self._events.append(END if self._until_close else CUT)

    def _to_h11(self) -> None:
        raw = b"".join(self._raw or [])
        self._raw = None
        self._events.clear()
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self._max_head)
        conn.send(h11.Request(method=self._method, target=b"/", headers=[(b"host", b"upstream"),
                                                                         *(self._upgrade or [])]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(raw)
        self._h11 = conn

    def next_event(self) -> Event:
        """The next event: a :class:`Head`, body bytes, :data:`END`, :data:`CUT` or :data:`NEED_DATA`. Raises
        :class:`ResponseError`."""
        if self._h11 is not None:
            return self._from_h11()
        if self._events:
            event = self._events.popleft()
            if isinstance(event, Head) and event.status_code < 200:
                self._informational += 1
            return event
        if self._error is not None:
            raise ResponseError(self._error)
        return NEED_DATA

    def _from_h11(self) -> Event:
        assert self._h11 is not None
        try:
            event = self._h11.next_event()
        except h11.RemoteProtocolError as exc:
            raise ResponseError(str(exc)) from exc
        if isinstance(event, h11.InformationalResponse) and self._informational:
            self._informational -= 1  # delivered already, from httptools
            return self._from_h11()
        if isinstance(event, h11.Response | h11.InformationalResponse):
            return Head(event.status_code, bytes(event.reason), list(event.headers), bytes(event.http_version))
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return END
        if isinstance(event, h11.ConnectionClosed):
            return CUT
        return NEED_DATA  # NEED_DATA, or PAUSED after a 101

    @property
    def trailing(self) -> bytes:
        """After a ``101``: the bytes the upstream sent past its head."""
        return bytes(self._h11.trailing_data[0]) if self._h11 is not None else b""

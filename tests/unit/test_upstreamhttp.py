"""The upstream response parser (proxy.upstreamhttp): httptools for well-formed answers, h11 the arbiter of the rest.

Every difference found between llhttp (inside httptools) and h11 has a case here, and a differential property test
feeds both the same generated responses, whole and byte by byte: the events must be the same, or both must refuse.
"""

from __future__ import annotations

import tempfile
from typing import Any

import h11
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from proxy.framing import ambiguity
from proxy.upstreamhttp import CUT, END, NEED_DATA, Head, HeadError, ResponseError, ResponseParser, request_head

set_hypothesis_home_dir(tempfile.mkdtemp(prefix="tdhyp"))
SETTINGS = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MAX_HEAD = 64 * 1024
UPGRADE = [(b"connection", b"Upgrade"), (b"upgrade", b"SPDY/3.1")]


def parse(data: bytes | list[bytes], method: bytes = b"GET", eof: bool = True,
          upgrade: bool = False) -> tuple[list[Any], bool]:
    """(events, whether h11 decided) for ``data`` fed in pieces, then the end of data when ``eof``."""
    p = ResponseParser(method, MAX_HEAD, UPGRADE if upgrade else None)
    out: list[Any] = []
    pieces = [data] if isinstance(data, bytes) else data
    for piece in [*pieces, *([b""] if eof else [])]:
        p.receive(piece)
        while True:
            try:
                event = p.next_event()
            except ResponseError as exc:
                return [*out, ("error", str(exc))], p._h11 is not None
            if event is NEED_DATA:
                break
            out.append(event)
            if event in (END, CUT) or (isinstance(event, Head) and event.status_code == 101):
                return out, p._h11 is not None
    return out, p._h11 is not None


def by_h11(data: bytes, method: bytes = b"GET", eof: bool = True) -> list[Any]:
    """What h11 alone makes of ``data`` (as the gateway parsed responses before), in the same terms."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    conn.send(h11.Request(method=method, target=b"/", headers=[(b"host", b"upstream")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    out: list[Any] = []
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            return [*out, ("error", str(exc))]
        if isinstance(event, h11.Response | h11.InformationalResponse):
            out.append(Head(event.status_code, bytes(event.reason), list(event.headers), bytes(event.http_version)))
        elif isinstance(event, h11.Data):
            out.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return [*out, END]
        elif isinstance(event, h11.ConnectionClosed):
            return [*out, CUT]
        else:
            return out


def same(events: list[Any]) -> list[Any]:
    """Body pieces joined (parsers split bodies differently), errors and cuts reduced to the fact of one (h11 raises
    for a body cut short; the parser says CUT: either way the exchange ends with an error)."""
    out: list[Any] = []
    for e in events:
        if isinstance(e, bytes) and out and isinstance(out[-1], bytes):
            out[-1] += e
        elif isinstance(e, tuple) or e is CUT:  # an incomplete response, refused or cut: the client is cut off
            out.append("error")
        elif not (isinstance(e, bytes) and not e):
            out.append(e)
    return out


def head(events: list[Any]) -> Head:
    (h,) = [e for e in events if isinstance(e, Head) and e.status_code >= 200]
    return h


def test_a_plain_response_is_parsed_by_httptools() -> None:
    events, decided = parse(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length:  2 \r\n\r\nhi", eof=False)
    assert not decided
    assert events == [Head(200, b"OK", [(b"content-type", b"text/plain"), (b"content-length", b"2")], b"1.1"), b"hi",
                      END]


@pytest.mark.parametrize(("data", "header"), [
    (b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok", (b"x-folded", b"a b")),
    (b"HTTP/1.1 200 OK\nX-Bare: 1\nContent-Length: 2\n\nok", (b"x-bare", b"1")),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", (b"content-length", b"2")),
    (b"HTTP/1.1 200 OK\r\nX-Ctl: a\x01b\r\nContent-Length: 2\r\n\r\nok", (b"x-ctl", b"a\x01b")),
], ids=["obs-fold", "bare-LF", "same-length-twice", "control-char-in-value"])
def test_what_llhttp_refuses_and_h11_accepts_is_h11s_to_parse(data: bytes, header: tuple[bytes, bytes]) -> None:
    """llhttp refuses these; h11 accepted them, normalised, and still does: the gateway's behaviour is unchanged."""
    events, decided = parse(data)
    assert decided and events[-2:] == [b"ok", END] and header in head(events).headers
    assert same(events) == same(by_h11(data))


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 099 Early\r\nContent-Length: 5\r\n\r\nhello",
], ids=["te-gzip", "te-gzip-chunked", "te-twice", "te-unknown", "te-chunked-listed-twice", "status-099"])
def test_what_llhttp_accepts_and_h11_refuses_is_refused(data: bytes) -> None:
    """llhttp would read these as some body; h11 refuses them, and so does the gateway."""
    events, decided = parse(data)
    assert decided and events[-1][0] == "error" and b"hello" not in events
    assert by_h11(data)[-1][0] == "error"


@pytest.mark.parametrize(("data", "why"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     "both Content-Length and Transfer-Encoding"),
    (b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
     "Transfer-Encoding in an HTTP/1.0 message"),
], ids=["cl-and-te", "te-in-http-1.0"])
def test_ambiguous_framing_reaches_the_ambiguity_check(data: bytes, why: str) -> None:
    """llhttp refuses CL with TE itself and reads TE in HTTP/1.0 as chunked: either way the head that comes out is
    the one the caller's ambiguity check refuses before anything is relayed."""
    events, _ = parse(data, eof=False)
    first = head(events)
    assert ambiguity(first.headers, first.http_version) == why


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nX(y): 1\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\n X: 1\r\nContent-Length: 5\r\n\r\nhello",
    b"http/1.1 200 OK\r\n\r\nhello",
    b"HTTP/1.1 20 OK\r\n\r\nhello",
    b"SSH-2.0-OpenSSH_9.6\r\n",
], ids=["space-before-colon", "two-lengths", "length-plus", "length-inner-space", "bad-name", "nul-in-value",
        "cr-in-value", "leading-continuation", "lower-case-version", "two-digit-status", "not-http"])
def test_malformed_heads_are_refused(data: bytes) -> None:
    events, _ = parse(data)
    assert events[-1][0] == "error" and b"hello" not in events
    assert by_h11(data)[-1][0] == "error"


def test_a_control_character_in_the_reason_is_h11s_to_judge() -> None:
    """llhttp takes it, the gateway's check does not: h11 decides, and accepts it as it always did."""
    data = b"HTTP/1.1 200 O\x01K\r\nContent-Length: 5\r\n\r\nhello"
    events, decided = parse(data)
    assert decided and events == by_h11(data)


@pytest.mark.parametrize("piece", [4096, 256 * 1024], ids=["in-pieces", "in-one-read"])
def test_an_oversized_head_is_refused(piece: int) -> None:
    """llhttp has no bound on a head; the gateway's is ``max_head``, however the head arrives (h11 bounded only a head
    still incomplete after a read)."""
    for big in (b"X-Big: " + b"a" * MAX_HEAD + b"\r\n", b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEAD // 8))):
        data = b"HTTP/1.1 200 OK\r\n" + big + b"Content-Length: 2\r\n\r\nok"
        events, _ = parse([data[i:i + piece] for i in range(0, len(data), piece)], eof=False)
        assert events == [("error", "response head too large")]


@pytest.mark.parametrize("size", [b"10000000000000000000005", b"0x5", b"zz", b"5 ;x"], ids=["overflow", "0x",
                                                                                           "not-hex", "space"])
def test_a_bad_chunk_size_ends_the_response_with_an_error(size: bytes) -> None:
    """After the head (already relayed by then) a malformed chunk is an error, never an end: the client is cut off.
    (``5 ;x``, whitespace between the size and an extension, is the one chunk line h11 took and llhttp refuses.)"""
    events, _ = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nhello\r\n0\r\n\r\n")
    assert isinstance(events[0], Head) and events[-1][0] == "error" and END not in events


def test_an_incomplete_body_is_cut_and_a_close_delimited_one_ends() -> None:
    assert parse([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"hello"])[0][-2:] == [b"hello", CUT]
    assert parse([b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n"])[0][-2:] == [
        b"hello", CUT]
    assert parse([b"HTTP/1.1 200 OK\r\n\r\n", b"hello"])[0][-2:] == [b"hello", END]
    assert parse([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", b"hello"], eof=False)[0][-1] == b"hello"


def test_no_answer_at_all_is_h11s_error() -> None:
    events, decided = parse(b"")
    assert decided and events[-1][0] == "error"
    events, _ = parse(b"HTTP/1.1 200 OK\r\nContent-")
    assert events[-1][0] == "error"


def test_head_responses_no_content_and_informational_answers() -> None:
    events, _ = parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method=b"HEAD", eof=False)
    assert events == [Head(200, b"OK", [(b"content-length", b"5")], b"1.1"), END]  # no body to wait for
    assert parse(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", eof=False)[0][-1] is END
    events, _ = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", eof=False)
    assert [e.status_code for e in events if isinstance(e, Head)] == [100, 200] and events[-2:] == [b"ok", END]


def test_trailers_are_dropped_and_bytes_after_the_response_ignored() -> None:
    events, _ = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-Trailer: 1\r\n\r\n"
                      b"garbage that is no response", eof=False)
    assert same(events)[1:] == [b"ok", END] and (b"x-trailer", b"1") not in head(events).headers


@pytest.mark.parametrize("after", [b"\x80\x03raw", bytes(range(256)) * 1024], ids=["short", "256-KiB-in-the-same-read"])
def test_a_101_keeps_the_bytes_after_its_head(after: bytes) -> None:
    """However many bytes came in the same read as the head (they are not part of the head)."""
    p = ResponseParser(b"POST", MAX_HEAD, UPGRADE)
    p.receive(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n\r\n" + after)
    event = p.next_event()
    assert isinstance(event, Head) and event.status_code == 101 and p.trailing == after


def test_the_request_head_refuses_control_characters() -> None:
    assert request_head(b"GET", b"/x?y=1", [(b"host", b"n:1")]) == b"GET /x?y=1 HTTP/1.1\r\nhost: n:1\r\n\r\n"
    for target, value in [(b"/x y", b"v"), (b"/x\r\nX: 1", b"v"), (b"/x", b"v\r\nX: 1"), (b"/x", b"a\x00"),
                          (b"", b"v")]:
        with pytest.raises(HeadError):
            request_head(b"GET", target, [(b"host", value)])


# -- differential: the same events as h11 for generated responses --------------------------------------------------

TOKENS = st.sampled_from([b"X-A", b"content-type", b"Content-Length", b"Transfer-Encoding", b"Connection",
                          b"Location", b"Set-Cookie", b"x_b", b"X:", b"X Y", b""])
VALUES = st.sampled_from([b"", b"1", b"5", b" 5 ", b"05", b"5, 5", b"-1", b"chunked", b"Chunked", b"gzip",
                          b"gzip, chunked", b"chunked, gzip", b"close", b"keep-alive", b"a b", b"\tv\t", b"caf\xc3\xa9",
                          b"a\x01", b"a\x7f", b"/p", b"99999999999999999999"])
EOLS = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r"])
STATUS = st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 304 NM",
                          b"HTTP/1.1 404 Not Found", b"HTTP/1.1 100 Continue", b"HTTP/1.1 200", b"HTTP/1.1 999 X",
                          b"HTTP/2.0 200 OK", b"HTTP/1.1 200 O\tK", b"HTTP/1.1  200 OK"])
BODIES = st.sampled_from([b"", b"hello", b"5\r\nhello\r\n0\r\n\r\n", b"5\r\nhello\r\n0\r\n", b"0\r\n\r\n",
                          b"5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n", b"3\r\nhello\r\n", b"hel"])


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    eol = draw(EOLS)
    lines = [draw(STATUS)]
    for name, value in draw(st.lists(st.tuples(TOKENS, VALUES), max_size=5)):
        lines.append(name + b": " + value)
        if draw(st.integers(0, 20)) == 0:
            lines.append(b" folded")
    return eol.join([*lines, b"", b""]) + draw(BODIES)


@SETTINGS
@given(responses(), st.sampled_from([b"GET", b"HEAD"]), st.booleans())
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n", b"GET", True)
def test_same_events_as_h11(data: bytes, method: bytes, eof: bool) -> None:
    expected = same(by_h11(data, method, eof))
    whole = same(parse(data, method, eof)[0])
    piecewise = same(parse([data[i:i + 1] for i in range(len(data))], method, eof)[0])
    if "error" in expected or "error" in whole:
        # Both refuse, or (after a head both took) httptools refuses a body h11 did not complete either (h11 waits
        # for a whole chunk line before it judges one; llhttp refuses at the first wrong byte).
        assert whole[-1] == "error" and expected[-1] is not END, (expected, whole)
    else:
        assert whole == expected, (expected, whole)
    assert piecewise == whole

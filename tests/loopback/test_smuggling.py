"""No request smuggling through the proxy URLs (RFC 9112 section 6): a message whose body length could be read two
ways is refused -- a request with 400 and close, an upstream response with 502 -- and nothing ambiguous is ever
forwarded. What h11 accepts but normalises (obs-fold, bare LF, a padded or repeated identical Content-Length) reaches
the other side written anew, on single CRLF lines with one framing header.

Each case runs against a raw upstream that records the exact bytes forwarded and a strict HTTP server (aiohttp);
upstream responses come from the raw upstream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest

from tests import rawhttp
from tests.waiting import wait_for

from .smugglebed import Bed, smuggle_bed


@pytest.fixture
async def bed() -> AsyncIterator[Bed]:
    async with smuggle_bed() as b:
        yield b


REFUSED_REQUESTS = {
    # A pipelined request hides in the body that Content-Length would have read.
    "cl-and-te": b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nGET {s} HTTP/1.1\r\nHost: g\r\n\r\n",
    "te-and-cl": b"POST {t} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                 b"0\r\n\r\n",
    "two-lengths": b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "length-list": b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length: 5, 6\r\n\r\nhello!",
    "length-with-plus": b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length: +5\r\n\r\nhello",
    "length-with-minus": b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length: -5\r\n\r\nhello",
    "length-with-inner-space": b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length: 1 5\r\n\r\nhello",
    "length-huge": b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length: 99999999999999999999\r\n\r\nhello",
    "te-chunked-not-last": b"POST {t} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "te-gzip-only": b"POST {t} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: gzip\r\n\r\nhello",
    "te-twice": b"POST {t} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0\r\n\r\n",
    "te-in-http-1.0": b"POST {t} HTTP/1.0\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "folded-length": b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\n 6\r\n\r\nhello!",
    "space-before-colon": b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length : 5\r\n\r\nhello",
}


def status_lines(answer: bytes) -> int:
    """How many status lines the client received (a second one inside a body would be a desync)."""
    return len(re.findall(rb"(?:^|\n)HTTP/1\.[01] \d{3} ", answer))


def _fill(template: bytes, bed: Bed, port: int) -> bytes:
    return template.replace(b"{t}", bed.url(port).encode()).replace(b"{s}", bed.url(port, "/smuggled").encode())


async def _send(bed: Bed, data: bytes) -> tuple[bytes, str]:
    return await rawhttp.raw("127.0.0.1", bed.proxy_port, data, timeout=10)


@pytest.mark.parametrize("case", sorted(REFUSED_REQUESTS))
async def test_ambiguous_requests_are_refused_with_400_and_close(bed: Bed, case: str) -> None:
    for port in (bed.raw_port, bed.strict_port):
        answer, how = await _send(bed, _fill(REFUSED_REQUESTS[case], bed, port))
        assert rawhttp.status_of(answer) == 400, answer
        assert how in ("eof", "reset") and status_lines(answer) == 1, answer  # one answer, then closed
        assert b"bytearray" not in answer and b"h11" not in answer, answer
    assert bed.raw.connections == 0 and bed.raw.received == [], "nothing of an ambiguous request is forwarded"
    assert bed.strict_seen == []


@pytest.mark.parametrize("size", [b"10000000000000000000005", b"0x5", b"zz"], ids=["overflow", "0x", "not-hex"])
async def test_a_bad_chunk_size_is_400_and_never_completes_upstream(bed: Bed, size: bytes) -> None:
    bed.raw.mode = "silent"
    for port in (bed.raw_port, bed.strict_port):
        head = f"POST {bed.url(port)} HTTP/1.1\r\nHost: g\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        answer, how = await _send(bed, head + size + b"\r\nhello\r\n0\r\n\r\n")
        assert rawhttp.status_of(answer) == 400 and status_lines(answer) == 1, answer
        assert how in ("eof", "reset")
    assert bed.strict_seen == [], "the strict upstream never got a whole request"
    # The raw upstream got the head and then an end of stream: never the body's final chunk.
    await wait_for(lambda: len(bed.raw.received) == 1, 5, "the raw upstream's record")
    (forwarded,) = bed.raw.received
    assert b"transfer-encoding: chunked\r\n" in forwarded and not forwarded.endswith(b"0\r\n\r\n"), forwarded


async def test_normalised_requests_reach_the_upstream_written_anew(bed: Bed) -> None:
    cases = [
        (b"GET {t} HTTP/1.1\r\nHost: g\r\nX-Folded: a\r\n b\r\nConnection: close\r\n\r\n", b"x-folded: a b\r\n"),
        (b"GET {t} HTTP/1.1\nHost: g\nX-Bare: 1\nConnection: close\n\n", b"x-bare: 1\r\n"),
        (b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length:  5 \r\nConnection: close\r\n\r\nhello",
         b"content-length: 5\r\n"),
        (b"POST {t} HTTP/1.1\r\nHost: g\r\nContent-Length: 5\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
         b"content-length: 5\r\n"),
    ]
    for n, (template, expected) in enumerate(cases, 1):
        answer, _ = await _send(bed, _fill(template, bed, bed.raw_port))
        assert rawhttp.status_of(answer) == 200 and answer.endswith(b"ok"), answer
        await wait_for(lambda: len(bed.raw.received) == n, 5, "the raw upstream's record")  # noqa: B023
        forwarded = bed.raw.received[-1]
        head, _, _ = forwarded.partition(b"\r\n\r\n")
        assert expected in forwarded, forwarded
        assert b"\n" not in head.replace(b"\r\n", b""), "every forwarded line ends in CRLF"
        assert not any(line[:1] in (b" ", b"\t") for line in head.split(b"\r\n")), "no folded line"
        assert head.lower().count(b"content-length") <= 1 and b"transfer-encoding" not in head.lower()
        answer, _ = await _send(bed, _fill(template, bed, bed.strict_port))
        assert rawhttp.status_of(answer) == 200 and answer.endswith(b"seen"), answer
    folded, bare, padded, twice = bed.strict_seen
    assert (b"x-folded", b"a b") in folded["headers"]  # type: ignore[operator]
    assert (b"x-bare", b"1") in bare["headers"]  # type: ignore[operator]
    assert padded["body"] == twice["body"] == b"hello"


REFUSED_RESPONSES = {
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "length-with-plus": b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
    "length-with-inner-space": b"HTTP/1.1 200 OK\r\nContent-Length: 1 5\r\n\r\nhello",
    "te-chunked-not-last": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "te-in-http-1.0": b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "folded-length": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n 6\r\n\r\nhello!",
    "chunk-size-overflow": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"10000000000000000000005\r\nhello\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(REFUSED_RESPONSES))
async def test_ambiguous_responses_are_502_and_never_relayed(bed: Bed, case: str) -> None:
    bed.raw.reply = REFUSED_RESPONSES[case]
    answer, how = await _send(bed, f"GET {bed.url(bed.raw_port)} HTTP/1.1\r\nHost: g\r\n\r\n".encode())
    assert rawhttp.status_of(answer) == 502, answer
    assert how in ("eof", "reset") and status_lines(answer) == 1, answer
    assert b"hello" not in answer and b"bytearray" not in answer, answer


async def test_normalised_responses_reach_the_client_written_anew(bed: Bed) -> None:
    for reply, expected in [
        (b"HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length: 2\r\n\r\nok", b"x-folded: a b\r\n"),
        (b"HTTP/1.1 200 OK\nX-Bare: 1\nContent-Length: 2\n\nok", b"x-bare: 1\r\n"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok", b"content-length: 2\r\n"),
    ]:
        bed.raw.reply = reply
        answer, _ = await _send(bed, f"GET {bed.url(bed.raw_port)} HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n"
                                .encode())
        head, _, body = answer.partition(b"\r\n\r\n")
        assert rawhttp.status_of(answer) == 200 and body == b"ok", answer
        assert expected in head.lower() + b"\r\n", answer
        assert b"\n" not in head.replace(b"\r\n", b"") and head.lower().count(b"content-length") == 1, answer

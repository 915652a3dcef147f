"""A response that breaks never looks complete through the proxy URLs, and never gets a second status line.

Shapes: Content-Length, chunked and close-delimited bodies cut short by the upstream's clean close or by its reset.
The client must see a body that ends short (no final chunk, fewer bytes than declared) on a connection the gateway
closes; a close-delimited body stays close-delimited (it is not re-framed as chunked with a final chunk the upstream
never sent). Whatever fails once a response head is out, the client gets that one status line and nothing after it.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import h11
import pytest

from proxy.errors import UpstreamError
from proxy.exchange import Exchange
from proxy.server import Limits, Server
from tests import rawhttp

from .smugglebed import Bed, smuggle_bed

pytestmark = pytest.mark.both_loops


@pytest.fixture
async def bed() -> AsyncIterator[Bed]:
    async with smuggle_bed() as b:
        yield b


def status_lines(answer: bytes) -> int:
    return len(re.findall(rb"(?:^|\n)HTTP/1\.[01] \d{3} ", answer))


async def fetch(bed: Bed, reply: list[bytes], then: str = "close") -> tuple[bytes, str]:
    bed.raw.reply, bed.raw.then = reply, then
    return await rawhttp.raw("127.0.0.1", bed.proxy_port,
                             f"GET {bed.url(bed.raw_port)} HTTP/1.1\r\nHost: g\r\n\r\n".encode(), timeout=10)


def parsed(answer: bytes) -> tuple[bool, bytes]:
    """(complete, body) as a strict client reads ``answer`` followed by the end of the connection."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "g")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(answer)
    conn.receive_data(b"")
    body = b""
    try:
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return True, body
            elif isinstance(event, h11.ConnectionClosed) or event is h11.NEED_DATA:
                return False, body
    except h11.RemoteProtocolError:
        return False, body


@pytest.mark.parametrize("then", ["close", "reset"])
async def test_content_length_cut_short_ends_short(bed: Bed, then: str) -> None:
    answer, how = await fetch(bed, [b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", b"x" * 10], then)
    assert rawhttp.status_of(answer) == 200 and status_lines(answer) == 1, answer
    assert parsed(answer) == (False, b"x" * 10)
    assert how in ("eof", "reset")


@pytest.mark.parametrize("then", ["close", "reset"])
async def test_chunked_cut_short_never_gets_the_final_chunk(bed: Bed, then: str) -> None:
    answer, how = await fetch(bed, [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n"],
                              then)
    assert rawhttp.status_of(answer) == 200 and status_lines(answer) == 1, answer
    assert not answer.endswith(b"0\r\n\r\n") and parsed(answer) == (False, b"hello"), answer
    assert how in ("eof", "reset")


async def test_close_delimited_stays_close_delimited(bed: Bed) -> None:
    answer, how = await fetch(bed, [b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", b"partial"])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert rawhttp.status_of(answer) == 200 and status_lines(answer) == 1, answer
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower(), head
    assert b"connection: close" in head.lower() and body == b"partial" and how == "eof", answer


async def test_close_delimited_broken_upstream_is_a_reset(bed: Bed) -> None:
    answer, how = await fetch(bed, [b"HTTP/1.1 200 OK\r\n\r\n", b"partial"], "reset")
    assert rawhttp.status_of(answer) == 200 and status_lines(answer) == 1, answer
    assert how == "reset" and not answer.endswith(b"0\r\n\r\n"), (how, answer)


async def test_bad_chunk_after_the_head_cuts_the_connection(bed: Bed) -> None:
    answer, _ = await fetch(bed, [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n",
                                  b"zz\r\nHTTP/1.1 500 Internal Server Error\r\n\r\n"])
    assert status_lines(answer) == 1 and b"502" not in answer and b"500" not in answer, answer
    assert parsed(answer) == (False, b"hello")


@pytest.mark.parametrize("failure", ["upstream", "bug", "overrun"])
async def test_no_second_status_line_after_a_head_whatever_fails(failure: str) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.request()
        await ex.send(h11.Response(status_code=200, headers=[("Content-Length", "100")]), h11.Data(data=b"x" * 10))
        if failure == "upstream":
            raise UpstreamError("target broke")
        if failure == "overrun":  # more than the declared length: h11 refuses, its state becomes ERROR
            await ex.send(h11.Data(data=b"y" * 200))
        raise RuntimeError("a bug")

    server = Server("test", handler, Limits(header_timeout=5, idle_timeout=5))
    port = await server.listen_tcp("127.0.0.1", 0, None)
    try:
        answer, how = await rawhttp.raw("127.0.0.1", port, b"GET / HTTP/1.1\r\nHost: g\r\n\r\n", timeout=5)
    finally:
        await server.close()
    assert status_lines(answer) == 1 and answer.endswith(b"x" * 10), answer
    assert how == "reset"

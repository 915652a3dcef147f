"""Errors a Kubernetes client can read, in plain words: a ``Status`` object for a caller that accepts JSON, one line
of text otherwise, and never an HTTP parser's internals (``bytearray(b'...')``, h11 state names)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from tests import rawhttp

from .smugglebed import Bed, smuggle_bed


@pytest.fixture
async def bed() -> AsyncIterator[Bed]:
    async with smuggle_bed() as b:
        yield b


async def ask(bed: Bed, data: bytes) -> tuple[bytes, bytes]:
    answer, _ = await rawhttp.raw("127.0.0.1", bed.proxy_port, data, timeout=10)
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, body


async def test_json_callers_get_a_status_object_and_others_one_line(bed: Bed) -> None:
    request = b"GET /api/v1/nodes/nope/proxy/ HTTP/1.1\r\nHost: g\r\nAccept: %s\r\n\r\n"
    head, body = await ask(bed, request % b"application/json, */*")
    assert head.startswith(b"HTTP/1.1 404 ") and b"content-type: application/json" in head.lower(), head
    status = json.loads(body)
    assert status == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                      "message": "node 'nope' not found", "reason": "NotFound", "code": 404}
    head, body = await ask(bed, request % b"*/*")
    assert b"content-type: text/plain" in head.lower() and body == b"node 'nope' not found\n", (head, body)
    head, body = await ask(bed, b"GET /api/v1/namespaces/default/pods/x/log?tailLines=abc HTTP/1.1\r\nHost: g\r\n"
                                b"Accept: application/json\r\n\r\n")
    assert json.loads(body)["code"] == 503  # the pod cannot be looked up here: no kubelet answers in this bed


async def test_tls_to_the_plain_port_is_said_in_plain_words(bed: Bed) -> None:
    hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32)  # a ClientHello's start: no line end
    head, body = await ask(bed, hello)
    assert head.startswith(b"HTTP/1.1 400 ") and body == b"TLS sent to a plain-HTTP port\n", body


@pytest.mark.parametrize(("reply", "words"), [
    (b"\x15\x03\x03\x00\x02\x02\x46", b"the target spoke TLS; use the https: prefix"),
    (b"\x16\x03\x03\x00\x02\x02\x46\r\n\r\n", b"the target spoke TLS; use the https: prefix"),
    (b"", b"closed the connection without answering (if it serves TLS, use the https: prefix)"),
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", b"malformed status line"),
])
async def test_a_target_that_is_not_http_is_said_in_plain_words(bed: Bed, reply: bytes, words: bytes) -> None:
    bed.raw.reply = reply
    head, body = await ask(bed, f"GET {bed.url(bed.raw_port)} HTTP/1.1\r\nHost: g\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 502 ") and words in body, body
    assert b"bytearray" not in body and b"ConnectionClosed" not in body and b"role=" not in body, body

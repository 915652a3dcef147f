"""Log formatting: one line per event in logfmt or JSON, with context, and secrets never printed."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from tunneld.ops import logs

PEM = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ\n"
       "-----END OPENSSH PRIVATE KEY-----\n")
TOKEN = "abcdef.0123456789abcdef"
FILE_TOKEN = "31ada4fd-adec-460c-809a-9e56ceb75269"


@pytest.fixture(params=["logfmt", "json"])
def captured(request: pytest.FixtureRequest) -> Iterator[tuple[str, io.StringIO, logging.Logger]]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(logs.JSONFormatter() if request.param == "json" else logs.LogfmtFormatter())
    logger = logging.getLogger(f"tunneld.test.{request.param}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield request.param, buf, logger
    logger.removeHandler(handler)


def test_one_line_per_event_with_context(captured: tuple[str, io.StringIO, logging.Logger]) -> None:
    fmt, buf, log = captured
    log.warning("tunnel down\nsecond line", extra={"node": "node-1", "channel": "10.0.0.1:443", "error": 'a "b"'})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1
    if fmt == "json":
        rec = json.loads(lines[0])
        assert rec["level"] == "warning" and rec["msg"] == "tunnel down\nsecond line"
        assert rec["node"] == "node-1" and rec["channel"] == "10.0.0.1:443" and rec["error"] == 'a "b"'
    else:
        assert lines[0].split(" ", 2)[1] == "level=warning"
        assert 'msg="tunnel down\\nsecond line" node=node-1 channel=10.0.0.1:443 error="a \\"b\\""' in lines[0]


def test_secrets_never_printed(captured: tuple[str, io.StringIO, logging.Logger]) -> None:
    _, buf, log = captured
    logs.add_secret(FILE_TOKEN)
    log.info("loaded key %s", PEM)
    log.info("bootstrap with %s", TOKEN, extra={"node": "node-2"})
    log.info("request", extra={"authorization": "Bearer xyzzy-secret", "token": "plain-secret-value"})
    log.info("header Authorization: Bearer %s seen", FILE_TOKEN)
    log.info("file token %s", FILE_TOKEN)
    try:
        raise ValueError(f"bad token {TOKEN}")
    except ValueError:
        log.exception("failed")
    out = buf.getvalue()
    assert len(out.splitlines()) == 6
    for secret in ("b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ", "0123456789abcdef", "xyzzy-secret",
                   "plain-secret-value", FILE_TOKEN):
        assert secret not in out
    assert "[redacted private key]" in out and "abcdef.[redacted]" in out, "what is left stays useful"
    assert "node-2" in out

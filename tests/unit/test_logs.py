"""Log formatting: one line per event in logfmt or JSON, with context, and secrets never printed."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path

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


def test_redaction_leaves_the_daemons_words_and_ids_alone(captured: tuple[str, io.StringIO, logging.Logger]) -> None:
    fmt, buf, log = captured
    log.warning("certificates API refused: %s", "Unauthorized: a valid bearer token or client certificate is required")
    log.info("expired bootstrap token presented", extra={"token_id": "abcdef", "token_file": "/etc/tunneld/t.csv"})
    log.info("sent Authorization: Bearer %s and Basic %s", "s3cr3t-Value_42", "dXNlcjpwYXNz")
    out = buf.getvalue()
    assert "a valid bearer token or client certificate is required" in out
    if fmt == "json":
        rec = json.loads(out.splitlines()[1])
        assert rec["token_id"] == "abcdef" and rec["token_file"] == "/etc/tunneld/t.csv"
    else:
        assert "token_id=abcdef token_file=/etc/tunneld/t.csv" in out
    assert "s3cr3t-Value_42" not in out and "dXNlcjpwYXNz" not in out
    assert "Bearer [redacted] and Basic [redacted]" in out


def test_tokens_of_the_token_file_are_scrubbed_from_every_line(tmp_path: Path) -> None:
    from certs.ca import CertificateAuthority
    from tests.certs_daemon import write_config
    from tunneld.certsd import CertsDaemon
    from tunneld.config import load_config

    first, second = "q7-" + secrets.token_hex(8), "Zz" + secrets.token_hex(8)  # shapes no pattern recognises
    tokens = tmp_path / "tokens.csv"
    tokens.write_text(f'{first},admin,0,"system:masters"\n')
    cfg = write_config(tmp_path, "127.0.0.1", extra=f'[auth]\ntoken_file = "{tokens}"\n\n')
    CertificateAuthority.create().save(tmp_path / "ca.crt", tmp_path / "ca.key")
    daemon = CertsDaemon(load_config(cfg.path))
    try:
        assert logs.redact(f"caller sent {first}") == "caller sent [redacted]"
        tokens.write_text(f'{second},admin,0,"system:masters"\n')
        daemon.reload(load_config(cfg.path))  # SIGHUP re-reads the file: its new tokens are scrubbed too
        assert logs.redact(f"Authorization: {second}") == "Authorization: [redacted]"
    finally:
        asyncio.run(daemon.store.close())


HOSTILE = "bye\x1b]0;owned\x07\x1b[2J\u202eevil"


def test_a_peers_escape_sequences_are_shown_not_obeyed(captured: tuple[str, io.StringIO, logging.Logger]) -> None:
    fmt, buf, log = captured
    log.warning("tunnel down", extra={"node": "node-1", "error": HOSTILE})  # a value with no space to quote
    log.warning("lost: %s", HOSTILE)
    out = buf.getvalue()
    assert len(out.splitlines()) == 2
    assert not any(c in out for c in "\x1b\x07\u202e"), "no control or bidi character reaches the log"
    if fmt == "json":
        assert json.loads(out.splitlines()[0])["error"] == HOSTILE
    else:
        assert 'error="bye\\u001b]0;owned\\u0007\\u001b[2J\\u202eevil"' in out

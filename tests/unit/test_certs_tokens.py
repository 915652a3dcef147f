"""Token file parsing, bootstrap tokens and the authenticator; the secret-file helpers."""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import stat
from pathlib import Path

import pytest

from certs.files import refuse_overwrite, write_public, write_secret
from certs.tokens import (
    Authenticator,
    BootstrapToken,
    TokenError,
    TokenFileError,
    load_token_file,
    new_bootstrap_token,
    parse_duration,
    parse_token_file,
)

NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def test_token_file_rfc4180_quoting_and_groups() -> None:
    text = 'abc123,alice,1001,"group1,group2"\n\n"tok,with,commas","bob ""the"" admin",1002\n'
    tokens = parse_token_file(text, "tokens.csv")
    assert [(t.token, t.user, t.uid, t.groups) for t in tokens] == [
        ("abc123", "alice", "1001", ("group1", "group2")),
        ("tok,with,commas", 'bob "the" admin', "1002", ()),
    ]


def test_token_file_short_line_fails_whole_file_with_file_and_line() -> None:
    text = "t1,alice,1\nt2,bob\nt3,carol,3\n"
    with pytest.raises(TokenFileError, match=r"^tokens\.csv:2: needs at least 3 columns .* found 2"):
        parse_token_file(text, "tokens.csv")


def test_token_file_empty_token_skipped_with_warning_and_no_secret_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="certs.tokens")
    text = ',nobody,0,"g"\nsupersecret,alice,1\nsupersecret,mallory,2\n'
    tokens = parse_token_file(text, "f.csv")
    assert [t.user for t in tokens] == ["alice"]  # the empty one and the later duplicate are skipped
    records = [(r.getMessage(), getattr(r, "line", None)) for r in caplog.records]
    assert records == [("empty token skipped", 1), ("duplicate token skipped", 3)]
    assert "supersecret" not in caplog.text and all("supersecret" not in str(r.__dict__) for r in caplog.records)


def test_token_file_unterminated_quote_names_line(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('a,b,c\n"x,y,z\n')
    with pytest.raises(TokenFileError, match=rf"^{re.escape(str(path))}:\d+: "):
        load_token_file(path)
    with pytest.raises(TokenFileError, match="No such file"):
        load_token_file(tmp_path / "missing.csv")


def _auth(tokens: dict[str, BootstrapToken], static: str = "", now: dt.datetime = NOW) -> Authenticator:
    async def lookup(token_id: str) -> BootstrapToken | None:
        return tokens.get(token_id)
    return Authenticator(parse_token_file(static), lookup, clock=lambda: now)


async def test_bootstrap_token_authenticates_with_groups_and_node_binding() -> None:
    tok = new_bootstrap_token(dt.timedelta(hours=1), groups=["system:bootstrappers:workers"], node="node-7", now=NOW)
    auth = _auth({tok.token_id: tok})
    ident = await auth.authenticate(tok.token)
    assert ident is not None
    assert ident.user == f"system:bootstrap:{tok.token_id}"
    assert ident.groups == ("system:bootstrappers", "system:bootstrappers:workers")
    assert (ident.method, ident.token_id, ident.node, ident.is_admin) == ("bootstrap", tok.token_id, "node-7", False)
    assert await auth.authenticate(f"{tok.token_id}.{'0' * 16}") is None  # wrong secret


async def test_expired_or_signing_only_bootstrap_token_is_refused() -> None:
    tok = new_bootstrap_token(dt.timedelta(minutes=10), now=NOW)
    assert await _auth({tok.token_id: tok}, now=NOW + dt.timedelta(minutes=9)).authenticate(tok.token) is not None
    assert await _auth({tok.token_id: tok}, now=NOW + dt.timedelta(minutes=10)).authenticate(tok.token) is None
    signing = new_bootstrap_token(None, usages=["signing"], now=NOW)
    assert await _auth({signing.token_id: signing}).authenticate(signing.token) is None


async def test_static_token_authenticates_and_unknown_is_refused() -> None:
    auth = _auth({}, static='s3cr3t-admin,admin,0,"system:masters"\n')
    ident = await auth.authenticate("s3cr3t-admin")
    assert ident is not None and ident.user == "admin" and ident.is_admin and ident.method == "token"
    assert await auth.authenticate("s3cr3t-admio") is None
    assert await auth.authenticate("x" * 5000) is None


def test_new_bootstrap_token_format_and_validation() -> None:
    tokens = {new_bootstrap_token(now=NOW).token for _ in range(50)}
    assert len(tokens) == 50
    assert all(re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", t) for t in tokens)
    tok = new_bootstrap_token(dt.timedelta(hours=24), now=NOW)
    assert tok.expires == NOW + dt.timedelta(hours=24)
    assert new_bootstrap_token(None, now=NOW).expires is None
    with pytest.raises(TokenError, match="system:bootstrappers:"):
        new_bootstrap_token(groups=["system:masters"])
    with pytest.raises(TokenError, match="unknown usage"):
        new_bootstrap_token(usages=["everything"])
    assert BootstrapToken.from_dict(tok.to_dict()) == tok
    assert tok.secret not in repr(tok)


def test_parse_duration() -> None:
    assert parse_duration("24h") == dt.timedelta(hours=24)
    assert parse_duration("1h30m") == dt.timedelta(minutes=90)
    assert parse_duration("7d") == dt.timedelta(days=7)
    assert parse_duration("0") is None
    for bad in ("", "1x", "h", "-1h"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_write_secret_is_0600_atomic_and_refuse_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "key.pem"
    old = os.umask(0)
    try:
        write_secret(target, b"one")
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        write_secret(target, b"two")
        write_public(tmp_path / "ca.crt", b"cert")
    finally:
        os.umask(old)
    assert target.read_bytes() == b"two" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca.crt").stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["key.pem"]  # no temp files left behind
    with pytest.raises(FileExistsError, match=r"key\.pem"):
        refuse_overwrite([target, tmp_path / "nope"], force=False)
    refuse_overwrite([target], force=True)

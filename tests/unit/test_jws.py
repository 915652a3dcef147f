"""Detached JWS (HS256) as kubeadm's bootstrap-token discovery uses it."""

from __future__ import annotations

import json

import pytest

from certs.jws import b64url, b64url_decode, sign_detached, verify_detached

CONTENT = b"Hello from the other side. I must have called a thousand times."
TOKEN_ID = "joshua"
SECRET = "my voice is my passcode"


@pytest.mark.parametrize(
    ("content", "secret", "expected"),
    [
        # Vectors published with Kubernetes' cluster-bootstrap jws package: byte-for-byte interoperability.
        (CONTENT, SECRET, "eyJhbGciOiJIUzI1NiIsImtpZCI6Impvc2h1YSJ9..VShe2taLd-YTrmWuRkcL_8QTNDHYxQIEBsAYYiIj1_8"),
        (b"", SECRET, "eyJhbGciOiJIUzI1NiIsImtpZCI6Impvc2h1YSJ9..7Ui1ALizW4jXphVUB7xUqC9vLYLL9RZeOFfVLoB7Tgk"),
        (CONTENT, "", "eyJhbGciOiJIUzI1NiIsImtpZCI6Impvc2h1YSJ9..UfkqvDGiIFxrMnFseDj9LYJOLNrvjW8aHhF71mvvAs8"),
    ],
)
def test_signature_matches_kubeadm_vectors(content: bytes, secret: str, expected: str) -> None:
    assert sign_detached(content, TOKEN_ID, secret) == expected
    assert verify_detached(expected, content, TOKEN_ID, secret)


def test_round_trip_and_header() -> None:
    jws = sign_detached(b"apiVersion: v1\n", "abcdef", "0123456789abcdef")
    header_b64, empty, _sig = jws.split(".")
    assert empty == ""
    assert json.loads(b64url_decode(header_b64)) == {"alg": "HS256", "kid": "abcdef"}
    assert verify_detached(jws, b"apiVersion: v1\n", "abcdef", "0123456789abcdef")


def test_wrong_secret_kid_or_payload_is_refused() -> None:
    jws = sign_detached(CONTENT, TOKEN_ID, SECRET)
    assert not verify_detached(jws, CONTENT, TOKEN_ID, SECRET + "x")
    assert not verify_detached(jws, CONTENT, "joshub", SECRET)
    assert not verify_detached(jws, CONTENT + b" ", TOKEN_ID, SECRET)
    # A signature made for another token id does not pass for this one even with the same secret.
    other = sign_detached(CONTENT, "other1", SECRET)
    assert not verify_detached(other, CONTENT, TOKEN_ID, SECRET)


def test_malformed_tokens_are_refused() -> None:
    jws = sign_detached(CONTENT, TOKEN_ID, SECRET)
    header, _, sig = jws.split(".")
    attached = f"{header}.{b64url(CONTENT)}.{sig}"
    none_alg = b64url(json.dumps({"alg": "none", "kid": TOKEN_ID}).encode())
    crit = b64url(json.dumps({"alg": "HS256", "kid": TOKEN_ID, "crit": ["exp"]}).encode())
    for bad in (
        "",
        "..",
        header,
        f"{header}..",
        attached,
        f"{none_alg}..",
        f"{none_alg}..{sig}",
        f"{crit}..{sig}",
        f"{header}..{sig}=",
        f"{header}..{sig[:-1]}+",
        f"{header}..{sig}.",
        jws + "A" * 5000,
    ):
        assert not verify_detached(bad, CONTENT, TOKEN_ID, SECRET), bad
    assert not verify_detached(None, CONTENT, TOKEN_ID, SECRET)  # type: ignore[arg-type]


def test_b64url_is_strict() -> None:
    assert b64url(b"\xfb\xff") == "-_8"
    assert b64url_decode("-_8") == b"\xfb\xff"
    for bad in ("+/8", "ab=", " ab", "a"):
        with pytest.raises(ValueError):
            b64url_decode(bad)

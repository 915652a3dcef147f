"""The SSH CA: creation without overwriting, validity parsing, host certificates' contents."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest
from asyncssh.public_key import CERT_TYPE_HOST, CERT_TYPE_USER

from certs.sshca import BACKDATE, SSHCA, SSHCAError, parse_validity


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("52w", 52 * 7 * 86400), ("+1d", 86400), ("12h30m", 12 * 3600 + 1800), ("3600", 3600), ("90s", 90)],
)
def test_parse_validity(text: str, seconds: int) -> None:
    assert parse_validity(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0w", "-1d", "1y", "forever", "261w", "1w x"])
def test_parse_validity_refuses(text: str) -> None:
    with pytest.raises(SSHCAError):
        parse_validity(text)


def test_create_writes_0600_and_never_overwrites(tmp_path: Path) -> None:
    ca = SSHCA.create(tmp_path / "ca")
    private, public = tmp_path / "ca" / "ssh_ca", tmp_path / "ca" / "ssh_ca.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    before = private.read_bytes()
    with pytest.raises(SSHCAError, match="refusing to overwrite"):
        SSHCA.create(tmp_path / "ca")
    assert private.read_bytes() == before
    assert SSHCA.load(private).public_key_line() == ca.public_key_line() == public.read_text().strip()
    forced = SSHCA.create(tmp_path / "ca", force=True)
    assert forced.public_key_line() != ca.public_key_line()
    assert private.stat().st_mode & 0o777 == 0o600


def test_sign_host_certificate_contents(tmp_path: Path) -> None:
    ca = SSHCA.create(tmp_path, algorithm="ecdsa")
    host = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.sign_host(host.export_public_key().decode(), ["node-1", "10.0.0.1", "node-1"], "1d", now=1_000_000)
    assert cert.principals == ("node-1", "10.0.0.1")
    assert (cert.valid_after, cert.valid_before) == (1_000_000 - BACKDATE, 1_000_000 + 86400)
    parsed = asyncssh.import_certificate(cert.text)
    assert parsed.principals == ["node-1", "10.0.0.1"]
    assert parsed.key.export_public_key() == host.export_public_key()
    assert parsed.signing_key.public_data == ca.key.public_data
    with pytest.raises(ValueError, match="expired"):
        parsed.validate(CERT_TYPE_HOST, "10.0.0.1")
    # asyncssh validates type, principal and time the way the gateway will.
    parsed = asyncssh.import_certificate(ca.sign_host(host, ["node-1", "10.0.0.1"], "1d").text)
    parsed.validate(CERT_TYPE_HOST, "10.0.0.1")
    with pytest.raises(ValueError):
        parsed.validate(CERT_TYPE_HOST, "node-2")
    with pytest.raises(ValueError):
        parsed.validate(CERT_TYPE_USER, "node-1")
    assert ca.sign_host(host, ["n"]).serial != ca.sign_host(host, ["n"]).serial


def test_sign_host_refuses_bad_input(tmp_path: Path) -> None:
    ca = SSHCA.create(tmp_path)
    host = asyncssh.generate_private_key("ssh-ed25519")
    pub = host.export_public_key()
    with pytest.raises(SSHCAError, match="private key"):
        ca.sign_host(host.export_private_key(), ["n"])
    with pytest.raises(SSHCAError, match="at least one principal"):
        ca.sign_host(pub, [])
    with pytest.raises(SSHCAError, match="invalid principal"):
        ca.sign_host(pub, ["a,b"])
    with pytest.raises(SSHCAError, match="already a certificate"):
        ca.sign_host(ca.sign_host(pub, ["n"]).text, ["n"])
    with pytest.raises(SSHCAError, match="not an OpenSSH public key"):
        ca.sign_host(b"ssh-ed25519 garbage", ["n"])
    with pytest.raises(SSHCAError):
        ca.sign_host(pub, ["n"], 0)


def test_known_hosts_line(tmp_path: Path) -> None:
    ca = SSHCA.create(tmp_path)
    line = ca.known_hosts_line("*.nodes.example")
    assert line.startswith("@cert-authority *.nodes.example ssh-ed25519 ")
    # asyncssh (the gateway's SSH library) reads it as a CA entry.
    known = asyncssh.import_known_hosts(line + "\n")
    trusted_cas = known.match("x.nodes.example", "", None)[1]
    assert [k.public_data for k in trusted_cas] == [ca.key.public_data]
    with pytest.raises(SSHCAError):
        ca.known_hosts_line("a b")


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(SSHCAError, match="cannot load"):
        SSHCA.load(tmp_path / "missing")
    (tmp_path / "junk").write_text("not a key")
    with pytest.raises(SSHCAError, match="cannot load"):
        SSHCA.load(tmp_path / "junk")

"""The X.509 CA: create, save (0600, no overwrite), load, issue, SPKI pin (checked against openssl)."""

from __future__ import annotations

import datetime as dt
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.ca import BACKDATE, CAError, CertificateAuthority, Usages, generate_key
from certs.files import write_secret


def test_create_save_load_roundtrip(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("test-ca")
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey) and ca.key.curve.name == "secp256r1"
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is True
    ca.save(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    loaded = CertificateAuthority.load(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert loaded.cert == ca.cert and loaded.pin == ca.pin
    with pytest.raises(FileExistsError, match="--force"):
        CertificateAuthority.create("other").save(tmp_path / "ca.crt", tmp_path / "ca.key")
    assert CertificateAuthority.load(tmp_path / "ca.crt", tmp_path / "ca.key").cert == ca.cert
    CertificateAuthority.create("other").save(tmp_path / "ca.crt", tmp_path / "ca.key", force=True)
    assert CertificateAuthority.load(tmp_path / "ca.crt", tmp_path / "ca.key").cert != ca.cert


def test_rsa_ca_and_mismatched_key_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("rsa-ca", key_type="rsa")
    assert isinstance(ca.key, rsa.RSAPrivateKey)
    ca.save(tmp_path / "a.crt", tmp_path / "a.key")
    CertificateAuthority.create("b").save(tmp_path / "b.crt", tmp_path / "b.key")
    with pytest.raises(CAError, match="does not belong"):
        CertificateAuthority.load(tmp_path / "a.crt", tmp_path / "b.key")
    with pytest.raises(CAError, match="cannot load the CA certificate"):
        CertificateAuthority.load(tmp_path / "missing.crt", tmp_path / "b.key")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl binary not installed")
def test_spki_pin_matches_openssl(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("pin-ca")
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    pub = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "ca.crt"), "-noout", "-pubkey"],
                         capture_output=True, check=True).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub, capture_output=True,
                         check=True).stdout
    digest = subprocess.run(["openssl", "dgst", "-sha256", "-r"], input=der, capture_output=True,
                            check=True).stdout.split()[0].decode()
    assert ca.pin == f"sha256:{digest}"


def test_issue_backdates_caps_at_ca_and_sets_usages() -> None:
    now = dt.datetime(2030, 6, 1, tzinfo=dt.UTC)
    ca = CertificateAuthority.create("c", lifetime=dt.timedelta(days=30), now=now)
    key = generate_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    cert = ca.issue(key.public_key(), subject, Usages(client_auth=True), dt.timedelta(days=365), now=now)
    assert cert.not_valid_before_utc == now - BACKDATE
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc  # never beyond the CA
    cert.verify_directly_issued_by(ca.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    server, _ = ca.issue_server(["127.0.0.1", "localhost", "localhost"])
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_ca_init_creates_the_key_directory_0700(tmp_path: Path) -> None:
    pki = tmp_path / "etc" / "pki"
    cp = subprocess.run([sys.executable, "-m", "tunneld", "ca", "init", "--cert", str(pki / "ca.crt"),
                         "--key", str(pki / "ca.key")], capture_output=True, text=True, timeout=60, umask=0o022)
    assert cp.returncode == 0, cp.stderr
    assert stat.S_IMODE(pki.stat().st_mode) == 0o700, "nobody but the owner may enter the CA's directory"
    assert stat.S_IMODE((pki / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((pki / "ssh_ca").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "etc").stat().st_mode) == 0o755, "only the directory holding the key"


def test_write_secret_keeps_an_existing_directory_as_it_is(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    write_secret(shared / "k", b"x")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755

"""Bootstrap client's local logic: CSR contents, issued-certificate checks, credential files, renewal times."""

from __future__ import annotations

import datetime as dt
import os
import random
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from certs.bootstrap import (
    CURRENT,
    BootstrapError,
    check_issued,
    current_certificate,
    generate_request,
    is_valid,
    lifetime,
    renewal_time,
    write_credentials,
    write_kubeconfig,
)
from certs.ca import CertificateAuthority, Usages, cert_pem
from certs.kubeconfig import KubeConfig


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def issue(ca: CertificateAuthority, key: object, cn: str, hours: float = 24) -> bytes:
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:nodes"),
                         x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = ca.issue(key.public_key(), subject, Usages(client_auth=True), dt.timedelta(hours=hours))  # type: ignore[attr-defined]
    return cert_pem(cert)


def test_request_names_the_node_in_system_nodes() -> None:
    key, pem = generate_request("node-7")
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:node-7"
    assert [a.value for a in csr.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["system:nodes"]
    assert len(csr.extensions) == 0, "no SANs or other extensions in a kubelet client CSR"
    assert key.curve.name == "secp256r1"
    assert csr.public_key() == key.public_key()


def test_check_issued(ca: CertificateAuthority) -> None:
    key, _ = generate_request("n1")
    good = issue(ca, key, "system:node:n1")
    assert check_issued(good, key, ca.pem, "n1").subject.rfc4514_string().startswith("CN=system:node:n1")
    other_key, _ = generate_request("n1")
    with pytest.raises(BootstrapError, match="another key"):
        check_issued(issue(ca, other_key, "system:node:n1"), key, ca.pem, "n1")
    with pytest.raises(BootstrapError, match="not system:node:n1"):
        check_issued(issue(ca, key, "system:node:n2"), key, ca.pem, "n1")
    with pytest.raises(BootstrapError, match="not signed by the cluster CA"):
        check_issued(issue(CertificateAuthority.create(), key, "system:node:n1"), key, ca.pem, "n1")
    with pytest.raises(BootstrapError, match="not PEM"):
        check_issued(b"junk", key, ca.pem, "n1")


def test_renewal_time_is_between_70_and_90_percent() -> None:
    rng = random.Random(7)
    times = [renewal_time(1000.0, 2000.0, rng) for _ in range(2000)]
    assert all(1700.0 <= t <= 1900.0 for t in times)
    assert min(times) < 1710 and max(times) > 1890, "jitter spreads over the whole window"
    assert len({round(t, 3) for t in times}) > 1900


def test_credentials_are_0600_and_current_is_switched_atomically(ca: CertificateAuthority, tmp_path: Path) -> None:
    cert_dir = tmp_path / "pki"
    paths = []
    for i in range(5):
        key, _ = generate_request("n1")
        current = write_credentials(cert_dir, issue(ca, key, "system:node:n1"), key, 1_700_000_000 + i)
        paths.append(os.readlink(current))
        target = cert_dir / os.readlink(current)
        assert stat.S_IMODE(target.stat().st_mode) == 0o600
        data = current.read_bytes()
        assert b"BEGIN CERTIFICATE" in data and b"PRIVATE KEY" in data
    assert current == cert_dir / CURRENT and current.is_symlink()
    assert paths[-1] == "kubelet-client-2023-11-14-22-13-24.pem"
    left = sorted(p.name for p in cert_dir.iterdir())
    assert left == sorted([CURRENT, *paths[-3:]]), "older credential files are pruned"
    assert stat.S_IMODE(cert_dir.stat().st_mode) == 0o700


def test_same_second_gets_a_new_file(ca: CertificateAuthority, tmp_path: Path) -> None:
    key, _ = generate_request("n1")
    first = os.readlink(write_credentials(tmp_path, issue(ca, key, "system:node:n1"), key, 1_700_000_000))
    second = os.readlink(write_credentials(tmp_path, issue(ca, key, "system:node:n1"), key, 1_700_000_000))
    assert first != second


def test_kubeconfig_points_at_the_credentials(ca: CertificateAuthority, tmp_path: Path) -> None:
    key, _ = generate_request("n1")
    pem = issue(ca, key, "system:node:n1", hours=1)
    creds = write_credentials(tmp_path / "pki", pem, key, 1_700_000_000)
    kc = tmp_path / "kubelet.conf"
    write_kubeconfig(kc, "https://127.0.0.1:6443", ca.pem, creds)
    assert stat.S_IMODE(kc.stat().st_mode) == 0o600
    cfg = KubeConfig.load(kc)
    cluster, user = cfg.current()
    assert cluster.certificate_authority_data == ca.pem
    assert user is not None and user.client_certificate == user.client_key == str(creds)
    found = current_certificate(kc)
    assert found is not None and cert_pem(found[0]) == pem
    start, end = lifetime(found[0])
    assert is_valid(found[0], start + 1) and not is_valid(found[0], end) and not is_valid(found[0], start - 1)
    assert current_certificate(tmp_path / "missing.conf") is None
    (tmp_path / "pki" / CURRENT).unlink()
    assert current_certificate(kc) is None

"""Discovery checks: token shape, CA pin computation and matching, cluster-info JWS and pin verification."""

from __future__ import annotations

import hashlib
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from certs import jws
from certs.apiclient import tls_context
from certs.ca import CertificateAuthority, cert_pem, key_pem, spki_pin
from certs.discovery import DiscoveryError, ca_cert_hash, parse_pin, pin_matches, split_token, verify_cluster_info
from certs.kubeconfig import KubeConfig, cluster_only

TOKEN = "abcdef.0123456789abcdef"
SERVER = "https://127.0.0.1:6443"


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def configmap(
    ca_pem: bytes, token: str = TOKEN, text: str | None = None, sign_with: str | None = None
) -> dict[str, Any]:
    text = text if text is not None else cluster_only(SERVER, ca_pem).dumps()
    tid, secret = (sign_with or token).split(".")
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "cluster-info", "namespace": "kube-public"},
        "data": {"kubeconfig": text, f"jws-kubeconfig-{tid}": jws.sign_detached(text.encode(), tid, secret)},
    }


def test_pin_is_sha256_of_spki_der(ca: CertificateAuthority, tmp_path: Path) -> None:
    der = ca.cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ca_cert_hash(ca.pem) == "sha256:" + hashlib.sha256(der).hexdigest()
    assert ca_cert_hash(ca.cert) == spki_pin(ca.cert) == ca.pin  # the server side computes the same pin
    # The recipe kubeadm documents: openssl x509 -pubkey | openssl rsa/ec -pubin -outform der | sha256sum.
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    pub = subprocess.run(["openssl", "x509", "-pubkey", "-noout", "-in", str(tmp_path / "ca.crt")],
                         capture_output=True, check=True, timeout=30).stdout
    der2 = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "der"], input=pub, capture_output=True,
                          check=True, timeout=30).stdout
    assert ca_cert_hash(ca.pem) == "sha256:" + hashlib.sha256(der2).hexdigest()


def test_parse_pin_and_token() -> None:
    h = "A" * 64
    assert parse_pin(f"sha256:{h}") == "sha256:" + "a" * 64
    for bad in ("a" * 64, "sha1:" + "a" * 40, "sha256:" + "a" * 63, "sha256:" + "g" * 64):
        with pytest.raises(DiscoveryError, match="invalid CA pin"):
            parse_pin(bad)
    assert split_token(TOKEN) == ("abcdef", "0123456789abcdef")
    for bad in ("ABCDEF.0123456789abcdef", "abcde.0123456789abcdef", "abcdef0123456789abcdef", ""):
        with pytest.raises(DiscoveryError, match="bootstrap token"):
            split_token(bad)


def test_pin_matches_any_certificate_of_a_bundle(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create()
    assert pin_matches(other.pem + ca.pem, [ca.pin])
    assert not pin_matches(other.pem, [ca.pin])
    assert not pin_matches(b"junk", [ca.pin])


def test_verified_cluster_info(ca: CertificateAuthority) -> None:
    info = verify_cluster_info(configmap(ca.pem), TOKEN, [ca.pin], SERVER + "/")
    assert info.ca_pem == ca.pem and info.server == SERVER
    boot = KubeConfig.loads(info.bootstrap_kubeconfig(TOKEN).dumps())
    cluster, user = boot.current()
    assert cluster.server == SERVER and cluster.certificate_authority_data == ca.pem
    assert user is not None and user.token == TOKEN


def test_wrong_pin_is_refused(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create()
    with pytest.raises(DiscoveryError) as exc:
        verify_cluster_info(configmap(ca.pem), TOKEN, [other.pin], SERVER)
    assert "does not match the pin" in str(exc.value) and ca.pin in str(exc.value) and other.pin in str(exc.value)


def test_signature_by_another_secret_is_refused(ca: CertificateAuthority) -> None:
    forged = configmap(ca.pem, sign_with="abcdef.ffffffffffffffff")  # same id, secret unknown to the attacker
    with pytest.raises(DiscoveryError, match="does not verify"):
        verify_cluster_info(forged, TOKEN, [ca.pin], SERVER)


def test_missing_signature_for_token_id(ca: CertificateAuthority) -> None:
    cm = configmap(ca.pem, sign_with="zzzzzz.0123456789abcdef")
    with pytest.raises(DiscoveryError, match="no signature for token ID 'abcdef'"):
        verify_cluster_info(cm, TOKEN, [ca.pin], SERVER)


def test_kubeconfig_swapped_after_signing_is_refused(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.create()
    cm = configmap(ca.pem)
    cm["data"]["kubeconfig"] = cluster_only(SERVER, other.pem).dumps()
    with pytest.raises(DiscoveryError, match="does not verify"):
        verify_cluster_info(cm, TOKEN, [other.pin], SERVER)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda cm, pem: cm.pop("data"), "no data"),
        (lambda cm, pem: cm["data"].pop("kubeconfig"), "no kubeconfig"),
    ],
)
def test_malformed_configmaps(ca: CertificateAuthority, mutate: Any, message: str) -> None:
    cm = configmap(ca.pem)
    mutate(cm, ca.pem)
    with pytest.raises(DiscoveryError, match=message):
        verify_cluster_info(cm, TOKEN, [ca.pin], SERVER)


def test_signed_kubeconfig_without_ca_or_with_two_clusters(ca: CertificateAuthority) -> None:
    no_ca = "apiVersion: v1\nkind: Config\nclusters:\n- name: ''\n  cluster: {server: 'https://x'}\n"
    with pytest.raises(DiscoveryError, match="no certificate-authority-data"):
        verify_cluster_info(configmap(ca.pem, text=no_ca), TOKEN, [ca.pin], SERVER)
    two = no_ca + "- name: b\n  cluster: {server: 'https://y'}\n"
    with pytest.raises(DiscoveryError, match="exactly one cluster"):
        verify_cluster_info(configmap(ca.pem, text=two), TOKEN, [ca.pin], SERVER)
    with pytest.raises(DiscoveryError, match="at least one CA pin"):
        verify_cluster_info(configmap(ca.pem), TOKEN, [], SERVER)


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext, name: str) -> None:
    """A TLS handshake in memory (no sockets); raises ssl.SSLError when the client refuses the server."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=name)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        done = 0
        for side in (c, s):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            return
    raise AssertionError("the handshake did not finish")


def test_bundle_with_pinned_and_unpinned_ca_keeps_only_the_pinned(ca: CertificateAuthority, tmp_path: Path) -> None:
    intruder = CertificateAuthority.create("intruder")
    for bundle in (intruder.pem + ca.pem, ca.pem + intruder.pem, ca.pem + intruder.pem + ca.pem):
        info = verify_cluster_info(configmap(bundle), TOKEN, [ca.pin], SERVER)
        assert info.ca_pem == ca.pem, "only the pinned CA is trusted"
        boot = KubeConfig.loads(info.bootstrap_kubeconfig(TOKEN).dumps())
        assert boot.current()[0].certificate_authority_data == ca.pem
    # What the node then uses for TLS refuses a server certificate from the unpinned CA, accepts the pinned one.
    client = tls_context(info.ca_pem)
    for issuer, ok in ((intruder, False), (ca, True)):
        cert, key = issuer.issue_server(["127.0.0.1"])
        (tmp_path / "s.crt").write_bytes(cert_pem(cert))
        (tmp_path / "s.key").write_bytes(key_pem(key))
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(tmp_path / "s.crt", tmp_path / "s.key")
        if ok:
            _handshake(client, server, "127.0.0.1")
        else:
            with pytest.raises(ssl.SSLCertVerificationError):
                _handshake(client, server, "127.0.0.1")
    # Both pinned (a CA rotation): both kept.
    both = verify_cluster_info(configmap(intruder.pem + ca.pem), TOKEN, [ca.pin, intruder.pin], SERVER)
    assert both.ca_pem == intruder.pem + ca.pem

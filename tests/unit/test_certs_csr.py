"""CSR object model, condition rules and signer rules, with real PKCS#10 requests and a real CA."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.ca import BACKDATE, CertificateAuthority
from certs.csr import CSR, ConditionConflict, CSRInvalid, from_request_body
from certs.signers import (
    APISERVER_CLIENT,
    KUBELET_SERVING,
    NodeInventory,
    SignerRuleError,
    check,
    sign,
)
from certs.tokens import Identity
from tests.certs_util import body, make_csr, make_request, rsa_key

BOOT = Identity("system:bootstrap:abcdef", "", ("system:bootstrappers",), method="bootstrap", token_id="abcdef")
INV = NodeInventory.of([("node-1", ["192.0.2.11", "node-1.example.com"]), ("node-2", ["192.0.2.12"])])
NOW = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def test_body_identity_fields_ignored_and_generate_name() -> None:
    pem, _ = make_request("system:node:node-1")
    b = body(pem, username="admin", groups=["system:masters"], uid="0")
    csr = from_request_body(b, BOOT)
    assert (csr.username, csr.groups, csr.uid) == ("system:bootstrap:abcdef", ("system:bootstrappers",), "")
    assert csr.name.startswith("csr-") and len(csr.name) == 9
    assert csr.requester_token_id == "abcdef" and csr.state == "Pending"
    again = CSR.from_record(csr.to_record(), "7")
    assert again.to_dict()["spec"] == csr.to_dict()["spec"] and again.resource_version == "7"
    assert again.requester_token_id == "abcdef"


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda b: b["spec"].update(request="!!notbase64"), "spec.request: not valid base64"),
    (lambda b: b["spec"].update(request="aGVsbG8="), "spec.request: not a PEM"),
    (lambda b: b["spec"].pop("signerName"), "spec.signerName: required"),
    (lambda b: b["spec"].update(usages=[]), "spec.usages: required"),
    (lambda b: b["spec"].update(usages=["root access"]), "unknown usage"),
    (lambda b: b["spec"].update(expirationSeconds=599), "may not be less than 600"),
    (lambda b: b["spec"].update(expirationSeconds=2**31), "may not be more than 2147483647"),
    (lambda b: b["spec"].update(expirationSeconds=10**30), "may not be more than 2147483647"),
    (lambda b: b["spec"].update(expirationSeconds=True), "must be an integer, not bool"),
    (lambda b: b["spec"].update(expirationSeconds=3600.0), "must be an integer, not float"),
    (lambda b: b.update(metadata={"name": "Bad_Name"}), "not a valid name"),
    (lambda b: b.update(metadata={}), "name or generateName"),
])
def test_invalid_bodies(mutate, message: str) -> None:
    pem, _ = make_request("system:node:node-1")
    b = body(pem)
    mutate(b)
    with pytest.raises(CSRInvalid, match=message):
        from_request_body(b, BOOT)


def test_tampered_request_signature_is_invalid() -> None:
    pem, _ = make_request("system:node:node-1")
    der_lines = pem.decode().splitlines()
    # Flip one character inside the base64 of the signature (near the end of the PEM body).
    line = der_lines[-2]
    der_lines[-2] = line[:-3] + ("A" if line[-3] != "A" else "B") + line[-2:]
    with pytest.raises(CSRInvalid):
        from_request_body(body("\n".join(der_lines).encode() + b"\n"), BOOT)


def test_condition_rules() -> None:
    csr = make_csr(BOOT)
    csr.add_condition("Approved", "AdminApproved", "ok")
    assert csr.state == "Approved"
    with pytest.raises(ConditionConflict, match="exclude each other"):
        csr.add_condition("Denied", "No", "no")
    with pytest.raises(ConditionConflict, match="already has"):
        csr.add_condition("Approved", "Again", "again")
    csr.set_certificate(b"PEM")
    assert csr.state == "Issued"
    with pytest.raises(ConditionConflict, match="already issued"):
        csr.set_certificate(b"PEM2")
    denied = make_csr(BOOT)
    denied.add_condition("Denied", "No", "no")
    with pytest.raises(ConditionConflict, match="only be issued for an approved"):
        denied.set_certificate(b"PEM")
    failed = make_csr(BOOT)
    failed.add_condition("Approved", "A", "a")
    failed.add_condition("Failed", "SignerRules", "broken")
    assert failed.state == "Failed" and [c.type for c in failed.conditions] == ["Approved", "Failed"]
    with pytest.raises(ConditionConflict):
        failed.set_certificate(b"PEM")


def _cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def test_kubelet_client_issued_with_subject_usages_and_default_lifetime() -> None:
    ca = CertificateAuthority.create("c", now=NOW)
    csr = make_csr(BOOT)
    cert = _cert(sign(ca, csr, INV, now=NOW))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:node:node-1"
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)] == ["system:nodes"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment
    assert cert.not_valid_before_utc == NOW - BACKDATE
    assert cert.not_valid_after_utc == NOW + dt.timedelta(days=365)
    cert.verify_directly_issued_by(ca.cert)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_expiration_seconds_honoured() -> None:
    ca = CertificateAuthority.create("c", now=NOW)
    short = _cert(sign(ca, make_csr(BOOT, expiration=600), INV, now=NOW))
    assert short.not_valid_after_utc == NOW + dt.timedelta(seconds=600)
    week = _cert(sign(ca, make_csr(BOOT, expiration=7 * 86400), INV, now=NOW))
    assert week.not_valid_after_utc == NOW + dt.timedelta(days=7)
    capped = _cert(sign(ca, make_csr(BOOT, expiration=10 * 365 * 86400), INV, now=NOW))
    assert capped.not_valid_after_utc == NOW + dt.timedelta(days=365)
    # A stored value the API refuses today (an older version accepted it) is clamped, never an OverflowError.
    planted = make_csr(BOOT)
    planted.expiration_seconds = 10**30
    assert _cert(sign(ca, planted, INV, now=NOW)).not_valid_after_utc == NOW + dt.timedelta(days=365)


def test_lifetime_never_beyond_the_ca() -> None:
    ca = CertificateAuthority.create("c", lifetime=dt.timedelta(days=30), now=NOW)
    cert = _cert(sign(ca, make_csr(BOOT, expiration=2**31 - 1), INV, now=NOW + dt.timedelta(days=10)))
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"orgs": ("system:masters",)}, "organization exactly 'system:nodes', got system:masters"),
    ({"orgs": ("system:nodes", "system:masters")}, "organization exactly"),
    ({"cn": "admin"}, "common name system:node:<name>"),
    ({"dns": ("node-1",)}, "does not allow subject alternative names"),
    ({"usages": ("digital signature", "client auth", "server auth")}, "does not allow usages server auth"),
    ({"usages": ("digital signature",)}, "missing client auth"),
    ({"usages": ("digital signature", "key encipherment", "client auth")}, "only allowed for RSA"),
    ({"signer": "example.com/custom"}, "unknown signer"),
])
def test_kubelet_client_rule_violations(kwargs: dict, message: str) -> None:
    csr = make_csr(BOOT, **kwargs)
    with pytest.raises(SignerRuleError, match=message):
        check(csr, INV)


def test_rsa_key_encipherment_allowed() -> None:
    ca = CertificateAuthority.create("c", now=NOW)
    csr = make_csr(BOOT, usages=("digital signature", "key encipherment", "client auth"), key=rsa_key())
    cert = _cert(sign(ca, csr, INV, now=NOW))
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


def test_serving_sans_checked_against_inventory() -> None:
    ca = CertificateAuthority.create("c", now=NOW)
    node = Identity("system:node:node-1", groups=("system:nodes",), method="cert")
    usages = ("digital signature", "server auth")
    ok = make_csr(node, signer=KUBELET_SERVING, usages=usages, dns=("node-1", "NODE-1.example.com."),
                  ips=("192.0.2.11",))
    cert = _cert(sign(ca, ok, INV, now=NOW))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.11"]
    extra = make_csr(node, signer=KUBELET_SERVING, usages=usages, dns=("node-1", "evil.example.com"))
    with pytest.raises(SignerRuleError, match=r"evil\.example\.com are not among node 'node-1'"):
        check(extra, INV)
    other_ip = make_csr(node, signer=KUBELET_SERVING, usages=usages, ips=("192.0.2.12",))
    with pytest.raises(SignerRuleError, match=r"192\.0\.2\.12"):
        check(other_ip, INV)
    none = make_csr(node, signer=KUBELET_SERVING, usages=usages)
    with pytest.raises(SignerRuleError, match="requires at least one DNS or IP"):
        check(none, INV)
    unknown = make_csr(node, cn="system:node:node-9", signer=KUBELET_SERVING, usages=usages, dns=("node-9",))
    with pytest.raises(SignerRuleError, match="not in the inventory"):
        check(unknown, INV)


def test_apiserver_client_rules() -> None:
    admin = Identity("admin", groups=("system:masters",))
    ok = make_csr(admin, cn="jane", orgs=("devs",), signer=APISERVER_CLIENT, usages=("client auth",))
    assert check(ok, INV).common_name == "jane"
    server = make_csr(admin, cn="jane", orgs=(), signer=APISERVER_CLIENT, usages=("client auth", "server auth"))
    with pytest.raises(SignerRuleError, match="server auth"):
        check(server, INV)
    nameless = make_csr(admin, cn="", orgs=("devs",), signer=APISERVER_CLIENT, usages=("client auth",))
    with pytest.raises(SignerRuleError, match="requires a common name"):
        check(nameless, INV)

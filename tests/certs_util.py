"""Helpers for certs tests: build real PKCS#10 requests and CSR objects."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from certs.csr import CSR, from_request_body
from certs.tokens import Identity


def make_request(cn: str, orgs: Iterable[str] = ("system:nodes",), dns: Iterable[str] = (),
                 ips: Iterable[str] = (), key: object | None = None) -> tuple[bytes, object]:
    """A PEM CSR and its private key."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    if cn:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attrs))
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    req = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    return req.public_bytes(serialization.Encoding.PEM), key


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def body(pem: bytes, signer: str = "kubernetes.io/kube-apiserver-client-kubelet",
         usages: Iterable[str] = ("digital signature", "client auth"), name: str | None = None,
         expiration: int | None = None, **spec_extra: object) -> dict:
    """A POST body in the certificates.k8s.io/v1 shape."""
    meta = {"name": name} if name else {"generateName": "csr-"}
    spec: dict = {"request": base64.b64encode(pem).decode(), "signerName": signer, "usages": list(usages)}
    if expiration is not None:
        spec["expirationSeconds"] = expiration
    spec.update(spec_extra)
    return {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest", "metadata": meta,
            "spec": spec}


def make_csr(caller: Identity, cn: str = "system:node:node-1", orgs: Iterable[str] = ("system:nodes",),
             signer: str = "kubernetes.io/kube-apiserver-client-kubelet",
             usages: Iterable[str] = ("digital signature", "client auth"), dns: Iterable[str] = (),
             ips: Iterable[str] = (), name: str | None = None, expiration: int | None = None,
             key: object | None = None) -> CSR:
    pem, _ = make_request(cn, orgs, dns, ips, key)
    return from_request_body(body(pem, signer, usages, name, expiration), caller)

"""The cluster's X.509 certificate authority: create, load from PEM files, issue leaf certificates, SPKI pins.

Like kube-controller-manager's ``--cluster-signing-cert-file``/``--cluster-signing-key-file``, the CA is a
certificate and a private key in two PEM files; the key file is written 0600 and never overwritten unless forced.
Leaf certificates are never valid beyond the CA itself, and their NotBefore is backdated to tolerate clock skew.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from certs.files import read_limited, refuse_overwrite, write_public, write_secret

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

BACKDATE = dt.timedelta(minutes=5)
DEFAULT_CA_LIFETIME = dt.timedelta(days=3650)


class CAError(Exception):
    """The CA files are missing, unreadable or do not belong together."""


def generate_key(kind: str = "ecdsa", rsa_bits: int = 2048) -> PrivateKey:
    """A new private key: ECDSA P-256 (default) or RSA."""
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    raise ValueError(f"unknown key type {kind!r} (ecdsa or rsa)")


def key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM of a private key, unencrypted (protect it with file permissions)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def spki_pin(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's SubjectPublicKeyInfo (kubeadm's ``--discovery-token-ca-cert-hash``)."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def _hash_for(key: PrivateKey) -> hashes.SHA256:
    return hashes.SHA256()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Usages:
    """What an issued certificate may be used for."""

    client_auth: bool = False
    server_auth: bool = False
    key_encipherment: bool = False


@dataclass
class CertificateAuthority:
    """A CA certificate with its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @classmethod
    def create(cls, common_name: str = "tunneld-ca", key_type: str = "ecdsa",
               lifetime: dt.timedelta = DEFAULT_CA_LIFETIME, now: dt.datetime | None = None) -> CertificateAuthority:
        """A new self-signed CA (basic constraints CA, path length 0, key usage cert/CRL sign)."""
        key = generate_key(key_type)
        now = now or _now()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, _hash_for(key))
        )
        return cls(cert, key)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Load a CA from PEM files; raises :class:`CAError` with the file name on any problem."""
        try:
            cert = x509.load_pem_x509_certificate(read_limited(cert_path))
        except (OSError, ValueError) as exc:
            raise CAError(f"{cert_path}: cannot load the CA certificate: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(read_limited(key_path), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise CAError(f"{key_path}: cannot load the CA key: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CAError(f"{key_path}: only ECDSA and RSA CA keys are supported")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, pub) != cert.public_key().public_bytes(
                serialization.Encoding.DER, pub):
            raise CAError(f"{key_path}: the key does not belong to the certificate {cert_path}")
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise CAError(f"{cert_path}: not a CA certificate (basic constraints CA:TRUE missing)")
        return cls(cert, key)

    def save(self, cert_path: Path, key_path: Path, force: bool = False) -> None:
        """Write the key (0600) and certificate atomically; existing files are kept unless ``force``."""
        refuse_overwrite([Path(cert_path), Path(key_path)], force)
        write_secret(Path(key_path), key_pem(self.key))
        write_public(Path(cert_path), cert_pem(self.cert))

    @property
    def pem(self) -> bytes:
        """The CA certificate as PEM."""
        return cert_pem(self.cert)

    @property
    def pin(self) -> str:
        """The CA's SPKI pin ``sha256:<hex>``."""
        return spki_pin(self.cert)

    def issue(
        self,
        public_key: PublicKey,
        subject: x509.Name,
        usages: Usages,
        lifetime: dt.timedelta,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
        now: dt.datetime | None = None,
    ) -> x509.Certificate:
        """Sign a leaf certificate: NotBefore backdated by :data:`BACKDATE`, NotAfter capped at the CA's own."""
        now = now or _now()
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        ekus = [oid for flag, oid in ((usages.client_auth, ExtendedKeyUsageOID.CLIENT_AUTH),
                                      (usages.server_auth, ExtendedKeyUsageOID.SERVER_AUTH)) if flag]
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1 or 1)
            .not_valid_before(now - BACKDATE).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=usages.key_encipherment, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
        )
        if ekus:
            builder = builder.add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ip) for ip in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, _hash_for(self.key))

    def issue_server(self, names: Iterable[str], lifetime: dt.timedelta = dt.timedelta(days=365),
                     common_name: str = "tunneld-api") -> tuple[x509.Certificate, PrivateKey]:
        """A fresh key and a server certificate for ``names`` (host names and/or IP addresses)."""
        key = generate_key("ecdsa")
        dns: list[str] = []
        ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for name in dict.fromkeys(names):
            try:
                ips.append(ipaddress.ip_address(name))
            except ValueError:
                dns.append(name)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = self.issue(key.public_key(), subject, Usages(server_auth=True), lifetime, dns, ips)
        return cert, key

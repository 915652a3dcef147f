"""The key of a node's certificate request in flight, kept on disk so that a retry asks for the same certificate.

``tunneld bootstrap`` writes the key (0600, atomically) *before* it sends the CSR, and names the CSR after the key
(``node-csr-`` and the first 40 hex digits of the SHA-256 of the public key: one DNS label, as names must be). If
the answer never arrives (a client-side timeout while the server went on to approve and issue), the next run loads
the same key, sends the same name, gets 409 AlreadyExists and simply waits on the existing CSR: the node receives
the certificate that was issued instead of a denial for a node that "already has a valid client certificate". The
file is removed once a certificate is written, or when the request was definitely refused (denied, failed), so
that the next request starts afresh.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.files import read_limited, write_secret

PENDING = "kubelet-client-pending.key"


def csr_name(key: ec.EllipticCurvePrivateKey) -> str:
    """The CSR name for ``key``: ``node-csr-`` and 160 bits (40 hex digits) of the SHA-256 of its
    SubjectPublicKeyInfo; 49 characters, within a DNS label's 63."""
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    return "node-csr-" + hashlib.sha256(spki).hexdigest()[:40]


def pending_key(cert_dir: Path) -> ec.EllipticCurvePrivateKey:
    """The key of the request in flight: loaded if a previous run left one, else generated and written first."""
    path = cert_dir / PENDING
    if path.exists():
        try:
            key = serialization.load_pem_private_key(read_limited(path), password=None)
        except (OSError, ValueError, TypeError):
            key = None
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            return key
    key = ec.generate_private_key(ec.SECP256R1())
    cert_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_secret(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return key


def forget_pending(cert_dir: Path) -> None:
    """The request is settled (certificate written, or refused for good): the next one uses a new key."""
    (cert_dir / PENDING).unlink(missing_ok=True)

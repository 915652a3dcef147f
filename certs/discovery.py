"""Bootstrap-token discovery with a CA pin, as ``kubeadm join --discovery-token-ca-cert-hash`` does it.

A new node knows three things: the API server's URL, a bootstrap token ``<id>.<secret>`` and one or more pins
``sha256:<hex>`` (SHA-256 of the cluster CA certificate's DER SubjectPublicKeyInfo). It does not know the CA yet, so:

1. fetch ``kube-public/cluster-info`` **without** verifying TLS (anyone in the middle could answer);
2. take ``data["jws-kubeconfig-<id>"]`` and check it is a detached JWS of ``data["kubeconfig"]`` keyed with the token
   secret: only someone who knows the token could have produced it (this authenticates the *content*);
3. parse that kubeconfig (exactly one cluster) and take its CA; one of the CA certificates must match a pin (this
   protects against the token itself being known to an attacker who then serves their own CA), and only the CA
   certificates that match a pin are kept: a bundle may carry other CAs besides, but the node never trusts them;
4. fetch ``cluster-info`` again, this time verifying TLS against the pinned CAs, and require the same kubeconfig.

Only then are the pinned CAs trusted, and a bootstrap kubeconfig (server URL as given, those CAs, the token) is built.
Every failure is a :class:`DiscoveryError` whose message says which check failed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certs import jws
from certs.apiclient import APIClient, APIError, APIUnavailable, tls_context
from certs.kubeconfig import KubeConfig, KubeconfigError, with_token

TOKEN_RE = re.compile(r"([a-z0-9]{6})\.([a-z0-9]{16})")
PIN_RE = re.compile(r"sha256:([0-9a-fA-F]{64})")
KUBECONFIG_KEY = "kubeconfig"
JWS_KEY_PREFIX = "jws-kubeconfig-"


class DiscoveryError(Exception):
    """Discovery refused to trust what the server sent (or could not fetch it)."""


def split_token(token: str) -> tuple[str, str]:
    """``(id, secret)`` of a bootstrap token ``[a-z0-9]{6}.[a-z0-9]{16}``."""
    m = TOKEN_RE.fullmatch(token.strip())
    if m is None:
        raise DiscoveryError("the bootstrap token must look like [a-z0-9]{6}.[a-z0-9]{16}")
    return m.group(1), m.group(2)


def parse_pin(text: str) -> str:
    """Normalise a CA pin to ``sha256:<lower-case hex>``; only SHA-256 pins are accepted."""
    m = PIN_RE.fullmatch(text.strip())
    if m is None:
        raise DiscoveryError(f"invalid CA pin {text!r}: expected sha256:<64 hex digits>")
    return "sha256:" + m.group(1).lower()


def ca_cert_hash(cert: x509.Certificate | bytes) -> str:
    """The pin of a certificate (object or PEM): ``sha256:`` + hex SHA-256 of its DER SubjectPublicKeyInfo."""
    if isinstance(cert, bytes):
        cert = x509.load_pem_x509_certificate(cert)
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "sha256:" + hashlib.sha256(spki).hexdigest()


def pinned_certificates(ca_pem: bytes, pins: Iterable[str]) -> list[x509.Certificate]:
    """The certificates of the PEM bundle ``ca_pem`` whose pin is one of ``pins`` (compared in constant time),
    without duplicates; empty when none matches or the bundle cannot be read."""
    try:
        certs = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return []
    wanted = [parse_pin(p).encode() for p in pins]
    kept: dict[bytes, x509.Certificate] = {}
    for cert in certs:
        have = ca_cert_hash(cert).encode()
        matched = False
        for w in wanted:
            matched |= hmac.compare_digest(have, w)
        if matched:
            kept.setdefault(cert.public_bytes(serialization.Encoding.DER), cert)
    return list(kept.values())


def pin_matches(ca_pem: bytes, pins: Iterable[str]) -> bool:
    """True if any certificate in the PEM bundle ``ca_pem`` has one of ``pins`` (compared in constant time)."""
    return bool(pinned_certificates(ca_pem, pins))


@dataclass(frozen=True)
class ClusterInfo:
    """What verified discovery yields: the server URL to use and the CA to trust."""

    server: str
    ca_pem: bytes
    """Only the CA certificates that match a pin."""
    kubeconfig_text: str

    def bootstrap_kubeconfig(self, token: str) -> KubeConfig:
        """The bootstrap kubeconfig: this cluster, its CA, and the bootstrap token as bearer credential."""
        return with_token(self.server, self.ca_pem, token)


def verify_cluster_info(configmap: Any, token: str, pins: Sequence[str], server: str) -> ClusterInfo:
    """Checks 2 and 3 above on an already fetched ConfigMap (pure; no I/O)."""
    if not pins:
        raise DiscoveryError("at least one CA pin (--ca-cert-hash sha256:...) is required")
    token_id, secret = split_token(token)
    data = configmap.get("data") if isinstance(configmap, dict) else None
    if not isinstance(data, dict):
        raise DiscoveryError("cluster-info has no data")
    text = data.get(KUBECONFIG_KEY)
    if not isinstance(text, str) or not text:
        raise DiscoveryError("cluster-info has no kubeconfig")
    signature = data.get(JWS_KEY_PREFIX + token_id)
    if not isinstance(signature, str):
        raise DiscoveryError(
            f"cluster-info has no signature for token ID {token_id!r}: the token is unknown, expired, or not "
            "allowed to sign (usage 'signing')"
        )
    if not jws.verify_detached(signature, text.encode("utf-8"), token_id, secret):
        raise DiscoveryError(
            f"the cluster-info signature for token ID {token_id!r} does not verify with this token's secret: "
            "the server does not know this token (or someone is impersonating it)"
        )
    try:
        cfg = KubeConfig.loads(text)
    except KubeconfigError as exc:
        raise DiscoveryError(f"the cluster-info kubeconfig is invalid: {exc}") from exc
    if len(cfg.clusters) != 1:
        raise DiscoveryError(f"the cluster-info kubeconfig must have exactly one cluster, not {len(cfg.clusters)}")
    ca_pem = cfg.clusters[0].certificate_authority_data
    if not ca_pem:
        raise DiscoveryError("the cluster-info kubeconfig carries no certificate-authority-data")
    try:
        found = sorted({ca_cert_hash(c) for c in x509.load_pem_x509_certificates(ca_pem)})
    except ValueError as exc:
        raise DiscoveryError(f"the cluster CA in cluster-info is not a PEM certificate: {exc}") from exc
    pinned = pinned_certificates(ca_pem, pins)
    if not pinned:
        raise DiscoveryError(
            f"the cluster CA does not match the pin: cluster-info carries a CA with hash {', '.join(found)}, "
            f"expected {', '.join(parse_pin(p) for p in pins)}. Refusing to trust it."
        )
    # Trust only what the pins name: any other CA in the bundle is dropped, never written to the node's kubeconfig.
    trusted = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in pinned)
    return ClusterInfo(server.rstrip("/"), trusted, text)


async def discover(server: str, token: str, pins: Sequence[str], timeout: float = 30.0) -> ClusterInfo:
    """Run the whole discovery against ``server`` (checks 1-4); raises :class:`DiscoveryError`."""
    for p in pins:
        parse_pin(p)
    split_token(token)
    try:
        async with APIClient(server, tls_context(None), timeout=timeout) as insecure:
            first = await insecure.cluster_info()
        info = verify_cluster_info(first, token, pins, server)
        async with APIClient(server, tls_context(info.ca_pem), timeout=timeout) as secure:
            second = await secure.cluster_info()
    except (APIError, APIUnavailable) as exc:
        raise DiscoveryError(f"cannot fetch cluster-info from {server}: {exc}") from exc
    except ValueError as exc:  # a malformed URL
        raise DiscoveryError(str(exc)) from exc
    if second.get("data", {}).get(KUBECONFIG_KEY) != info.kubeconfig_text:
        raise DiscoveryError("cluster-info changed between the unverified and the verified fetch; refusing it")
    return info

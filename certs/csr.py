"""The CertificateSigningRequest object (``certificates.k8s.io/v1`` JSON shape) and its condition rules.

A CSR moves through these states, derived from its conditions and certificate::

    Pending --Approved--> Approved --certificate set--> Issued
       |  \\                 \\
       |   Denied             Failed (the signer refused: rules broken)
       Failed (rules broken, found before any decision)

Rules, as Kubernetes has them: conditions are never removed; ``Approved`` and ``Denied`` exclude each other; each
type appears at most once; ``status.certificate`` may only be set on an Approved CSR that has not Failed.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import secrets
import string
import uuid
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from certs.tokens import Identity
from netnames import is_dns_subdomain

APPROVED, DENIED, FAILED = "Approved", "Denied", "Failed"
CONDITION_TYPES = (APPROVED, DENIED, FAILED)
MAX_REQUEST_PEM = 64 * 1024
MIN_EXPIRATION_SECONDS = 600
MAX_EXPIRATION_SECONDS = 2**31 - 1
"""Kubernetes' bounds for ``spec.expirationSeconds`` (an int32 of at least 10 minutes)."""

KNOWN_USAGES = frozenset({
    "signing", "digital signature", "content commitment", "key encipherment", "key agreement", "data encipherment",
    "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth", "client auth", "code signing",
    "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
    "microsoft sgc", "netscape sgc",
})


class CSRInvalid(ValueError):
    """The request body is not an acceptable CSR (HTTP 422)."""


class ConditionConflict(ValueError):
    """A decision breaks the condition rules (already decided, removal, both Approved and Denied) (HTTP 409)."""


def now_rfc3339(now: dt.datetime | None = None) -> str:
    """Kubernetes-style timestamp: ``2024-01-02T03:04:05Z``."""
    now = now or dt.datetime.now(dt.UTC)
    return now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Condition:
    """One entry of ``status.conditions``."""

    type: str
    reason: str
    message: str
    last_update_time: str
    last_transition_time: str
    status: str = "True"

    def to_dict(self) -> dict[str, str]:
        """The JSON shape."""
        return {"type": self.type, "status": self.status, "reason": self.reason, "message": self.message,
                "lastUpdateTime": self.last_update_time, "lastTransitionTime": self.last_transition_time}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Condition:
        """Inverse of :meth:`to_dict`."""
        return cls(type=str(d.get("type", "")), reason=str(d.get("reason", "")), message=str(d.get("message", "")),
                   last_update_time=str(d.get("lastUpdateTime", "")),
                   last_transition_time=str(d.get("lastTransitionTime", "")), status=str(d.get("status", "True")))


@dataclass
class CSR:
    """A CertificateSigningRequest."""

    name: str
    request: bytes
    """The PEM-encoded PKCS#10 request."""
    signer_name: str
    usages: tuple[str, ...]
    username: str
    groups: tuple[str, ...] = ()
    uid: str = ""
    expiration_seconds: int | None = None
    metadata_uid: str = field(default_factory=lambda: str(uuid.uuid4()))
    creation_timestamp: str = field(default_factory=now_rfc3339)
    resource_version: str = ""
    conditions: list[Condition] = field(default_factory=list)
    certificate: bytes | None = None
    requester_token_id: str | None = None
    """Which bootstrap token (id only) created this CSR; used by node binding. Not part of the k8s shape."""
    requester_node: str | None = None
    """The node the requester is bound to (per-node token or node certificate), if any."""

    def condition(self, kind: str) -> Condition | None:
        """The condition of type ``kind``, if present."""
        return next((c for c in self.conditions if c.type == kind), None)

    @property
    def state(self) -> str:
        """``Pending``, ``Approved``, ``Issued``, ``Denied`` or ``Failed``."""
        if self.condition(FAILED):
            return FAILED
        if self.condition(DENIED):
            return DENIED
        if self.condition(APPROVED):
            return "Issued" if self.certificate else APPROVED
        return "Pending"

    def parsed(self) -> x509.CertificateSigningRequest:
        """The PKCS#10 request (signature already checked at creation)."""
        return x509.load_pem_x509_csr(self.request)

    def add_condition(self, kind: str, reason: str, message: str, now: dt.datetime | None = None) -> Condition:
        """Add a condition, enforcing the rules; raises :class:`ConditionConflict`."""
        if kind not in CONDITION_TYPES:
            raise ConditionConflict(f"unknown condition type {kind!r}")
        if self.condition(kind):
            raise ConditionConflict(f"{self.name} already has a {kind} condition")
        if kind == APPROVED and self.condition(DENIED):
            raise ConditionConflict(f"{self.name} is already denied; Approved and Denied exclude each other")
        if kind == DENIED and self.condition(APPROVED):
            raise ConditionConflict(f"{self.name} is already approved; Approved and Denied exclude each other")
        ts = now_rfc3339(now)
        cond = Condition(kind, reason, message, ts, ts)
        self.conditions.append(cond)
        return cond

    def set_certificate(self, pem: bytes) -> None:
        """Attach the issued certificate; only for an approved CSR that has not failed or been denied."""
        if not self.condition(APPROVED) or self.condition(FAILED) or self.condition(DENIED):
            raise ConditionConflict(f"{self.name}: a certificate can only be issued for an approved CSR")
        if self.certificate is not None:
            raise ConditionConflict(f"{self.name}: the certificate is already issued")
        self.certificate = pem

    def to_dict(self) -> dict[str, Any]:
        """The ``certificates.k8s.io/v1`` JSON object."""
        spec: dict[str, Any] = {
            "request": base64.b64encode(self.request).decode(), "signerName": self.signer_name,
            "usages": list(self.usages), "username": self.username, "groups": list(self.groups),
        }
        if self.uid:
            spec["uid"] = self.uid
        if self.expiration_seconds is not None:
            spec["expirationSeconds"] = self.expiration_seconds
        status: dict[str, Any] = {}
        if self.conditions:
            status["conditions"] = [c.to_dict() for c in self.conditions]
        if self.certificate is not None:
            status["certificate"] = base64.b64encode(self.certificate).decode()
        meta: dict[str, Any] = {"name": self.name, "uid": self.metadata_uid,
                                "creationTimestamp": self.creation_timestamp}
        if self.resource_version:
            meta["resourceVersion"] = self.resource_version
        return {"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest", "metadata": meta,
                "spec": spec, "status": status}

    def to_record(self) -> dict[str, Any]:
        """What a store keeps: the object plus the requester binding."""
        d = self.to_dict()
        d["requester"] = {"tokenId": self.requester_token_id, "node": self.requester_node}
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any], resource_version: str = "") -> CSR:
        """Inverse of :meth:`to_record` (also reads plain objects without the requester part)."""
        meta, spec, status = d.get("metadata", {}), d.get("spec", {}), d.get("status", {}) or {}
        req = d.get("requester") or {}
        cert = status.get("certificate")
        return cls(
            name=meta["name"], request=base64.b64decode(spec["request"]), signer_name=spec["signerName"],
            usages=tuple(spec.get("usages", ())), username=spec.get("username", ""),
            groups=tuple(spec.get("groups", ())), uid=spec.get("uid", ""),
            expiration_seconds=spec.get("expirationSeconds"), metadata_uid=meta.get("uid", ""),
            creation_timestamp=meta.get("creationTimestamp", ""), resource_version=resource_version,
            conditions=[Condition.from_dict(c) for c in status.get("conditions", [])],
            certificate=base64.b64decode(cert) if cert else None,
            requester_token_id=req.get("tokenId"), requester_node=req.get("node"),
        )


def parse_request_pem(pem: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its self-signature; raises :class:`CSRInvalid`."""
    if len(pem) > MAX_REQUEST_PEM:
        raise CSRInvalid(f"spec.request: larger than {MAX_REQUEST_PEM} bytes")
    try:
        req = x509.load_pem_x509_csr(pem)
    except ValueError as exc:
        raise CSRInvalid(f"spec.request: not a PEM certificate request: {exc}") from exc
    if not req.is_signature_valid:
        raise CSRInvalid("spec.request: the request's signature does not verify")
    return req


def _generate_name(prefix: str) -> str:
    alphabet = string.ascii_lowercase + string.digits
    return prefix + "".join(secrets.choice(alphabet) for _ in range(5))


def from_request_body(body: Any, caller: Identity, now: dt.datetime | None = None) -> CSR:
    """Build a new CSR from a POST body. ``spec.username/uid/groups`` come from ``caller``; the body's are ignored.

    Raises :class:`CSRInvalid` with a message naming the field.
    """
    if not isinstance(body, dict):
        raise CSRInvalid("body: expected a JSON object")
    if body.get("kind", "CertificateSigningRequest") != "CertificateSigningRequest":
        raise CSRInvalid("kind: must be CertificateSigningRequest")
    meta = body.get("metadata") or {}
    spec = body.get("spec") or {}
    if not isinstance(meta, dict) or not isinstance(spec, dict):
        raise CSRInvalid("metadata and spec must be objects")
    name = meta.get("name") or ""
    if not name:
        prefix = meta.get("generateName") or ""
        if not isinstance(prefix, str) or not prefix:
            raise CSRInvalid("metadata.name: name or generateName is required")
        name = _generate_name(prefix[:200])
    if not is_dns_subdomain(name):
        shown = repr(name[:80] if isinstance(name, str) else name)[:100]
        raise CSRInvalid(f"metadata.name: {shown} is not a valid name (lower-case DNS subdomain)")
    request_b64 = spec.get("request")
    if not isinstance(request_b64, str) or not request_b64:
        raise CSRInvalid("spec.request: required (base64 of a PEM certificate request)")
    if len(request_b64) > MAX_REQUEST_PEM * 4 // 3 + 8:
        raise CSRInvalid(f"spec.request: larger than {MAX_REQUEST_PEM} bytes")
    try:
        pem = base64.b64decode(request_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CSRInvalid("spec.request: not valid base64") from exc
    parse_request_pem(pem)
    signer = spec.get("signerName")
    if not isinstance(signer, str) or not signer:
        raise CSRInvalid("spec.signerName: required")
    usages = spec.get("usages")
    if not isinstance(usages, list) or not usages or not all(isinstance(u, str) for u in usages):
        raise CSRInvalid("spec.usages: required, a list of key usages")
    unknown = [u for u in usages if u not in KNOWN_USAGES]
    if unknown:
        raise CSRInvalid(f"spec.usages: unknown usage {unknown[0]!r}")
    if len(set(usages)) != len(usages):
        raise CSRInvalid("spec.usages: duplicate usage")
    exp = spec.get("expirationSeconds")
    if exp is not None:
        if isinstance(exp, bool) or not isinstance(exp, int):
            raise CSRInvalid(f"spec.expirationSeconds: must be an integer, not {type(exp).__name__}")
        if exp < MIN_EXPIRATION_SECONDS:
            raise CSRInvalid(f"spec.expirationSeconds: may not be less than {MIN_EXPIRATION_SECONDS} (10 minutes)")
        if exp > MAX_EXPIRATION_SECONDS:
            raise CSRInvalid(f"spec.expirationSeconds: may not be more than {MAX_EXPIRATION_SECONDS}")
    return CSR(
        name=name, request=pem, signer_name=signer, usages=tuple(usages), username=caller.user,
        groups=caller.groups, uid=caller.uid, expiration_seconds=exp, creation_timestamp=now_rfc3339(now),
        requester_token_id=caller.token_id, requester_node=caller.node or caller.node_name,
    )

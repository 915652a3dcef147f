"""The three signers and their rules, and issuing a certificate for an approved CSR.

* ``kubernetes.io/kube-apiserver-client-kubelet``: O exactly ``system:nodes``, CN ``system:node:<name>``, no SANs,
  usages ``digital signature`` + ``client auth`` (+ ``key encipherment`` for RSA keys only).
* ``kubernetes.io/kubelet-serving``: same subject, at least one DNS/IP SAN and every SAN among the node's inventory
  names and addresses, usages ``digital signature`` + ``server auth`` (+ ``key encipherment`` for RSA keys).
* ``kubernetes.io/kube-apiserver-client``: any CN (required), usages include ``client auth``, never ``server auth``.

A CSR that breaks its signer's rules is marked ``Failed`` with the message of :class:`SignerRuleError`.
Lifetime: the least of ``spec.expirationSeconds`` (not below 600 s), one year (the service's maximum) and the CA's
remaining life.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from certs.ca import CertificateAuthority, Usages, cert_pem
from certs.csr import CSR, MIN_EXPIRATION_SECONDS
from certs.tokens import NODE_USER_PREFIX, NODES_GROUP
from netnames import normalize_host

KUBELET_CLIENT = "kubernetes.io/kube-apiserver-client-kubelet"
KUBELET_SERVING = "kubernetes.io/kubelet-serving"
APISERVER_CLIENT = "kubernetes.io/kube-apiserver-client"
SIGNERS = (KUBELET_CLIENT, KUBELET_SERVING, APISERVER_CLIENT)
DEFAULT_LIFETIME = dt.timedelta(days=365)


class SignerRuleError(ValueError):
    """The CSR breaks its signer's rules."""


@dataclass(frozen=True)
class NodeInventory:
    """The nodes the control plane knows: each node name with the names and addresses it may have in SANs.

    Handed to certs by the daemon as plain data (certs knows nothing of the daemon's config).
    """

    nodes: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def of(cls, entries: Iterable[tuple[str, Iterable[str]]]) -> NodeInventory:
        """Build from ``(node name, [addresses and extra names])``; the node name itself is always allowed."""
        return cls({name: frozenset(normalize_host(h) for h in (name, *hosts)) for name, hosts in entries})

    def __contains__(self, node: object) -> bool:
        return node in self.nodes


@dataclass(frozen=True)
class Request:
    """What a CSR asks for, read from its PKCS#10 request."""

    common_name: str
    organizations: tuple[str, ...]
    dns_names: tuple[str, ...]
    ip_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]
    other_sans: int
    """Email, URI and other SAN entries (never allowed for node signers)."""
    key_kind: str

    @property
    def node_name(self) -> str | None:
        """The node a ``system:node:<name>`` CN names."""
        if self.common_name.startswith(NODE_USER_PREFIX):
            return self.common_name[len(NODE_USER_PREFIX):] or None
        return None


def read_request(req: x509.CertificateSigningRequest) -> Request:
    """Extract the subject, SANs and key kind; raises :class:`SignerRuleError` for unusable keys."""
    cns = [str(a.value) for a in req.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if len(cns) > 1:
        raise SignerRuleError("the subject has more than one common name")
    orgs = tuple(str(a.value) for a in req.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
    dns: tuple[str, ...] = ()
    ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = ()
    other = 0
    try:
        san = req.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        pass
    else:
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(ip for ip in san.get_values_for_type(x509.IPAddress)
                    if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address))
        other = len(list(san)) - len(dns) - len(ips)
    key = req.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise SignerRuleError(f"unsupported elliptic curve {key.curve.name} (P-256 or P-384)")
        kind = "ecdsa"
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise SignerRuleError(f"RSA key of {key.key_size} bits is too small (2048 at least)")
        kind = "rsa"
    else:
        raise SignerRuleError("unsupported key type (ECDSA or RSA)")
    return Request(cns[0] if cns else "", orgs, dns, ips, other, kind)


def _check_usages(csr: CSR, req: Request, required: set[str], allowed: set[str]) -> None:
    usages = set(csr.usages)
    missing = required - usages
    if missing:
        raise SignerRuleError(f"{csr.signer_name} requires usages {', '.join(sorted(required))}; "
                              f"missing {', '.join(sorted(missing))}")
    extra = usages - allowed - {"key encipherment"}
    if extra:
        raise SignerRuleError(f"{csr.signer_name} does not allow usages {', '.join(sorted(extra))}")
    if "key encipherment" in usages and req.key_kind != "rsa":
        raise SignerRuleError("usage 'key encipherment' is only allowed for RSA keys")


def _check_node_subject(csr: CSR, req: Request) -> str:
    if req.organizations != (NODES_GROUP,):
        got = ", ".join(req.organizations) or "none"
        raise SignerRuleError(f"{csr.signer_name} requires organization exactly {NODES_GROUP!r}, got {got}")
    node = req.node_name
    if node is None:
        raise SignerRuleError(f"{csr.signer_name} requires common name system:node:<name>, "
                              f"got {req.common_name!r}")
    return node


def check(csr: CSR, inventory: NodeInventory) -> Request:
    """Check ``csr`` against its signer's rules; returns what it asks for or raises :class:`SignerRuleError`."""
    req = read_request(csr.parsed())
    if csr.signer_name == KUBELET_CLIENT:
        _check_node_subject(csr, req)
        if req.dns_names or req.ip_addresses or req.other_sans:
            raise SignerRuleError(f"{KUBELET_CLIENT} does not allow subject alternative names")
        _check_usages(csr, req, {"digital signature", "client auth"}, {"digital signature", "client auth"})
    elif csr.signer_name == KUBELET_SERVING:
        node = _check_node_subject(csr, req)
        if req.other_sans:
            raise SignerRuleError(f"{KUBELET_SERVING} allows only DNS and IP subject alternative names")
        if not req.dns_names and not req.ip_addresses:
            raise SignerRuleError(f"{KUBELET_SERVING} requires at least one DNS or IP subject alternative name")
        _check_usages(csr, req, {"digital signature", "server auth"}, {"digital signature", "server auth"})
        allowed = inventory.nodes.get(node)
        if allowed is None:
            raise SignerRuleError(f"node {node!r} is not in the inventory; its serving certificate cannot be checked")
        outside = [str(n) for n in (*req.dns_names, *req.ip_addresses) if normalize_host(str(n)) not in allowed]
        if outside:
            raise SignerRuleError(f"subject alternative names {', '.join(outside)} are not among node {node!r}'s "
                                  f"inventory names and addresses ({', '.join(sorted(allowed))})")
    elif csr.signer_name == APISERVER_CLIENT:
        if not req.common_name:
            raise SignerRuleError(f"{APISERVER_CLIENT} requires a common name (the user name)")
        _check_usages(csr, req, {"client auth"}, {"digital signature", "client auth"})
    else:
        raise SignerRuleError(f"unknown signer {csr.signer_name!r} (this CA signs {', '.join(SIGNERS)})")
    return req


def lifetime_for(csr: CSR, maximum: dt.timedelta = DEFAULT_LIFETIME) -> dt.timedelta:
    """One year by default; ``expirationSeconds`` honoured (not below 600 s), never beyond ``maximum``.

    The request is clamped as an integer before it becomes a ``timedelta``, so a stored value that the API would
    refuse today (a record from an older version, another master) cannot overflow.
    """
    requested = csr.expiration_seconds
    if requested is None or isinstance(requested, bool) or not isinstance(requested, int):
        return maximum
    ceiling = int(maximum.total_seconds())
    return dt.timedelta(seconds=min(max(requested, MIN_EXPIRATION_SECONDS), ceiling))


def sign(ca: CertificateAuthority, csr: CSR, inventory: NodeInventory, now: dt.datetime | None = None,
         maximum: dt.timedelta = DEFAULT_LIFETIME) -> bytes:
    """Issue the certificate for an approved ``csr`` (PEM). Raises :class:`SignerRuleError` when rules are broken."""
    req = check(csr, inventory)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in req.organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, req.common_name))
    usages = Usages(client_auth="client auth" in csr.usages, server_auth="server auth" in csr.usages,
                    key_encipherment="key encipherment" in csr.usages)
    public_key = csr.parsed().public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    cert = ca.issue(public_key, x509.Name(attrs), usages, lifetime_for(csr, maximum), req.dns_names,
                    req.ip_addresses, now=now)
    return cert_pem(cert)

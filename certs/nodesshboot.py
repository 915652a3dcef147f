"""The node side of ``nodesshcertificates``: keep a dial-in node's SSH key and certificate (``tunneld bootstrap
--ssh-key``).

The key (ed25519, OpenSSH format, 0600) is made once; the certificate (``<key>-cert.pub``) is asked for with the
node's kubelet client certificate from the kubeconfig the bootstrap just wrote, so the one TLS bootstrap yields
both identities. With ``--rotate`` it is renewed at a random point between 70 % and 90 % of its life. The node's
ssh reads the files again at its next start (the unit restarts it when the gateway closes an expired connection).
"""

from __future__ import annotations

import base64
import datetime as dt
import random
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from certs.apiclient import APIClient, APIError, APIUnavailable, tls_context
from certs.files import write_public, write_secret
from certs.nodessh import PATH

RENEW_MIN, RENEW_MAX = 0.7, 0.9
Progress = Callable[[str], None]
Sleep = Callable[[float], Awaitable[bool]]


class NodeSSHError(Exception):
    """The node's SSH certificate could not be obtained."""


def ensure_key(path: Path) -> str:
    """The public key line of the ed25519 key at ``path``, created (0600, and ``.pub``) when missing."""
    pub = path.with_name(path.name + ".pub")
    if path.exists() and pub.exists():
        return pub.read_text().strip()
    key = ed25519.Ed25519PrivateKey.generate()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_secret(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                         serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_public(pub, line + b"\n")
    return line.decode()


def _string(blob: bytes, pos: int) -> tuple[bytes, int]:
    (n,) = struct.unpack_from(">I", blob, pos)
    end = pos + 4 + n
    if end > len(blob):
        raise ValueError("truncated certificate")
    return blob[pos + 4:end], end


def certificate_validity(line: str) -> tuple[int, int]:
    """``(valid_after, valid_before)`` of an OpenSSH certificate line (ed25519, ECDSA or RSA keys)."""
    parts = line.split()
    if len(parts) < 2 or "-cert-v01@openssh.com" not in parts[0]:
        raise ValueError("not an OpenSSH certificate")
    blob = base64.b64decode(parts[1])
    kind, pos = _string(blob, 0)
    _, pos = _string(blob, pos)  # nonce
    fields = {b"ssh-ed25519": 1, b"ssh-rsa": 2, b"ecdsa-sha2": 2}
    key_fields = next((n for prefix, n in fields.items() if kind.startswith(prefix)), None)
    if key_fields is None:
        raise ValueError(f"unsupported certificate type {kind[:40]!r}")
    for _ in range(key_fields):
        _, pos = _string(blob, pos)
    pos += 8 + 4  # serial, type
    _, pos = _string(blob, pos)  # key id
    _, pos = _string(blob, pos)  # principals
    after, before = struct.unpack_from(">QQ", blob, pos)
    return int(after), int(before)


def certificate_path(key: Path) -> Path:
    return key.with_name(key.name + "-cert.pub")


def current_validity(key: Path) -> tuple[int, int] | None:
    try:
        return certificate_validity(certificate_path(key).read_text())
    except (OSError, ValueError):
        return None


async def obtain(kubeconfig: Path, node_name: str, key: Path, progress: Progress, *, renew: bool = False) -> int:
    """Make sure ``<key>-cert.pub`` holds a valid certificate (a new one with ``renew``); returns its end."""
    from certs.bootstrap import current_certificate, is_valid

    now = time.time()
    validity = current_validity(key)
    if validity is not None and validity[0] <= now < validity[1] and not renew:
        return validity[1]
    public = ensure_key(key)
    found = current_certificate(kubeconfig)
    if found is None or not is_valid(found[0], now):
        raise NodeSSHError(f"{kubeconfig} has no valid client certificate to ask for the SSH certificate with")
    cfg = found[1]
    cluster, user = cfg.current()
    ca_pem = cfg.ca_pem(cluster)
    if not ca_pem or user is None or not (user.client_certificate and user.client_key):
        raise NodeSSHError(f"{kubeconfig}: needs a CA and client certificate/key files")
    context = tls_context(ca_pem, cfg.resolve(user.client_certificate), cfg.resolve(user.client_key))
    body = {"apiVersion": "tunneld.io/v1", "kind": "NodeSSHCertificateRequest",
            "spec": {"nodeName": node_name, "publicKey": public}}
    try:
        async with APIClient(cluster.server, context) as api:
            answer = await api.request("POST", PATH, body)
    except (APIError, APIUnavailable, ValueError) as exc:
        raise NodeSSHError(f"SSH certificate for node:{node_name} refused: {exc}") from exc
    text = answer.get("status", {}).get("certificate") if isinstance(answer, dict) else None
    if not isinstance(text, str):
        raise NodeSSHError("the answer holds no status.certificate")
    try:
        _, before = certificate_validity(text)
    except ValueError as exc:
        raise NodeSSHError(f"the answer's certificate: {exc}") from exc
    write_public(certificate_path(key), text.strip().encode() + b"\n")
    progress(f"SSH certificate for node:{node_name} written to {certificate_path(key)} (valid until "
             f"{dt.datetime.fromtimestamp(before, dt.UTC):%Y-%m-%d %H:%M:%S} UTC)")
    return before


async def rotate(kubeconfig: Path, node_name: str, key: Path, progress: Progress, sleep: Sleep, *,
                 rng: random.Random | None = None, retry_initial: float = 5.0, retry_max: float = 300.0,
                 max_renewals: int = 1_000_000) -> int:
    """Keep the SSH certificate fresh until ``sleep`` reports a stop; returns the renewals made."""
    rng = rng or random.SystemRandom()
    await obtain(kubeconfig, node_name, key, progress)
    renewals = 0
    backoff = retry_initial
    for _ in range(max_renewals):
        validity = current_validity(key)
        assert validity is not None
        start, end = validity
        due = start + (end - start) * rng.uniform(RENEW_MIN, RENEW_MAX)
        for _ in range(1_000_000):
            remaining = due - time.time()
            if remaining <= 0:
                break
            if await sleep(min(remaining, 3600.0)):
                return renewals
        for _ in range(1_000_000):
            try:
                await obtain(kubeconfig, node_name, key, progress, renew=True)
                renewals += 1
                backoff = retry_initial
                break
            except NodeSSHError as exc:
                progress(f"SSH certificate renewal failed: {exc}; retrying in {backoff:g}s")
            if await sleep(backoff):
                return renewals
            backoff = min(backoff * 2, retry_max)
    return renewals

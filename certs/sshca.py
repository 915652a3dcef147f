"""The cluster's SSH certificate authority: it signs nodes' SSH host keys so the gateway trusts no key on first use.

The CA is an ordinary OpenSSH key pair (``ssh_ca`` private, 0600; ``ssh_ca.pub``). Signing a node's host public key
yields an OpenSSH host certificate (``*-cert-v01@openssh.com``) whose principals are the node's name and addresses,
valid from a few minutes ago (clock skew) for a bounded period. The gateway's known_hosts then needs a single line,
``@cert-authority <host pattern> <CA public key>``: any host presenting a certificate from this CA that names the
host the gateway dialled is accepted, and anything else (a plain key, another CA, an expired certificate, another
host's certificate) is refused.

A second, separate CA (``ssh_user_ca``, ``ssh_user_ca.pub``) signs dial-in nodes' *user* keys
(:meth:`SSHCA.sign_node`): one principal ``node:<name>``, only ``permit-port-forwarding``, 24 h by default. Kept apart
from the host CA so that neither kind of certificate can pass for the other.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from certs.files import read_limited, refuse_overwrite, write_public, write_secret

PRIVATE_NAME = "ssh_ca"
PUBLIC_NAME = "ssh_ca.pub"
USER_PRIVATE_NAME = "ssh_user_ca"
USER_PUBLIC_NAME = "ssh_user_ca.pub"
NODE_VALIDITY = 24 * 3600
MAX_NODE_VALIDITY = 30 * 24 * 3600
NODE_PRINCIPAL_PREFIX = "node:"
_NODE_RE = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")
ALGORITHMS = {"ed25519": "ssh-ed25519", "ecdsa": "ecdsa-sha2-nistp256", "rsa": "ssh-rsa"}
WEEK = 7 * 24 * 3600
DEFAULT_VALIDITY = 52 * WEEK
MAX_VALIDITY = 5 * 52 * WEEK
BACKDATE = 5 * 60
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": WEEK}
_VALIDITY_RE = re.compile(r"(\d+)([smhdw]?)")
_PRINCIPAL_RE = re.compile(r"[A-Za-z0-9._:%\[\]-]{1,253}")
MAX_PRINCIPALS = 64


class SSHCAError(Exception):
    """The SSH CA cannot be created or loaded, or a signing request is invalid."""


def parse_validity(text: str) -> int:
    """Seconds in a validity like ssh-keygen's: ``52w``, ``+1d``, ``12h30m``, ``3600`` (seconds).

    Must be positive and at most :data:`MAX_VALIDITY`: host certificates never live forever.
    """
    spec = text.strip().lstrip("+")
    if not spec:
        raise SSHCAError("validity is empty")
    total, pos = 0, 0
    for _ in range(16):
        if pos == len(spec):
            break
        m = _VALIDITY_RE.match(spec, pos)
        if m is None:
            raise SSHCAError(f"validity {text!r}: expected a number with an optional unit s, m, h, d or w")
        total += int(m.group(1)) * _UNITS[m.group(2) or "s"]
        pos = m.end()
    else:
        raise SSHCAError(f"validity {text!r} has too many parts")
    if total <= 0:
        raise SSHCAError(f"validity {text!r} must be positive")
    if total > MAX_VALIDITY:
        raise SSHCAError(f"validity {text!r} is longer than the maximum of {MAX_VALIDITY // WEEK}w")
    return total


def _check_principals(principals: Sequence[str]) -> list[str]:
    out: list[str] = []
    for p in principals:
        if not _PRINCIPAL_RE.fullmatch(p):
            raise SSHCAError(f"invalid principal {p!r} (a host name or an address, no spaces or commas)")
        if p not in out:
            out.append(p)
    if not out:
        raise SSHCAError("a host certificate needs at least one principal (the node's name and addresses)")
    if len(out) > MAX_PRINCIPALS:
        raise SSHCAError(f"at most {MAX_PRINCIPALS} principals")
    return out


@dataclass(frozen=True)
class HostCertificate:
    """A signed host certificate and the facts about it."""

    text: bytes  # one OpenSSH line: "<type>-cert-v01@openssh.com <base64> <comment>\n"
    key_id: str
    serial: int
    principals: tuple[str, ...]
    valid_after: int  # seconds since the epoch
    valid_before: int


class SSHCA:
    """An SSH CA key pair, loaded or freshly created."""

    def __init__(self, key: asyncssh.SSHKey, path: Path | None = None) -> None:
        """Wrap a private key (``path`` is where it lives, for messages)."""
        self.key = key
        self.path = path

    @classmethod
    def create(
        cls, directory: str | Path, *, force: bool = False, algorithm: str = "ed25519", comment: str = "tunneld-ssh-ca",
        user: bool = False,
    ) -> SSHCA:
        """Generate a CA in ``directory`` (``ssh_ca`` 0600, ``ssh_ca.pub``; with ``user``, the separate user CA
        ``ssh_user_ca`` and ``ssh_user_ca.pub``); never overwrite unless ``force``."""
        if algorithm not in ALGORITHMS:
            raise SSHCAError(f"unknown SSH CA algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})")
        d = Path(directory)
        names = (USER_PRIVATE_NAME, USER_PUBLIC_NAME) if user else (PRIVATE_NAME, PUBLIC_NAME)
        private, public = d / names[0], d / names[1]
        try:
            refuse_overwrite([private, public], force)
        except FileExistsError as exc:
            raise SSHCAError(str(exc)) from exc
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        options = {"key_size": 3072} if algorithm == "rsa" else {}
        key = asyncssh.generate_private_key(ALGORITHMS[algorithm], comment=comment, **options)
        write_secret(private, key.export_private_key("openssh"))
        write_public(public, key.export_public_key("openssh"))
        return cls(key, private)

    @classmethod
    def load(cls, path: str | Path) -> SSHCA:
        """Load the CA's private key (OpenSSH or PEM, unencrypted) from ``path``."""
        p = Path(path)
        try:
            data = read_limited(p, 64 * 1024)
            key = asyncssh.import_private_key(data)
        except (OSError, ValueError, asyncssh.KeyImportError) as exc:
            raise SSHCAError(f"cannot load the SSH CA key {p}: {getattr(exc, 'strerror', None) or exc}") from exc
        return cls(key, p)

    def public_key_line(self) -> str:
        """The CA public key as one OpenSSH line without a trailing newline."""
        return self.key.export_public_key("openssh").decode("ascii").strip()

    def known_hosts_line(self, pattern: str = "*") -> str:
        """The known_hosts line trusting this CA's host certificates for hosts matching ``pattern``."""
        if not pattern or any(c.isspace() for c in pattern):
            raise SSHCAError(f"invalid known_hosts host pattern {pattern!r}")
        return f"@cert-authority {pattern} {self.public_key_line()}"

    def sign_host(
        self,
        public_key: bytes | str | asyncssh.SSHKey,
        principals: Sequence[str],
        validity: int | str = DEFAULT_VALIDITY,
        *,
        key_id: str | None = None,
        now: float | None = None,
    ) -> HostCertificate:
        """Sign a host public key (OpenSSH text or a key) for ``principals``, valid for ``validity``.

        The certificate starts :data:`BACKDATE` seconds before ``now`` (tolerating clock skew between the
        signer and the gateway) and carries a random 63-bit serial.
        """
        names = _check_principals(principals)
        seconds = parse_validity(validity) if isinstance(validity, str) else int(validity)
        if not 0 < seconds <= MAX_VALIDITY:
            raise SSHCAError(f"validity must be between 1 s and {MAX_VALIDITY // WEEK}w")
        host_key = _import_host_key(public_key)
        start = int(now if now is not None else time.time())
        valid_after, valid_before = start - BACKDATE, start + seconds
        serial = secrets.randbits(63)
        kid = key_id or names[0]
        sig_alg = "rsa-sha2-512" if self.key.algorithm == b"ssh-rsa" else ()
        try:
            cert = self.key.generate_host_certificate(
                host_key, kid, serial=serial, principals=names, valid_after=valid_after,
                valid_before=valid_before, sig_alg=sig_alg, comment=kid,
            )
        except (ValueError, asyncssh.KeyGenerationError) as exc:
            raise SSHCAError(f"cannot sign the host key: {exc}") from exc
        text = cert.export_certificate("openssh")
        if not text.endswith(b"\n"):
            text += b"\n"
        return HostCertificate(text, kid, serial, tuple(names), valid_after, valid_before)


    def sign_node(
        self,
        public_key: bytes | str | asyncssh.SSHKey,
        node: str,
        validity: int | str = NODE_VALIDITY,
        *,
        now: float | None = None,
    ) -> HostCertificate:
        """Sign a dial-in node's user key: principal ``node:<node>``, only ``permit-port-forwarding``, valid for
        ``validity`` (default 24 h, at most 30 days) from :data:`BACKDATE` before ``now``."""
        if not _NODE_RE.fullmatch(node):
            raise SSHCAError(f"invalid node name {node!r}")
        seconds = parse_validity(validity) if isinstance(validity, str) else int(validity)
        if not 0 < seconds <= MAX_NODE_VALIDITY:
            raise SSHCAError(f"a node certificate's validity must be between 1 s and {MAX_NODE_VALIDITY // 86400}d")
        user_key = _import_host_key(public_key)
        principal = NODE_PRINCIPAL_PREFIX + node
        start = int(now if now is not None else time.time())
        valid_after, valid_before = start - BACKDATE, start + seconds
        serial = secrets.randbits(63)
        sig_alg = "rsa-sha2-512" if self.key.algorithm == b"ssh-rsa" else ()
        try:
            cert = self.key.generate_user_certificate(
                user_key, principal, serial=serial, principals=[principal], valid_after=valid_after,
                valid_before=valid_before, permit_x11_forwarding=False, permit_agent_forwarding=False,
                permit_port_forwarding=True, permit_pty=False, permit_user_rc=False, sig_alg=sig_alg,
                comment=principal,
            )
        except (ValueError, asyncssh.KeyGenerationError) as exc:
            raise SSHCAError(f"cannot sign the node key: {exc}") from exc
        text = cert.export_certificate("openssh")
        if not text.endswith(b"\n"):
            text += b"\n"
        return HostCertificate(text, principal, serial, (principal,), valid_after, valid_before)


def _import_host_key(public_key: bytes | str | asyncssh.SSHKey) -> asyncssh.SSHKey:
    if isinstance(public_key, asyncssh.SSHKey):
        return public_key
    data = public_key.encode() if isinstance(public_key, str) else public_key
    if len(data) > 64 * 1024:
        raise SSHCAError("the host public key is too large")
    if b"PRIVATE KEY" in data:
        raise SSHCAError("that is a private key; pass the host's public key (e.g. ssh_host_ed25519_key.pub)")
    if b"-cert-v01@openssh.com" in data.split(b" ", 1)[0]:
        raise SSHCAError("that is already a certificate; pass the host's plain public key")
    try:
        return asyncssh.import_public_key(data)
    except (ValueError, asyncssh.KeyImportError) as exc:
        raise SSHCAError(f"not an OpenSSH public key: {exc}") from exc

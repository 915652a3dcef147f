"""Who a dial-in connection is: the pure checks on a node's OpenSSH user certificate (no I/O, no asyncssh).

A node logs in as ``node:<name>`` with a user certificate from the SSH *user* CA whose one principal is that same
``node:<name>``. The SSH boundary (:mod:`.dialin_ssh`) verifies the signature and the CA; this module decides
everything else from the certificate's facts: the login name's form, that exactly that one principal is named,
the validity window, that the certificate is not revoked (:mod:`.krl`), and that the node is in the inventory as
a dial-in node. Every refusal is one line saying why.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from netnames import is_dns_subdomain

PREFIX = "node:"
_USER_RE = re.compile(r"node:[a-z0-9.-]{1,253}")


@dataclass(frozen=True)
class CertFacts:
    """What a user certificate says, as the SSH boundary decoded it."""

    key_id: str
    serial: int
    principals: tuple[str, ...]
    valid_after: int
    valid_before: int
    ca_blob: bytes
    """The signing CA's public key blob (to compare with the configured user CA and for the KRL)."""
    key_blob: bytes
    """The certified public key's blob (for the KRL's explicit keys and fingerprints)."""


class IdentityRefused(Exception):
    """A dial-in login is refused; the message is the one-line reason for the log and the audit line."""


def node_of_username(username: str) -> str:
    """``node:node-1`` -> ``node-1``; raises :class:`IdentityRefused` for anything else."""
    if not _USER_RE.fullmatch(username) or not is_dns_subdomain(username[len(PREFIX):]):
        raise IdentityRefused(f"login name {sanitize(username)!r} is not node:<node name>")
    return username[len(PREFIX):]


def sanitize(text: str, limit: int = 120) -> str:
    """A peer's string made safe for one log line."""
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text[:limit])


def check_certificate(
    username: str,
    facts: CertFacts,
    *,
    now: float,
    is_dialin_node: Callable[[str], str | None],
    revoked: Callable[[CertFacts], str | None],
) -> str:
    """The node name this certificate may hold a tunnel for, or :class:`IdentityRefused`.

    ``is_dialin_node(name)`` returns None for a dial-in node of the inventory, else why not; ``revoked(facts)``
    returns why the certificate is revoked, or None."""
    name = node_of_username(username)
    principals = [sanitize(p, 80) for p in facts.principals]
    if list(facts.principals) != [username]:
        shown = ", ".join(principals[:8]) or "none (valid for any user)"
        raise IdentityRefused(f"certificate {sanitize(facts.key_id)!r} names {shown}; it must name exactly "
                              f"{username}")
    if now < facts.valid_after:
        raise IdentityRefused(f"certificate {sanitize(facts.key_id)!r} is not valid yet")
    if now >= facts.valid_before:
        raise IdentityRefused(f"certificate {sanitize(facts.key_id)!r} has expired")
    why = revoked(facts)
    if why is not None:
        raise IdentityRefused(f"certificate {sanitize(facts.key_id)!r} (serial {facts.serial}) is revoked: {why}")
    why = is_dialin_node(name)
    if why is not None:
        raise IdentityRefused(f"node {name}: {why}")
    return name

"""Who is calling: static token file, bootstrap tokens, client certificates.

* Static token file: kube-apiserver's ``--token-auth-file`` CSV, ``token,user,uid,"group1,group2"``, parsed as
  RFC 4180 CSV. A record with fewer than 3 fields makes the whole file invalid (error names file:line); a record with
  an empty token is skipped with a warning; later duplicates are skipped with a warning.
* Bootstrap tokens: ``[a-z0-9]{6}.[a-z0-9]{16}`` (public id, secret), with an optional expiry, usages
  (``authentication``, ``signing``), extra groups (``system:bootstrappers:...``) and an optional node binding.
  They authenticate as ``system:bootstrap:<id>`` in ``system:bootstrappers`` plus the extra groups.
* Client certificates (verified by TLS against the cluster CA): CN is the user, O the groups.

Secrets are compared with :func:`hmac.compare_digest` and never logged (log lines name files, lines and token ids).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import io
import logging
import re
import secrets
import string
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from certs.files import read_limited

log = logging.getLogger("certs.tokens")

BOOTSTRAP_TOKEN_RE = re.compile(r"^([a-z0-9]{6})\.([a-z0-9]{16})$")
BOOTSTRAP_GROUP = "system:bootstrappers"
BOOTSTRAP_USER_PREFIX = "system:bootstrap:"
EXTRA_GROUP_RE = re.compile(r"^system:bootstrappers:[a-z0-9:-]{0,255}[a-z0-9]$")
USAGES = ("authentication", "signing")
ADMIN_GROUP = "system:masters"
NODE_USER_PREFIX = "system:node:"
NODES_GROUP = "system:nodes"
_ALPHABET = string.ascii_lowercase + string.digits


class TokenFileError(ValueError):
    """The static token file is invalid; the message names file and line."""


class TokenError(ValueError):
    """A bootstrap token or its attributes are malformed."""


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    user: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    method: str = "token"
    """How the caller proved it: ``token`` (static file), ``bootstrap``, ``cert``, ``local`` (unix socket)."""
    token_id: str | None = None
    """The bootstrap token id, for bootstrap callers."""
    node: str | None = None
    """The node a bootstrap token is bound to, if any."""

    @property
    def is_admin(self) -> bool:
        """Members of ``system:masters`` may see every CSR and approve or deny."""
        return ADMIN_GROUP in self.groups

    @property
    def node_name(self) -> str | None:
        """For a node's own identity (``system:node:<name>`` in ``system:nodes``): the node name."""
        if self.user.startswith(NODE_USER_PREFIX) and NODES_GROUP in self.groups:
            return self.user[len(NODE_USER_PREFIX):] or None
        return None


@dataclass(frozen=True)
class StaticToken:
    """One record of the static token file."""

    token: str = field(repr=False)
    user: str
    uid: str
    groups: tuple[str, ...] = ()


def parse_token_file(text: str, source: str = "<token file>") -> list[StaticToken]:
    """Parse kube-apiserver's token CSV. Raises :class:`TokenFileError` naming ``source:line``."""
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True, strict=True)
    out: list[StaticToken] = []
    seen: set[str] = set()
    try:
        for record in reader:
            line = reader.line_num
            if not record or record == [""]:
                continue  # blank line
            if len(record) < 3:
                raise TokenFileError(
                    f"{source}:{line}: needs at least 3 columns (token, user name, user uid), found {len(record)}"
                )
            token, user, uid = record[0].strip(), record[1].strip(), record[2].strip()
            if not token:
                log.warning("empty token skipped", extra={"file": source, "line": line})
                continue
            if token in seen:
                log.warning("duplicate token skipped", extra={"file": source, "line": line})
                continue
            seen.add(token)
            groups = tuple(g.strip() for g in record[3].split(",") if g.strip()) if len(record) > 3 else ()
            out.append(StaticToken(token, user, uid, groups))
    except csv.Error as exc:
        raise TokenFileError(f"{source}:{reader.line_num}: {exc}") from exc
    return out


def load_token_file(path: Path) -> list[StaticToken]:
    """Read and parse the static token file."""
    try:
        data = read_limited(path)
    except OSError as exc:
        raise TokenFileError(f"{path}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TokenFileError(f"{path}: not UTF-8 text") from exc
    return parse_token_file(text, str(path))


@dataclass(frozen=True)
class BootstrapToken:
    """A bootstrap token as stored (the secret is needed to sign cluster-info, so it is kept)."""

    token_id: str
    secret: str = field(repr=False)
    expires: dt.datetime | None = None
    usages: tuple[str, ...] = USAGES
    groups: tuple[str, ...] = ()
    """Extra groups beyond ``system:bootstrappers`` (each ``system:bootstrappers:...``)."""
    description: str = ""
    node: str | None = None
    """When set, the token may only be used to obtain certificates for this node."""
    created: dt.datetime | None = None

    @property
    def token(self) -> str:
        """The full ``id.secret`` string a client presents."""
        return f"{self.token_id}.{self.secret}"

    def expired(self, now: dt.datetime) -> bool:
        """True when the token has an expiry and it has passed."""
        return self.expires is not None and now >= self.expires

    def to_dict(self) -> dict[str, object]:
        """JSON-able form for the store."""
        return {
            "id": self.token_id, "secret": self.secret,
            "expires": self.expires.isoformat() if self.expires else None,
            "usages": list(self.usages), "groups": list(self.groups), "description": self.description,
            "node": self.node, "created": self.created.isoformat() if self.created else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> BootstrapToken:
        """Inverse of :meth:`to_dict`."""
        def when(v: object) -> dt.datetime | None:
            return dt.datetime.fromisoformat(str(v)) if v else None
        return cls(
            token_id=str(data["id"]), secret=str(data["secret"]), expires=when(data.get("expires")),
            usages=tuple(str(u) for u in _items(data.get("usages"))),
            groups=tuple(str(g) for g in _items(data.get("groups"))),
            description=str(data.get("description") or ""),
            node=str(data["node"]) if data.get("node") else None, created=when(data.get("created")),
        )


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def new_bootstrap_token(
    ttl: dt.timedelta | None = dt.timedelta(hours=24),
    usages: Iterable[str] = USAGES,
    groups: Iterable[str] = (),
    description: str = "",
    node: str | None = None,
    now: dt.datetime | None = None,
) -> BootstrapToken:
    """A fresh bootstrap token from the OS CSPRNG (``secrets``). ``ttl`` None or zero: never expires.

    The format fixes 22 characters of ``[a-z0-9]``: about 114 bits in all, of which the 16-character secret is
    about 83 bits (the 6-character id is public); this is the most the Kubernetes format allows.
    """
    now = now or dt.datetime.now(dt.UTC)
    usages = tuple(dict.fromkeys(usages))
    groups = tuple(dict.fromkeys(groups))
    for u in usages:
        if u not in USAGES:
            raise TokenError(f"unknown usage {u!r} (allowed: {', '.join(USAGES)})")
    if not usages:
        raise TokenError("a token needs at least one usage")
    for g in groups:
        if not EXTRA_GROUP_RE.match(g):
            raise TokenError(f"extra group {g!r} must match system:bootstrappers:[a-z0-9:-]*[a-z0-9]")
    expires = now + ttl if ttl else None
    return BootstrapToken(_random(6), _random(16), expires, usages, groups, description, node, now)


def parse_duration(text: str) -> dt.timedelta | None:
    """``24h``, ``90m``, ``1h30m``, ``45s``, ``7d``; ``0`` means none (never expires)."""
    text = text.strip()
    if text == "0":
        return None
    parts = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not text or parts is None:
        raise ValueError(f"{text!r} is not a duration such as 24h, 90m or 1h30m (0: no expiry)")
    d, h, m, s = (int(p) if p else 0 for p in parts.groups())
    return dt.timedelta(days=d, hours=h, minutes=m, seconds=s)


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """The caller named by a verified client certificate: CN is the user, each O a group."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    groups = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
    return Identity(user=str(cns[0].value) if cns else "", groups=groups, method="cert")


BootstrapLookup = Callable[[str], Awaitable[BootstrapToken | None]]


class Authenticator:
    """Turns a bearer token into an :class:`Identity` (or None)."""

    def __init__(self, static: Iterable[StaticToken], bootstrap: BootstrapLookup,
                 clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)) -> None:
        self._bootstrap = bootstrap
        self._clock = clock
        self.set_static(static)

    def set_static(self, static: Iterable[StaticToken]) -> None:
        """Replace the static tokens (e.g. after the token file changed)."""
        # Keyed by SHA-256 so a dict lookup reveals nothing about the secret; then a constant-time comparison.
        self._static = {hashlib.sha256(t.token.encode()).digest(): t for t in static}

    async def authenticate(self, token: str) -> Identity | None:
        """The identity for ``token``, or None when it is unknown, expired or not for authentication."""
        if len(token) > 4096 or not token.isascii():
            return None
        m = BOOTSTRAP_TOKEN_RE.match(token)
        if m:
            ident = await self._authenticate_bootstrap(m.group(1), m.group(2))
            if ident is not None:
                return ident
        entry = self._static.get(hashlib.sha256(token.encode()).digest())
        if entry is not None and hmac.compare_digest(entry.token.encode(), token.encode()):
            return Identity(entry.user, entry.uid, entry.groups, method="token")
        return None

    async def _authenticate_bootstrap(self, token_id: str, secret: str) -> Identity | None:
        stored = await self._bootstrap(token_id)
        if stored is None:
            return None
        if not hmac.compare_digest(stored.secret.encode(), secret.encode()):
            return None
        if stored.expired(self._clock()):
            log.info("expired bootstrap token presented", extra={"token_id": token_id})
            return None
        if "authentication" not in stored.usages:
            return None
        groups = (BOOTSTRAP_GROUP, *[g for g in stored.groups if g != BOOTSTRAP_GROUP])
        return Identity(BOOTSTRAP_USER_PREFIX + token_id, "", groups, method="bootstrap", token_id=token_id,
                        node=stored.node)


def _items(value: object) -> list[object]:
    """A stored list field (absent or empty: no items)."""
    return list(value) if isinstance(value, list | tuple) else []

"""Where CSRs, bootstrap tokens and the audit log live: the :class:`Store` protocol and its shared helpers.

Backends: :mod:`certs.sqlite_store` (one file, default) and :mod:`certs.etcd_store` (several masters share it).
Updates are compare-and-swap on ``resource_version``: :func:`update_csr` re-reads and retries on conflict, so two
gateways deciding or signing at once never lose each other's conditions. The audit log is append-only.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from certs.csr import CSR, now_rfc3339
from certs.tokens import BootstrapToken


class StoreError(Exception):
    """The store cannot be reached or answered something unexpected."""


class NotFound(StoreError):
    """No such object."""


class AlreadyExists(StoreError):
    """An object with that name exists."""


class Conflict(StoreError):
    """The object changed since it was read (compare-and-swap failed)."""


SCHEMA_VERSION = 2
"""Version 2: locks are fenced (etcd: leases; SQLite: generations). Version 1 (no version key) had wall-clock locks."""


class Contended(StoreError):
    """Another master holds the lock for this decision; retry shortly (HTTP 503)."""


class LockLost(Contended):
    """A write fenced by a lock failed because the lock is no longer ours (it expired and may be someone else's):
    nothing was written, and whatever was decided under the lock is discarded."""


class InvalidContinue(ValueError):
    """A list's ``continue`` token is malformed or has expired (HTTP 400 / 410)."""

    def __init__(self, message: str, expired: bool = False) -> None:
        """``expired``: the snapshot the token points at is gone (list again from the start)."""
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True)
class Fence:
    """Proof of holding a store lock, checked inside the writes it guards (a fencing token).

    ``token`` is what the store compares: etcd, the lock key's ``create_revision``; SQLite, the lock row's
    generation. A write fenced by a lock that expired (and may have been taken by another master) fails with
    :class:`LockLost`, whatever any clock says.
    """

    name: str
    owner: str
    token: int


def encode_continue(after: str, revision: int = 0) -> str:
    """A list continuation: resume after the name ``after``, at ``revision`` (etcd; 0 for SQLite)."""
    raw = json.dumps({"after": after, "rev": revision}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_continue(token: str) -> tuple[str, int]:
    """Inverse of :func:`encode_continue`; raises :class:`InvalidContinue`."""
    try:
        obj = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        after, rev = obj["after"], obj["rev"]
    except (ValueError, TypeError, KeyError, binascii.Error) as exc:
        raise InvalidContinue("continue: not a token this server issued") from exc
    if not isinstance(after, str) or not after or not isinstance(rev, int) or rev < 0:
        raise InvalidContinue("continue: not a token this server issued")
    return after, rev


@dataclass(frozen=True)
class AuditRecord:
    """One decision or event: who did what to which CSR, when and why."""

    csr: str
    action: str
    """``created``, ``approved``, ``denied``, ``failed``, ``issued``, ``queued``, ``deleted``."""
    actor: str
    reason: str = ""
    message: str = ""
    time: str = ""

    def to_dict(self) -> dict[str, str]:
        """JSON-able form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AuditRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: str(d.get(k, "")) for k in ("csr", "action", "actor", "reason", "message", "time")})

    @classmethod
    def now(cls, csr: str, action: str, actor: str, reason: str = "", message: str = "",
            when: dt.datetime | None = None) -> AuditRecord:
        """A record stamped with the current time."""
        return cls(csr, action, actor, reason, message, now_rfc3339(when))


class Store(Protocol):
    """Persistence for the CSR API."""

    async def create_csr(self, csr: CSR, fence: Fence | None = None) -> CSR:
        """Store a new CSR; returns it with its ``resource_version``. Raises :class:`AlreadyExists`, or
        :class:`LockLost` when ``fence`` is given and its lock is no longer held (checked in the same transaction)."""
        ...

    async def get_csr(self, name: str) -> CSR:
        """Raises :class:`NotFound`."""
        ...

    async def list_csrs(self) -> list[CSR]:
        """Every CSR, oldest first (read in pages, one consistent snapshot)."""
        ...

    async def list_csrs_page(self, limit: int, continue_token: str = "") -> tuple[list[CSR], str]:
        """At most ``limit`` CSRs in name order, starting after ``continue_token``; (items, next token or "").
        Raises :class:`InvalidContinue`."""
        ...

    async def replace_csr(self, csr: CSR, fence: Fence | None = None) -> CSR:
        """Write ``csr`` if nobody changed it since ``csr.resource_version``; raises :class:`Conflict`, or
        :class:`LockLost` when ``fence`` is given and its lock is no longer held (same transaction)."""
        ...

    async def delete_csr(self, name: str) -> CSR:
        """Remove a CSR and return it as it was; raises :class:`NotFound`. Its audit records stay."""
        ...

    async def put_token(self, token: BootstrapToken) -> None:
        """Store a new bootstrap token; raises :class:`AlreadyExists` if the id is taken."""
        ...

    async def get_token(self, token_id: str) -> BootstrapToken | None:
        """The token with that id, or None."""
        ...

    async def list_tokens(self) -> list[BootstrapToken]:
        """Every bootstrap token."""
        ...

    async def delete_token(self, token_id: str) -> bool:
        """Remove a token; False when there was none."""
        ...

    async def append_audit(self, record: AuditRecord) -> None:
        """Append to the audit log (records are never changed or removed)."""
        ...

    async def list_audit(self, csr: str | None = None) -> list[AuditRecord]:
        """The audit log, oldest first, optionally for one CSR."""
        ...

    async def acquire_lock(self, name: str, owner: str, ttl: float) -> Fence | None:
        """Take the lock ``name`` if it is free or already ``owner``'s; None if another owner holds it. The lock
        lasts while its holder is alive (etcd: a lease of ``ttl`` seconds kept alive by the holder; SQLite: ``ttl``
        seconds of the host's clock, renewed by taking it again). Masters sharing a store use it to make one
        decision at a time; the writes that decision makes carry the returned :class:`Fence`."""
        ...

    async def release_lock(self, fence: Fence) -> None:
        """Release the lock if it is still the one ``fence`` proves (otherwise nothing happens)."""
        ...

    def endpoint_health(self) -> dict[str, bool]:
        """Each endpoint of a networked store and whether its last attempt was served (etcd); {} for a file."""
        ...

    async def check_schema(self) -> None:
        """Make sure the store's layout is this version's (writing the version on a new store); raises
        :class:`StoreError` when an older version's locks are still live (stop every master before upgrading) or a
        newer version wrote the store."""
        ...

    async def close(self) -> None:
        """Release connections (and the locks this process holds)."""
        ...


async def update_csr(store: Store, name: str, mutate: Callable[[CSR], object], attempts: int = 20,
                     fence: Fence | None = None) -> CSR:
    """Read ``name``, apply ``mutate`` (which may raise to abort), write back (fenced by ``fence`` if given); retry
    on :class:`Conflict`."""
    for _ in range(attempts):
        csr = await store.get_csr(name)
        mutate(csr)
        try:
            return await store.replace_csr(csr, fence)
        except Conflict:
            continue
    raise Conflict(f"{name}: changed concurrently {attempts} times in a row")

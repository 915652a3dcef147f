"""Locks in etcd that no clock can break: a lease owned by this master, and a fencing check in the guarded writes.

How it works: the first lock a master takes grants it one etcd lease (``ttl`` seconds, at least etcd's minimum of
2); a background task renews it every third of the TTL with etcd's keepalive. A lock is the key
``<prefix>/locks/<name>`` created with that lease (``create_revision == 0`` in the transaction), value
``{"owner"}``. If the master dies or stalls (SIGSTOP, a hung disk, an etcd that answers slowly) its keepalives stop
and etcd itself deletes the key when the lease runs out: the lease is timed by etcd's leader alone, so masters' clocks
never matter. The :class:`~certs.store.Fence` a lock returns carries the key's ``create_revision``; every write the
lock guards compares it in the same transaction (:meth:`LeaseLocks.compare`), so a master that lost its lock while
stalled can never complete a write under it, even if it does not know yet. A lock that may have been stored under
this master's lease without its knowing (the answer to the take was lost, or a release failed) is cleared by the
keepalive loop, or by the next take of that lock here: otherwise it would block the node while the master lives.

Schema: ``<prefix>/schema`` holds :data:`~certs.store.SCHEMA_VERSION`. A store without it is version 1, whose locks
were wall-clock ``{"owner", "expires"}`` values without a lease; :meth:`LeaseLocks.check_schema` refuses such a store
while one of those is still live (an old master may be deciding), deletes the expired ones and writes the version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from typing import Any

from certs.etcd_client import Ambiguous, EtcdClient, EtcdError, b64, unb64
from certs.store import SCHEMA_VERSION, Fence, StoreError

log = logging.getLogger("certs.etcd")

MIN_TTL = 2
"""etcd's smallest lease TTL with its default timing (it rounds shorter ones up)."""
STRAY_WATCH = 120.0
"""Seconds a lock that may have been stored under our lease without our knowing is watched and cleared."""


def _holder(kv: dict[str, Any]) -> str | None:
    try:
        owner = json.loads(unb64(kv["value"])).get("owner")
    except (ValueError, AttributeError, KeyError):
        return None
    return str(owner) if owner is not None else None


class LeaseLocks:
    """The locks of one master (one lease) under ``prefix``."""

    def __init__(self, etcd: EtcdClient, prefix: str) -> None:
        """``prefix`` is the store's key prefix."""
        self.etcd = etcd
        self.prefix = prefix
        self.lease: int | None = None
        self._ttl = 0
        self._granting = asyncio.Lock()
        self._keepalive: asyncio.Task[None] | None = None
        self._schema_ok = False
        self._active: set[tuple[str, str]] = set()
        """(name, owner) of the locks this process holds or is taking."""
        self._strays: dict[str, float] = {}
        """Lock name -> until when to watch it: it may be held under our lease by nobody (see _clear_stray)."""

    def key(self, name: str) -> str:
        """The lock's key."""
        return f"{self.prefix}/locks/{name}"

    def compare(self, fence: Fence) -> dict[str, Any]:
        """The transaction compare that holds only while ``fence``'s lock is still the one it proved."""
        return {"key": b64(self.key(fence.name)), "result": "EQUAL", "target": "CREATE",
                "create_revision": str(fence.token)}

    async def _lease_id(self, ttl: float) -> int:
        async with self._granting:
            if self.lease is None:
                self._ttl = max(MIN_TTL, math.ceil(ttl))
                self.lease = await self.etcd.grant(self._ttl)
                self._keepalive = asyncio.create_task(self._keep(self.lease), name=f"etcd-lease-{self.lease:x}")
                log.info("etcd lease %x granted (%d s)", self.lease, self._ttl)
            return self.lease

    def _lost(self, lease: int) -> None:
        if self.lease == lease:
            self.lease = None

    async def _keep(self, lease: int) -> None:
        """Renew ``lease`` every third of its TTL until it is gone (then the next lock grants a new one); clear stray
        locks under it meanwhile."""
        while self.lease == lease:
            await asyncio.sleep(self._ttl / 3)
            try:
                left = await self.etcd.keepalive(lease)
            except StoreError as exc:
                log.warning("etcd lease %x: keepalive failed: %s", lease, exc)
                continue
            if left <= 0:
                log.warning("etcd lease %x expired: the locks held under it are lost", lease)
                self._lost(lease)
                return
            if self._strays:
                await self._sweep(lease)

    async def acquire(self, name: str, owner: str, ttl: float) -> Fence | None:
        """Take ``name`` for ``owner`` (see :meth:`certs.store.Store.acquire_lock`)."""
        await self.check_schema()
        key = b64(self.key(name))
        for _ in range(4):
            lease = await self._lease_id(ttl)
            self._active.add((name, owner))  # from before the write: a sweep never takes a lock being taken
            fence: Fence | None = None
            try:
                resp = await self.etcd.txn(
                    [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
                    [{"request_put": {"key": key, "value": b64(json.dumps({"owner": owner})), "lease": str(lease)}}],
                    [{"request_range": {"key": key}}])
                if resp.get("succeeded"):
                    fence = Fence(name, owner, int(resp["header"]["revision"]))
                    return fence
                kvs = resp["responses"][0]["response_range"].get("kvs") or []
                fence = self._ours(name, owner, lease, kvs[0] if kvs else None)
                if fence is None and kvs and await self._clear_stray(name, lease, kvs[0]):
                    continue
                return fence
            except EtcdError as exc:
                if exc.status == 404 and "lease" in exc.message:  # our lease ran out (we were stalled)
                    self._lost(lease)
                    continue
                raise
            except Ambiguous:  # it may be stored, now or later, under our lease: watch it until it is cleared
                self._strays[name] = time.monotonic() + STRAY_WATCH
                fence = self._ours(name, owner, lease, await self.etcd.get(self.key(name)))
                return fence
            finally:
                if fence is None:
                    self._active.discard((name, owner))
        return None

    @staticmethod
    def _ours(name: str, owner: str, lease: int, kv: dict[str, Any] | None) -> Fence | None:
        if kv is None or int(kv.get("lease", 0)) != lease:
            return None
        return Fence(name, owner, int(kv["create_revision"])) if _holder(kv) == owner else None

    async def _clear_stray(self, name: str, lease: int, kv: dict[str, Any]) -> bool:
        """A lock under this master's lease whose owner holds no fence here (a take whose answer was lost, a release
        that failed) would block the node for as long as this master lives; nothing can be written under it, so it
        is deleted. True if it was."""
        if int(kv.get("lease", 0)) != lease or (name, _holder(kv)) in self._active:
            return False
        resp = await self.etcd.txn([{"key": kv["key"], "result": "EQUAL", "target": "CREATE",
                                     "create_revision": str(kv["create_revision"])}],
                                   [{"request_delete_range": {"key": kv["key"]}}])
        if resp.get("succeeded"):
            log.info("released the stray lock %s", name)
        return bool(resp.get("succeeded"))

    async def _sweep(self, lease: int) -> None:
        now = time.monotonic()
        for name, until in list(self._strays.items()):
            try:
                kv = await self.etcd.get(self.key(name))
                if (kv is not None and await self._clear_stray(name, lease, kv)) or until < now:
                    self._strays.pop(name, None)
            except StoreError as exc:
                log.info("stray lock %s not checked: %s", name, exc)

    async def release(self, fence: Fence) -> None:
        """Delete the lock if it is still ``fence``'s (if that fails, the keepalive loop clears it later)."""
        self._active.discard((fence.name, fence.owner))
        try:
            await self.etcd.txn([self.compare(fence)], [{"request_delete_range": {"key": b64(self.key(fence.name))}}])
        except StoreError:
            self._strays[fence.name] = time.monotonic() + STRAY_WATCH
            raise

    async def check_schema(self) -> None:
        """See the module comment; once per process."""
        if self._schema_ok:
            return
        schema = f"{self.prefix}/schema"
        kv = await self.etcd.get(schema)
        if kv is None:
            now = time.time()
            for old in await self.etcd.range_prefix(f"{self.prefix}/locks/"):
                if int(old.get("lease", 0)) != 0:
                    continue  # a lease lock: another master of this version wrote the version meanwhile
                try:
                    expires = float(json.loads(unb64(old["value"])).get("expires", 0))
                except (ValueError, TypeError, AttributeError):
                    expires = 0.0
                if expires >= now:
                    raise StoreError(f"{unb64(old['key']).decode(errors='replace')}: a lock of an older tunneld is "
                                     "still held; stop every master before upgrading, then start the new version")
                await self.etcd.txn([{"key": old["key"], "result": "EQUAL", "target": "MOD",
                                      "mod_revision": str(old["mod_revision"])}],
                                    [{"request_delete_range": {"key": old["key"]}}])
            await self.etcd.txn([{"key": b64(schema), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
                                [{"request_put": {"key": b64(schema), "value": b64(str(SCHEMA_VERSION))}}])
            kv = await self.etcd.get(schema)
        version = unb64(kv["value"]).decode(errors="replace") if kv else ""
        if version != str(SCHEMA_VERSION):
            raise StoreError(f"{schema} is {version[:20]!r}: this tunneld uses store version {SCHEMA_VERSION} "
                             "(a newer version wrote this store?)")
        self._schema_ok = True

    async def close(self) -> None:
        """Stop renewing and revoke the lease: every lock this master holds is released at once."""
        task, self._keepalive = self._keepalive, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        lease, self.lease = self.lease, None
        if lease is not None:
            try:
                await self.etcd.revoke(lease)
            except StoreError as exc:  # it runs out by itself
                log.warning("etcd lease %x not revoked: %s", lease, exc)

"""Locks in etcd that no clock can break: a lease owned by this master, and a fencing check in the guarded writes.

How it works: the first lock a master takes grants it one etcd lease (``ttl`` seconds, at least etcd's minimum of
2); a background task renews it every third of the TTL with etcd's keepalive. A lock is the key
``<prefix>/locks/<name>`` created with that lease (``create_revision == 0`` in the transaction), value
``{"owner"}``. If the master dies or stalls (SIGSTOP, a hung disk, an etcd that answers slowly) its keepalives stop
and etcd itself deletes the key when the lease runs out: the lease is timed by etcd's leader alone, so masters' clocks
never matter. The :class:`~certs.store.Fence` a lock returns carries the key's ``create_revision``; every write the
lock guards compares it in the same transaction (:meth:`LeaseLocks.compare`), so a master that lost its lock while
stalled can never complete a write under it, even if it does not know yet.

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
        """Renew ``lease`` every third of its TTL until it is gone (then the next lock grants a new one)."""
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

    async def acquire(self, name: str, owner: str, ttl: float) -> Fence | None:
        """Take ``name`` for ``owner`` (see :meth:`certs.store.Store.acquire_lock`)."""
        await self.check_schema()
        key = b64(self.key(name))
        for _ in range(3):
            lease = await self._lease_id(ttl)
            try:
                resp = await self.etcd.txn(
                    [{"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}],
                    [{"request_put": {"key": key, "value": b64(json.dumps({"owner": owner})), "lease": str(lease)}}],
                    [{"request_range": {"key": key}}])
            except EtcdError as exc:
                if exc.status == 404 and "lease" in exc.message:  # our lease ran out (we were stalled)
                    self._lost(lease)
                    continue
                raise
            except Ambiguous:
                kv = await self.etcd.get(self.key(name))
                return self._ours(name, owner, lease, kv)
            if resp.get("succeeded"):
                return Fence(name, owner, int(resp["header"]["revision"]))
            kvs = resp["responses"][0]["response_range"].get("kvs") or []
            return self._ours(name, owner, lease, kvs[0] if kvs else None)
        return None

    @staticmethod
    def _ours(name: str, owner: str, lease: int, kv: dict[str, Any] | None) -> Fence | None:
        if kv is None or int(kv.get("lease", 0)) != lease:
            return None
        try:
            held = json.loads(unb64(kv["value"]))
        except ValueError:
            return None
        return Fence(name, owner, int(kv["create_revision"])) if held.get("owner") == owner else None

    async def release(self, fence: Fence) -> None:
        """Delete the lock if it is still ``fence``'s."""
        key = b64(self.key(fence.name))
        await self.etcd.txn([self.compare(fence)], [{"request_delete_range": {"key": key}}])

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

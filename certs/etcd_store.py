"""etcd backend of :class:`certs.store.Store`, over etcd v3's JSON gRPC gateway (see :mod:`certs.etcd_client`).

Keys (values are JSON, keys and values base64 on the wire)::

    <prefix>/csrs/<name>            the CSR record; resource_version = the key's mod_revision
    <prefix>/tokens/<id>            a bootstrap token
    <prefix>/audit/<csr>/<ns>-<rnd> one audit record, written once, never updated
    <prefix>/locks/<name>           {"owner"} under the master's lease: a decision under way (certs.etcd_locks)
    <prefix>/schema                 the store's layout version

Creation is a transaction comparing ``create_revision == 0`` (the key does not exist); updates compare
``mod_revision`` with the version read, so concurrent writers from several masters never overwrite each other. A
write made under a lock also compares the lock key's ``create_revision`` (a fence): it fails with
:class:`~certs.store.LockLost` once the lock has run out, whatever the writer believes.

A write whose answer was lost (:class:`~certs.etcd_client.Ambiguous`: a timeout, a member that went away) is not
simply retried: the key is read back first, and a stored value carrying this request's ``metadata.uid`` (a CSR) or
exactly this value (an update, an audit record) counts as done. Lists are read in pages at one revision;
:meth:`EtcdStore.list_csrs_page` hands out a continuation that pins it.
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from certs.csr import CSR
from certs.etcd_client import Ambiguous, EtcdClient, EtcdError, b64, prefix_end, unb64
from certs.etcd_locks import LeaseLocks
from certs.store import (
    AlreadyExists,
    AuditRecord,
    Conflict,
    Fence,
    InvalidContinue,
    LockLost,
    NotFound,
    StoreError,
    decode_continue,
    encode_continue,
)
from certs.tokens import BootstrapToken


def client_tls(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """TLS for etcd's https endpoints: verify the servers against ``ca`` (default: the system's trust store) and
    present ``cert``/``key`` when etcd checks client certificates. Raises :class:`StoreError` naming the file."""
    try:
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise StoreError(f"etcd_ca {ca}: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise StoreError(f"etcd_cert {cert} / etcd_key {key}: {exc}") from exc
    return context


def _csr(kv: dict[str, Any]) -> CSR:
    return CSR.from_record(json.loads(unb64(kv["value"])), str(kv["mod_revision"]))


def _kvs(resp: dict[str, Any], index: int) -> list[dict[str, Any]]:
    """The kvs of the ``index``-th range in a transaction's answer."""
    responses = resp.get("responses") or []
    if index >= len(responses):
        return []
    return list((responses[index].get("response_range") or {}).get("kvs") or [])


class EtcdStore:
    """A :class:`~certs.store.Store` in etcd (v3 API via the JSON gateway)."""

    def __init__(self, endpoints: Sequence[str], prefix: str = "/tunneld/certs", timeout: float = 3.0,
                 tls: ssl.SSLContext | None = None) -> None:
        """``timeout`` bounds one attempt on one endpoint; ``tls`` is used for https endpoints (see
        :func:`client_tls`); without it, the system's trust store."""
        self.etcd = EtcdClient(endpoints, timeout, tls)
        self.endpoints = self.etcd.endpoints
        self.prefix = "/" + prefix.strip("/")
        self.locks = LeaseLocks(self.etcd, self.prefix)

    def _key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.etcd.call(path, body, write=path != "/v3/kv/range")

    async def _range(self, key: str, prefix: bool = False) -> list[dict[str, Any]]:
        if prefix:
            return await self.etcd.range_prefix(key)
        kv = await self.etcd.get(key)
        return [kv] if kv is not None else []

    async def _txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                   failure: list[dict[str, Any]], settled: Callable[[], Awaitable[int | None]]) -> dict[str, Any]:
        """A write transaction. When its answer is lost, ``settled()`` reads back: a revision means the write is
        known to be stored (a synthetic success answer), None that it is not (the transaction is sent again)."""
        for attempt in range(3):
            try:
                resp = await self.etcd.txn(compare, success, failure)
                return {**resp, "resent": attempt > 0}
            except Ambiguous:
                rev = await settled()
                if rev is not None:
                    return {"succeeded": True, "header": {"revision": str(rev)}}
        raise StoreError("etcd: a write's answer was lost three times in a row; try again")

    async def _txn_put(self, key: str, value: str, target: str, revision: int) -> int | None:
        """Put ``value`` if the key's ``target`` revision equals ``revision``; the new mod_revision, or None."""
        field = "create_revision" if target == "CREATE" else "mod_revision"

        async def settled() -> int | None:
            kv = await self.etcd.get(key)
            return int(kv["mod_revision"]) if kv is not None and unb64(kv["value"]) == value.encode() else None

        resp = await self._txn([{"key": b64(key), "result": "EQUAL", "target": target, field: str(revision)}],
                               [{"request_put": {"key": b64(key), "value": b64(value)}}],
                               [{"request_range": {"key": b64(key)}}], settled)
        if not resp.get("succeeded", False):
            kvs = _kvs(resp, 0)  # an earlier attempt whose answer was lost may have landed after the read-back
            ours = resp["resent"] and kvs and unb64(kvs[0]["value"]) == value.encode()
            return int(kvs[0]["mod_revision"]) if ours else None
        return int(resp["header"]["revision"])

    def _fenced(self, key: str, compare: dict[str, Any], value: str, fence: Fence | None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        """compare/success/failure of a CSR write, fenced by ``fence``; the failure branch reads both keys."""
        compares, failure = [compare], [{"request_range": {"key": b64(key)}}]
        if fence is not None:
            compares.append(self.locks.compare(fence))
            failure.append({"request_range": {"key": b64(self.locks.key(fence.name))}})
        return compares, [{"request_put": {"key": b64(key), "value": b64(value)}}], failure

    async def create_csr(self, csr: CSR, fence: Fence | None = None) -> CSR:
        key, value = self._key("csrs", csr.name), json.dumps(csr.to_record())

        async def settled() -> int | None:  # stored by this very request (its uid), not by a client's retry
            kv = await self.etcd.get(key)
            if kv is None or _csr(kv).metadata_uid != csr.metadata_uid:
                return None
            return int(kv["mod_revision"])

        resp = await self._txn(*self._fenced(key, {"key": b64(key), "result": "EQUAL", "target": "CREATE",
                                                   "create_revision": "0"}, value, fence), settled)
        if not resp.get("succeeded", False):
            kvs = _kvs(resp, 0)
            if kvs and _csr(kvs[0]).metadata_uid == csr.metadata_uid:  # an earlier attempt of ours landed late
                csr.resource_version = str(kvs[0]["mod_revision"])
                return csr
            if kvs:
                raise AlreadyExists(f"certificatesigningrequests {csr.name!r} already exists")
            raise LockLost(f"lost the lock {fence.name if fence else '?'} before storing {csr.name!r}; try again")
        csr.resource_version = str(resp["header"]["revision"])
        return csr

    async def get_csr(self, name: str) -> CSR:
        kvs = await self._range(self._key("csrs", name))
        if not kvs:
            raise NotFound(f"certificatesigningrequests {name!r} not found")
        return _csr(kvs[0])

    async def list_csrs(self) -> list[CSR]:
        kvs = await self._range(self._key("csrs", ""), prefix=True)
        kvs.sort(key=lambda kv: int(kv["create_revision"]))
        return [_csr(kv) for kv in kvs]

    async def list_csrs_page(self, limit: int, continue_token: str = "") -> tuple[list[CSR], str]:
        base = self._key("csrs", "")
        start, revision = base.encode(), 0
        if continue_token:
            after, revision = decode_continue(continue_token)
            start = (base + after).encode() + b"\x00"
        try:
            kvs, revision, more = await self.etcd.range_page(start, prefix_end(base.encode()), max(1, limit),
                                                             revision)
        except EtcdError as exc:
            if "compacted" in exc.message:
                raise InvalidContinue("continue: the list's snapshot was compacted; list again", True) from exc
            raise
        items = [_csr(kv) for kv in kvs]
        return items, encode_continue(items[-1].name, revision) if more and items else ""

    async def replace_csr(self, csr: CSR, fence: Fence | None = None) -> CSR:
        key, value, old = self._key("csrs", csr.name), json.dumps(csr.to_record()), int(csr.resource_version or 0)

        async def settled() -> int | None:
            kv = await self.etcd.get(key)
            return int(kv["mod_revision"]) if kv is not None and unb64(kv["value"]) == value.encode() else None

        resp = await self._txn(*self._fenced(key, {"key": b64(key), "result": "EQUAL", "target": "MOD",
                                                   "mod_revision": str(old)}, value, fence), settled)
        if not resp.get("succeeded", False):
            kvs = _kvs(resp, 0)
            if not kvs:
                raise NotFound(f"certificatesigningrequests {csr.name!r} not found")
            if resp["resent"] and unb64(kvs[0]["value"]) == value.encode():  # an earlier attempt landed late
                csr.resource_version = str(kvs[0]["mod_revision"])
                return csr
            if int(kvs[0]["mod_revision"]) != old:
                raise Conflict(f"certificatesigningrequests {csr.name!r} was modified; read it again")
            raise LockLost(f"lost the lock {fence.name if fence else '?'} before updating {csr.name!r}")
        csr.resource_version = str(resp["header"]["revision"])
        return csr

    async def delete_csr(self, name: str) -> CSR:
        resp = await self._call("/v3/kv/deleterange", {"key": b64(self._key("csrs", name)), "prev_kv": True})
        prev = resp.get("prev_kvs") or []
        if not prev:
            raise NotFound(f"certificatesigningrequests {name!r} not found")
        return _csr(prev[0])

    async def put_token(self, token: BootstrapToken) -> None:
        rev = await self._txn_put(self._key("tokens", token.token_id), json.dumps(token.to_dict()), "CREATE", 0)
        if rev is None:
            raise AlreadyExists(f"bootstrap token {token.token_id!r} already exists")

    async def get_token(self, token_id: str) -> BootstrapToken | None:
        kvs = await self._range(self._key("tokens", token_id))
        return BootstrapToken.from_dict(json.loads(unb64(kvs[0]["value"]))) if kvs else None

    async def list_tokens(self) -> list[BootstrapToken]:
        kvs = await self._range(self._key("tokens", ""), prefix=True)
        return sorted((BootstrapToken.from_dict(json.loads(unb64(kv["value"]))) for kv in kvs),
                      key=lambda t: t.token_id)

    async def delete_token(self, token_id: str) -> bool:
        resp = await self._call("/v3/kv/deleterange", {"key": b64(self._key("tokens", token_id))})
        return int(resp.get("deleted", 0)) > 0

    async def append_audit(self, record: AuditRecord) -> None:
        key = self._key("audit", record.csr, f"{time.time_ns():020d}-{secrets.token_hex(4)}")
        if await self._txn_put(key, json.dumps(record.to_dict()), "CREATE", 0) is None:
            raise StoreError(f"audit key collision at {key}")

    async def list_audit(self, csr: str | None = None) -> list[AuditRecord]:
        prefix = self._key("audit", csr, "") if csr is not None else self._key("audit", "")
        kvs = await self._range(prefix, prefix=True)
        kvs.sort(key=lambda kv: int(kv["create_revision"]))
        return [AuditRecord.from_dict(json.loads(unb64(kv["value"]))) for kv in kvs]

    async def acquire_lock(self, name: str, owner: str, ttl: float) -> Fence | None:
        return await self.locks.acquire(name, owner, ttl)

    async def release_lock(self, fence: Fence) -> None:
        await self.locks.release(fence)

    def endpoint_health(self) -> dict[str, bool]:
        return dict(self.etcd.healthy)

    async def check_schema(self) -> None:
        await self.locks.check_schema()

    async def close(self) -> None:
        await self.locks.close()
        await self.etcd.close()

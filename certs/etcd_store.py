"""etcd backend of :class:`certs.store.Store`, over etcd v3's JSON gRPC gateway (see :mod:`certs.etcd_client`).

Keys (values are JSON, keys and values base64 on the wire)::

    <prefix>/csrs/<name>            the CSR record; resource_version = the key's mod_revision
    <prefix>/tokens/<id>            a bootstrap token
    <prefix>/audit/<csr>/<ns>-<rnd> one audit record, written once, never updated
    <prefix>/locks/<name>           {"owner", "expires"}: a decision under way on one master

Creation is a transaction comparing ``create_revision == 0`` (the key does not exist); updates compare
``mod_revision`` with the version read, so concurrent writers from several masters never overwrite each other.
Lists are read in pages at one revision; :meth:`EtcdStore.list_csrs_page` hands out a continuation that pins it.
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from certs.csr import CSR
from certs.etcd_client import EtcdClient, EtcdError, b64, prefix_end, unb64
from certs.store import (
    AlreadyExists,
    AuditRecord,
    Conflict,
    InvalidContinue,
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


class EtcdStore:
    """A :class:`~certs.store.Store` in etcd (v3 API via the JSON gateway)."""

    def __init__(self, endpoints: Sequence[str], prefix: str = "/tunneld/certs", timeout: float = 3.0,
                 tls: ssl.SSLContext | None = None) -> None:
        """``timeout`` bounds one attempt on one endpoint; ``tls`` is used for https endpoints (see
        :func:`client_tls`); without it, the system's trust store."""
        self.etcd = EtcdClient(endpoints, timeout, tls)
        self.endpoints = self.etcd.endpoints
        self.prefix = "/" + prefix.strip("/")

    def _key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.etcd.call(path, body, write=path != "/v3/kv/range")

    async def _range(self, key: str, prefix: bool = False) -> list[dict[str, Any]]:
        if prefix:
            return await self.etcd.range_prefix(key)
        kv = await self.etcd.get(key)
        return [kv] if kv is not None else []

    async def _txn_put(self, key: str, value: str, target: str, revision: int) -> int | None:
        """Put ``value`` if the key's ``target`` revision equals ``revision``; the new mod_revision, or None."""
        field = "create_revision" if target == "CREATE" else "mod_revision"
        resp = await self.etcd.txn([{"key": b64(key), "result": "EQUAL", "target": target, field: str(revision)}],
                                   [{"request_put": {"key": b64(key), "value": b64(value)}}])
        if not resp.get("succeeded", False):
            return None
        return int(resp["header"]["revision"])

    async def create_csr(self, csr: CSR) -> CSR:
        rev = await self._txn_put(self._key("csrs", csr.name), json.dumps(csr.to_record()), "CREATE", 0)
        if rev is None:
            raise AlreadyExists(f"certificatesigningrequests {csr.name!r} already exists")
        csr.resource_version = str(rev)
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

    async def replace_csr(self, csr: CSR) -> CSR:
        rev = await self._txn_put(self._key("csrs", csr.name), json.dumps(csr.to_record()), "MOD",
                                  int(csr.resource_version or 0))
        if rev is None:
            await self.get_csr(csr.name)
            raise Conflict(f"certificatesigningrequests {csr.name!r} was modified; read it again")
        csr.resource_version = str(rev)
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

    async def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        key = self._key("locks", name)
        value = json.dumps({"owner": owner, "expires": time.time() + ttl})
        for _ in range(3):  # the lock may vanish between a failed create and the read
            if await self._txn_put(key, value, "CREATE", 0) is not None:
                return True
            kvs = await self._range(key)
            if not kvs:
                continue
            held = json.loads(unb64(kvs[0]["value"]))
            if held.get("owner") != owner and float(held.get("expires", 0)) >= time.time():
                return False
            # Expired, or ours: take it over unless someone else did first.
            return await self._txn_put(key, value, "MOD", int(kvs[0]["mod_revision"])) is not None
        return False

    async def release_lock(self, name: str, owner: str) -> None:
        key = self._key("locks", name)
        kvs = await self._range(key)
        if not kvs or json.loads(unb64(kvs[0]["value"])).get("owner") != owner:
            return
        await self.etcd.txn([{"key": b64(key), "result": "EQUAL", "target": "MOD",
                              "mod_revision": str(kvs[0]["mod_revision"])}],
                            [{"request_delete_range": {"key": b64(key)}}])

    async def close(self) -> None:
        await self.etcd.close()

"""etcd backend of :class:`certs.store.Store`, over etcd v3's JSON gRPC gateway (``/v3/kv/*``) with aiohttp.

Keys (values are JSON, keys and values base64 on the wire)::

    <prefix>/csrs/<name>            the CSR record; resource_version = the key's mod_revision
    <prefix>/tokens/<id>            a bootstrap token
    <prefix>/audit/<csr>/<ns>-<rnd> one audit record, written once, never updated
    <prefix>/locks/<name>           {"owner", "expires"}: a decision under way on one master

Creation is a transaction comparing ``create_revision == 0`` (the key does not exist); updates compare
``mod_revision`` with the version read, so concurrent writers from several masters never overwrite each other.
Endpoints are tried in order when one cannot be reached.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from certs.csr import CSR
from certs.store import AlreadyExists, AuditRecord, Conflict, NotFound, StoreError
from certs.tokens import BootstrapToken

MAX_RESPONSE = 64 * 1024 * 1024


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def _prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end for a prefix)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


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


async def _read_body(resp: aiohttp.ClientResponse) -> bytes:
    """The whole response body, at most :data:`MAX_RESPONSE` bytes. ``content.read(n)`` returns what has arrived so
    far (one TLS record, say), so it is read until the end."""
    body = bytearray()
    while chunk := await resp.content.read(64 * 1024):
        body += chunk
        if len(body) > MAX_RESPONSE:
            raise StoreError(f"etcd answered more than {MAX_RESPONSE} bytes")
    return bytes(body)


class EtcdStore:
    """A :class:`~certs.store.Store` in etcd (v3 API via the JSON gateway)."""

    def __init__(self, endpoints: Sequence[str], prefix: str = "/tunneld/certs", timeout: float = 5.0,
                 tls: ssl.SSLContext | None = None) -> None:
        """``tls`` is used for https endpoints (see :func:`client_tls`); without it, the system's trust store."""
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self.prefix = "/" + prefix.strip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None

    def _key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    async def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else True)
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
        errors: list[str] = []
        for endpoint in self.endpoints:
            try:
                async with self._session.post(endpoint + path, json=body) as resp:
                    text = await _read_body(resp)
                    if resp.status != 200:
                        raise StoreError(f"etcd {endpoint}{path}: HTTP {resp.status}: {text[:300]!r}")
                    try:
                        return json.loads(text)  # type: ignore[no-any-return]
                    except ValueError as exc:
                        raise StoreError(f"etcd {endpoint}{path}: the answer is not JSON: {exc}") from exc
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                errors.append(f"{endpoint}: {exc or type(exc).__name__}")
        raise StoreError("no etcd endpoint answered: " + "; ".join(errors))

    async def _range(self, key: str, prefix: bool = False) -> list[dict[str, Any]]:
        body: dict[str, Any] = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(_prefix_end(key.encode()))
            body["sort_order"] = "ASCEND"
            body["sort_target"] = "CREATE"
        return list((await self._call("/v3/kv/range", body)).get("kvs", []))

    async def _txn_put(self, key: str, value: str, target: str, revision: int) -> int | None:
        """Put ``value`` if the key's ``target`` revision equals ``revision``; the new mod_revision, or None."""
        field = "create_revision" if target == "CREATE" else "mod_revision"
        body = {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": target, field: str(revision)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}],
        }
        resp = await self._call("/v3/kv/txn", body)
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
        return CSR.from_record(json.loads(_unb64(kvs[0]["value"])), str(kvs[0]["mod_revision"]))

    async def list_csrs(self) -> list[CSR]:
        kvs = await self._range(self._key("csrs", ""), prefix=True)
        return [CSR.from_record(json.loads(_unb64(kv["value"])), str(kv["mod_revision"])) for kv in kvs]

    async def replace_csr(self, csr: CSR) -> CSR:
        rev = await self._txn_put(self._key("csrs", csr.name), json.dumps(csr.to_record()), "MOD",
                                  int(csr.resource_version or 0))
        if rev is None:
            await self.get_csr(csr.name)
            raise Conflict(f"certificatesigningrequests {csr.name!r} was modified; read it again")
        csr.resource_version = str(rev)
        return csr

    async def delete_csr(self, name: str) -> CSR:
        resp = await self._call("/v3/kv/deleterange", {"key": _b64(self._key("csrs", name)), "prev_kv": True})
        prev = resp.get("prev_kvs") or []
        if not prev:
            raise NotFound(f"certificatesigningrequests {name!r} not found")
        return CSR.from_record(json.loads(_unb64(prev[0]["value"])), str(prev[0]["mod_revision"]))

    async def put_token(self, token: BootstrapToken) -> None:
        rev = await self._txn_put(self._key("tokens", token.token_id), json.dumps(token.to_dict()), "CREATE", 0)
        if rev is None:
            raise AlreadyExists(f"bootstrap token {token.token_id!r} already exists")

    async def get_token(self, token_id: str) -> BootstrapToken | None:
        kvs = await self._range(self._key("tokens", token_id))
        return BootstrapToken.from_dict(json.loads(_unb64(kvs[0]["value"]))) if kvs else None

    async def list_tokens(self) -> list[BootstrapToken]:
        kvs = await self._range(self._key("tokens", ""), prefix=True)
        return sorted((BootstrapToken.from_dict(json.loads(_unb64(kv["value"]))) for kv in kvs),
                      key=lambda t: t.token_id)

    async def delete_token(self, token_id: str) -> bool:
        resp = await self._call("/v3/kv/deleterange", {"key": _b64(self._key("tokens", token_id))})
        return int(resp.get("deleted", 0)) > 0

    async def append_audit(self, record: AuditRecord) -> None:
        key = self._key("audit", record.csr, f"{time.time_ns():020d}-{secrets.token_hex(4)}")
        if await self._txn_put(key, json.dumps(record.to_dict()), "CREATE", 0) is None:
            raise StoreError(f"audit key collision at {key}")

    async def list_audit(self, csr: str | None = None) -> list[AuditRecord]:
        prefix = self._key("audit", csr, "") if csr is not None else self._key("audit", "")
        kvs = await self._range(prefix, prefix=True)
        kvs.sort(key=lambda kv: int(kv["create_revision"]))
        return [AuditRecord.from_dict(json.loads(_unb64(kv["value"]))) for kv in kvs]

    async def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        key = self._key("locks", name)
        value = json.dumps({"owner": owner, "expires": time.time() + ttl})
        for _ in range(3):  # the lock may vanish between a failed create and the read
            if await self._txn_put(key, value, "CREATE", 0) is not None:
                return True
            kvs = await self._range(key)
            if not kvs:
                continue
            held = json.loads(_unb64(kvs[0]["value"]))
            if held.get("owner") != owner and float(held.get("expires", 0)) >= time.time():
                return False
            # Expired, or ours: take it over unless someone else did first.
            return await self._txn_put(key, value, "MOD", int(kvs[0]["mod_revision"])) is not None
        return False

    async def release_lock(self, name: str, owner: str) -> None:
        key = self._key("locks", name)
        kvs = await self._range(key)
        if not kvs or json.loads(_unb64(kvs[0]["value"])).get("owner") != owner:
            return
        await self._call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "result": "EQUAL", "target": "MOD",
                         "mod_revision": str(kvs[0]["mod_revision"])}],
            "success": [{"request_delete_range": {"key": _b64(key)}}],
        })

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

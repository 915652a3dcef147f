"""A small client for etcd v3's JSON gRPC gateway (``/v3/kv/*``, ``/v3/lease/*``) with aiohttp; etcd 3.4 and later.

How a call goes: endpoints are tried healthy-first (in configured order), then the ones that failed recently (an
endpoint that failed is remembered as bad for ``quarantine`` seconds). An endpoint that cannot serve (refused, reset,
timed out, or answering 408/429/5xx, which the gateway uses for "no leader", "request timed out", "the client
connection is closing") is marked bad and the next one is tried. For a *write*, an answer lost after the request was
sent is ambiguous (it may have been applied): :class:`Ambiguous` is raised at once so that the caller can read the
key back before deciding anything (see :mod:`certs.etcd_store`). Any other error answer (400, 404: a compacted
revision, an unknown lease) is definite and raised as :class:`EtcdError`.

Bodies are read whole, up to :data:`MAX_RESPONSE` bytes; ranges are read in pages (``limit`` plus a continuation at
the key after the last one) pinned to one revision, so a big store never needs one huge answer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from certs.store import StoreError

MAX_RESPONSE = 32 * 1024 * 1024
"""Largest answer read from etcd (a page of the biggest range is far smaller)."""
PAGE = 500
"""Keys per range page."""
MAX_PAGES = 100_000
QUARANTINE = 10.0
"""Seconds an endpoint that failed is tried only after the healthy ones."""
_CANNOT_SERVE = {408, 429, 500, 502, 503, 504}


class EtcdError(StoreError):
    """etcd answered with a definite error (HTTP ``status``, etcd's ``message``)."""

    def __init__(self, status: int, message: str) -> None:
        """Keep the status for callers that tell errors apart (404 unknown lease, 400 compacted)."""
        super().__init__(f"etcd answered {status}: {message}")
        self.status = status
        self.message = message


class Ambiguous(StoreError):
    """A write was sent but its answer was lost: it may or may not have been applied."""


def b64(data: str | bytes) -> str:
    """etcd's gateway wants keys and values base64-encoded."""
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def unb64(data: str) -> bytes:
    """Inverse of :func:`b64`."""
    return base64.b64decode(data)


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end for a prefix)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"


def describe(exc: BaseException) -> str:
    """A non-empty text for an exception (``str()`` of a timeout is empty)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _error_text(raw: bytes) -> str:
    """etcd's message from a gateway error body (``{"error", "message", "code"}``), else the raw text, shortened."""
    try:
        obj, _ = json.JSONDecoder().raw_decode(raw.decode("utf-8", errors="replace").lstrip())
        if isinstance(obj, dict) and (obj.get("message") or obj.get("error")):
            return str(obj.get("message") or obj.get("error"))[:300]
    except ValueError:
        pass
    return raw[:300].decode("utf-8", errors="replace").strip() or "(empty body)"


async def _read_bounded(resp: aiohttp.ClientResponse, url: str) -> bytes:
    if resp.content_length is not None and resp.content_length > MAX_RESPONSE:
        raise EtcdError(resp.status, f"{url}: answer of {resp.content_length} bytes is larger than {MAX_RESPONSE}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(256 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise EtcdError(resp.status, f"{url}: answer larger than {MAX_RESPONSE} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _Unserved(Exception):
    """This endpoint cannot serve now (internal: try the next one)."""

    def __init__(self, why: str, sent: bool) -> None:
        super().__init__(why)
        self.sent = sent


class EtcdClient:
    """The JSON gateway of one etcd cluster, reached through any of ``endpoints``."""

    def __init__(self, endpoints: Sequence[str], timeout: float = 3.0, tls: ssl.SSLContext | None = None,
                 quarantine: float = QUARANTINE, clock: Callable[[], float] = time.monotonic) -> None:
        """``timeout`` bounds one attempt on one endpoint; ``tls`` is used for https endpoints."""
        if not endpoints:
            raise ValueError("at least one etcd endpoint is required")
        self.endpoints = [e.rstrip("/") for e in endpoints]
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 1.0))
        self._tls = tls
        self._quarantine = quarantine
        self._clock = clock
        self._bad_until: dict[str, float] = {}
        self.healthy: dict[str, bool] = dict.fromkeys(self.endpoints, True)
        """Endpoint -> whether its last attempt was served (for metrics and readiness)."""
        self._session: aiohttp.ClientSession | None = None

    def _order(self) -> list[str]:
        now = self._clock()
        good = [e for e in self.endpoints if self._bad_until.get(e, 0.0) <= now]
        bad = sorted((e for e in self.endpoints if e not in good), key=lambda e: self._bad_until[e])
        return good + bad

    def _mark(self, endpoint: str, ok: bool) -> None:
        self.healthy[endpoint] = ok
        if ok:
            self._bad_until.pop(endpoint, None)
        else:
            self._bad_until[endpoint] = self._clock() + self._quarantine

    async def call(self, path: str, body: dict[str, Any], *, write: bool = False) -> dict[str, Any]:
        """POST ``body`` to ``path``; the decoded answer. Raises :class:`EtcdError`, :class:`Ambiguous` (writes
        only) or :class:`~certs.store.StoreError` when no endpoint could serve."""
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self._tls if self._tls is not None else True)
            self._session = aiohttp.ClientSession(timeout=self._timeout, connector=connector)
        errors: list[str] = []
        for endpoint in self._order():
            try:
                answer = await self._attempt(self._session, endpoint, path, body)
            except _Unserved as exc:
                self._mark(endpoint, False)
                if write and exc.sent:
                    raise Ambiguous(f"etcd {endpoint}{path}: {exc} (the write may have been applied)") from exc
                errors.append(f"{endpoint}: {exc}")
                continue
            self._mark(endpoint, True)
            return answer
        raise StoreError("no etcd endpoint answered: " + "; ".join(errors))

    async def _attempt(self, session: aiohttp.ClientSession, endpoint: str, path: str,
                       body: dict[str, Any]) -> dict[str, Any]:
        url = endpoint + path
        try:
            async with session.post(url, json=body) as resp:
                raw = await _read_bounded(resp, url)
                if resp.status in _CANNOT_SERVE:
                    raise _Unserved(f"HTTP {resp.status}: {_error_text(raw)}", sent=True)
                if resp.status != 200:
                    raise EtcdError(resp.status, f"{url}: {_error_text(raw)}")
        except (aiohttp.ClientConnectorError, ConnectionRefusedError) as exc:
            raise _Unserved(describe(exc), sent=False) from exc
        except ssl.SSLError as exc:  # a refused handshake: nothing was sent
            raise _Unserved(describe(exc), sent=False) from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Unserved(describe(exc), sent=True) from exc
        try:
            answer = json.loads(raw)
        except ValueError as exc:
            raise _Unserved(f"unreadable answer ({len(raw)} bytes): {describe(exc)}", sent=True) from exc
        if not isinstance(answer, dict):
            raise _Unserved("answer is not a JSON object", sent=True)
        return answer

    # -- kv ----------------------------------------------------------------------------------------------------

    async def get(self, key: str) -> dict[str, Any] | None:
        """The key's kv (``value`` base64, revisions as strings), or None."""
        kvs = (await self.call("/v3/kv/range", {"key": b64(key)})).get("kvs") or []
        first = kvs[0] if kvs else None
        return first if isinstance(first, dict) else None

    async def range_page(self, start: bytes, end: bytes, limit: int, revision: int = 0,
                         keys_only: bool = False) -> tuple[list[dict[str, Any]], int, bool]:
        """Keys in [start, end) in key order, at most ``limit``, at ``revision`` (0: now): (kvs, revision, more)."""
        body: dict[str, Any] = {"key": b64(start), "range_end": b64(end), "limit": str(limit)}
        if revision:
            body["revision"] = str(revision)
        if keys_only:
            body["keys_only"] = True
        resp = await self.call("/v3/kv/range", body)
        rev = int(resp.get("header", {}).get("revision", 0))
        return list(resp.get("kvs") or []), revision or rev, bool(resp.get("more", False))

    async def range_prefix(self, prefix: str, page: int = PAGE) -> list[dict[str, Any]]:
        """Every key under ``prefix``, read in pages at one revision (a consistent snapshot), in key order."""
        end = prefix_end(prefix.encode())
        start, revision, out = prefix.encode(), 0, []
        for _ in range(MAX_PAGES):
            kvs, revision, more = await self.range_page(start, end, page, revision)
            out.extend(kvs)
            if not more or not kvs:
                return out
            start = unb64(kvs[-1]["key"]) + b"\x00"
        raise StoreError(f"more than {MAX_PAGES} pages under {prefix}")

    async def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
                  failure: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One transaction (a write: :class:`Ambiguous` when its answer is lost)."""
        body: dict[str, Any] = {"compare": compare, "success": success}
        if failure:
            body["failure"] = failure
        return await self.call("/v3/kv/txn", body, write=True)

    # -- leases ------------------------------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd may round it up); its id."""
        resp = await self.call("/v3/lease/grant", {"TTL": str(ttl)}, write=True)
        if resp.get("error"):
            raise EtcdError(200, str(resp["error"]))
        return int(resp["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew ``lease``; the TTL etcd granted, 0 when the lease is gone (expired or revoked)."""
        resp = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = resp.get("result")
        return int(result.get("TTL", 0)) if isinstance(result, dict) else 0

    async def revoke(self, lease: int) -> None:
        """End ``lease`` now: every key attached to it is deleted."""
        try:
            await self.call("/v3/lease/revoke", {"ID": str(lease)}, write=True)
        except EtcdError as exc:
            if exc.status != 404:  # already gone
                raise

    async def close(self) -> None:
        """Release connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        await asyncio.sleep(0)

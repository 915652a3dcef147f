"""SQLite backend of :class:`certs.store.Store`: one file (0600), WAL journal, ``synchronous=FULL``.

Every committed change is on disk before the call returns, so a daemon restart loses nothing. The audit table has
triggers that abort any UPDATE or DELETE: it is append-only. Queries run in a worker thread so the event loop never
waits on the disk; a lock serialises them on the one connection. Several processes (the daemon and ``tunneld token
create``) may use the file at once; SQLite's locking plus a busy timeout handles that.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from certs.csr import CSR
from certs.store import AlreadyExists, AuditRecord, Conflict, NotFound, StoreError, decode_continue, encode_continue
from certs.tokens import BootstrapToken

SCHEMA = """
CREATE TABLE IF NOT EXISTS csrs (name TEXT PRIMARY KEY, version INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, csr TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS audit_csr ON audit (csr);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class SQLiteStore:
    """A :class:`~certs.store.Store` in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        try:
            self._db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    async def _q(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self._run, sql, args)

    async def create_csr(self, csr: CSR) -> CSR:
        try:
            await self._q("INSERT INTO csrs (name, version, data) VALUES (?, 1, ?)", csr.name,
                          json.dumps(csr.to_record()))
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"certificatesigningrequests {csr.name!r} already exists") from exc
        csr.resource_version = "1"
        return csr

    async def get_csr(self, name: str) -> CSR:
        rows = await self._q("SELECT version, data FROM csrs WHERE name = ?", name)
        if not rows:
            raise NotFound(f"certificatesigningrequests {name!r} not found")
        return CSR.from_record(json.loads(rows[0][1]), str(rows[0][0]))

    async def list_csrs(self) -> list[CSR]:
        rows = await self._q("SELECT version, data FROM csrs ORDER BY rowid")
        return [CSR.from_record(json.loads(data), str(version)) for version, data in rows]

    async def list_csrs_page(self, limit: int, continue_token: str = "") -> tuple[list[CSR], str]:
        after = decode_continue(continue_token)[0] if continue_token else ""
        rows = await self._q("SELECT version, data FROM csrs WHERE name > ? ORDER BY name LIMIT ?", after,
                             max(1, limit) + 1)
        items = [CSR.from_record(json.loads(data), str(version)) for version, data in rows[:max(1, limit)]]
        return items, encode_continue(items[-1].name) if len(rows) > max(1, limit) else ""

    async def replace_csr(self, csr: CSR) -> CSR:
        version = int(csr.resource_version or 0)
        rows = await self._q("UPDATE csrs SET version = version + 1, data = ? WHERE name = ? AND version = ? "
                             "RETURNING version", json.dumps(csr.to_record()), csr.name, version)
        if not rows:
            await self.get_csr(csr.name)  # NotFound if it is gone
            raise Conflict(f"certificatesigningrequests {csr.name!r} was modified; read it again")
        csr.resource_version = str(rows[0][0])
        return csr

    async def delete_csr(self, name: str) -> CSR:
        rows = await self._q("DELETE FROM csrs WHERE name = ? RETURNING version, data", name)
        if not rows:
            raise NotFound(f"certificatesigningrequests {name!r} not found")
        return CSR.from_record(json.loads(rows[0][1]), str(rows[0][0]))

    async def put_token(self, token: BootstrapToken) -> None:
        try:
            await self._q("INSERT INTO tokens (id, data) VALUES (?, ?)", token.token_id,
                          json.dumps(token.to_dict()))
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(f"bootstrap token {token.token_id!r} already exists") from exc

    async def get_token(self, token_id: str) -> BootstrapToken | None:
        rows = await self._q("SELECT data FROM tokens WHERE id = ?", token_id)
        return BootstrapToken.from_dict(json.loads(rows[0][0])) if rows else None

    async def list_tokens(self) -> list[BootstrapToken]:
        rows = await self._q("SELECT data FROM tokens ORDER BY id")
        return [BootstrapToken.from_dict(json.loads(r[0])) for r in rows]

    async def delete_token(self, token_id: str) -> bool:
        rows = await self._q("DELETE FROM tokens WHERE id = ? RETURNING id", token_id)
        return bool(rows)

    async def append_audit(self, record: AuditRecord) -> None:
        await self._q("INSERT INTO audit (csr, data) VALUES (?, ?)", record.csr, json.dumps(record.to_dict()))

    async def list_audit(self, csr: str | None = None) -> list[AuditRecord]:
        if csr is None:
            rows = await self._q("SELECT data FROM audit ORDER BY seq")
        else:
            rows = await self._q("SELECT data FROM audit WHERE csr = ? ORDER BY seq", csr)
        return [AuditRecord.from_dict(json.loads(r[0])) for r in rows]

    async def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        now = time.time()
        # One statement: insert, or take over a lock that expired or is already ours; a row comes back if we hold it.
        rows = await self._q("INSERT INTO locks (name, owner, expires) VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE "
                             "SET owner = excluded.owner, expires = excluded.expires "
                             "WHERE locks.expires < ? OR locks.owner = excluded.owner RETURNING owner",
                             name, owner, now + ttl, now)
        return bool(rows)

    async def release_lock(self, name: str, owner: str) -> None:
        await self._q("DELETE FROM locks WHERE name = ? AND owner = ?", name, owner)

    async def close(self) -> None:
        with self._lock:
            self._db.close()

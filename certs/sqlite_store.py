"""SQLite backend of :class:`certs.store.Store`: one file (0600), WAL journal, ``synchronous=FULL``.

Every committed change is on disk before the call returns, so a daemon restart loses nothing. The audit table has
triggers that abort any UPDATE or DELETE: it is append-only. Queries run in a worker thread so the event loop never
waits on the disk; a lock serialises them on the one connection. Several processes (the daemon and ``tunneld token
create``) may use the file at once; SQLite's locking plus a busy timeout handles that.

Locks (for masters on one host sharing the file) expire by the host's clock; each taking of a lock gets a new
generation from a counter, and a write fenced by a lock checks, in the same transaction, that the lock row still has
that generation and has not expired, so a process that stalled past its lock can never complete the write. The
``meta`` table holds the schema version; a file of version 1 (locks without generations) is upgraded when no lock in
it is live, and refused otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from certs.csr import CSR
from certs.store import (
    SCHEMA_VERSION,
    AlreadyExists,
    AuditRecord,
    Conflict,
    Fence,
    LockLost,
    NotFound,
    StoreError,
    decode_continue,
    encode_continue,
)
from certs.tokens import BootstrapToken

SCHEMA = """
CREATE TABLE IF NOT EXISTS csrs (name TEXT PRIMARY KEY, version INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL,
                                  token INTEGER NOT NULL);
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
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        self._lock = threading.Lock()

    def _migrate(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                columns = [r[1] for r in db.execute("PRAGMA table_info(locks)")]
                if columns and "token" not in columns:
                    live = db.execute("SELECT name FROM locks WHERE expires >= ?", (time.time(),)).fetchone()
                    if live is not None:
                        raise StoreError(f"{self.path}: lock {live[0]!r} of an older tunneld is still held; stop "
                                         "every master before upgrading, then start the new version")
                    db.execute("DROP TABLE locks")
                db.execute("INSERT INTO meta (key, value) VALUES ('schema', ?), ('lock_seq', '0')",
                           (str(SCHEMA_VERSION),))
            elif row[0] != str(SCHEMA_VERSION):
                raise StoreError(f"{self.path}: store version {row[0][:20]!r}, this tunneld uses {SCHEMA_VERSION}")
            for statement in SCHEMA.split(";\n"):
                if statement.strip():
                    db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _tx(self, work: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``work`` in one write transaction (BEGIN IMMEDIATE ... COMMIT)."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(self._db)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
                return result
            except sqlite3.IntegrityError:
                raise
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

    @staticmethod
    def _check_fence(db: sqlite3.Connection, fence: Fence | None) -> None:
        if fence is None:
            return
        row = db.execute("SELECT 1 FROM locks WHERE name = ? AND owner = ? AND token = ? AND expires >= ?",
                         (fence.name, fence.owner, fence.token, time.time())).fetchone()
        if row is None:
            raise LockLost(f"lost the lock {fence.name} (it expired); nothing was written")

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

    async def create_csr(self, csr: CSR, fence: Fence | None = None) -> CSR:
        def work(db: sqlite3.Connection) -> None:
            self._check_fence(db, fence)
            db.execute("INSERT INTO csrs (name, version, data) VALUES (?, 1, ?)", (csr.name,
                       json.dumps(csr.to_record())))

        try:
            await asyncio.to_thread(self._tx, work)
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

    async def replace_csr(self, csr: CSR, fence: Fence | None = None) -> CSR:
        version = int(csr.resource_version or 0)

        def work(db: sqlite3.Connection) -> list[Any]:
            self._check_fence(db, fence)
            return db.execute("UPDATE csrs SET version = version + 1, data = ? WHERE name = ? AND version = ? "
                              "RETURNING version", (json.dumps(csr.to_record()), csr.name, version)).fetchall()

        rows = await asyncio.to_thread(self._tx, work)
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

    async def acquire_lock(self, name: str, owner: str, ttl: float) -> Fence | None:
        def work(db: sqlite3.Connection) -> Fence | None:
            now = time.time()
            row = db.execute("SELECT owner, expires, token FROM locks WHERE name = ?", (name,)).fetchone()
            if row is not None and row[1] >= now:
                if row[0] != owner:
                    return None
                db.execute("UPDATE locks SET expires = ? WHERE name = ?", (now + ttl, name))
                return Fence(name, owner, int(row[2]))
            token = int(db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'lock_seq' "
                                   "RETURNING value").fetchone()[0])
            db.execute("INSERT OR REPLACE INTO locks (name, owner, expires, token) VALUES (?, ?, ?, ?)",
                       (name, owner, now + ttl, token))
            return Fence(name, owner, token)

        result: Fence | None = await asyncio.to_thread(self._tx, work)
        return result

    async def release_lock(self, fence: Fence) -> None:
        await self._q("DELETE FROM locks WHERE name = ? AND owner = ? AND token = ?", fence.name, fence.owner,
                      fence.token)

    def endpoint_health(self) -> dict[str, bool]:
        return {}

    async def check_schema(self) -> None:
        return None  # checked (and upgraded) when the file is opened

    async def close(self) -> None:
        with self._lock:
            self._db.close()

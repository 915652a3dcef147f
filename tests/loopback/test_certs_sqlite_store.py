"""The SQLite store: the common store contract, persistence across reopen, 0600 file, append-only audit."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from certs.sqlite_store import SQLiteStore
from certs.store import AuditRecord
from tests.certs_util import make_csr
from tests.store_contract import CALLER, check_store_contract


async def test_sqlite_store_contract(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "certs.db")
    try:
        await check_store_contract(store)
    finally:
        await store.close()


async def test_sqlite_survives_reopen_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "state" / "certs.db"
    store = SQLiteStore(path)
    await store.create_csr(make_csr(CALLER, name="pending-one"))
    await store.append_audit(AuditRecord.now("pending-one", "created", "someone"))
    await store.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = SQLiteStore(path)
    try:
        csr = await again.get_csr("pending-one")
        assert csr.state == "Pending" and csr.username == CALLER.user
        assert [r.action for r in await again.list_audit("pending-one")] == ["created"]
    finally:
        await again.close()
    # The audit log refuses changes even through a raw connection.
    raw = sqlite3.connect(path)
    try:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("UPDATE audit SET data = '{}'")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            raw.execute("DELETE FROM audit")
    finally:
        raw.close()

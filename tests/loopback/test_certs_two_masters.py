"""Two masters (two services on one store) deciding at once: a shared credential gets one first certificate per
node, not one per master. The decision is serialised across masters by a lock in the store."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from certs import service as service_module
from certs.approval import make_policy
from certs.ca import CertificateAuthority
from certs.service import CertService
from certs.signers import NodeInventory
from certs.sqlite_store import SQLiteStore
from certs.store import Contended, LockLost, StoreError
from certs.tokens import Identity
from tests.certs_util import body, make_csr, make_request
from tests.store_contract import CALLER, check_lock_contract

SHARED = Identity("bootstrap-shared", groups=("system:bootstrappers",), method="token")


async def test_shared_credential_gets_one_first_certificate_across_masters(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("two-masters")
    inventory = NodeInventory.of([("node-1", ["192.0.2.11"])])
    stores = [SQLiteStore(tmp_path / "certs.db") for _ in range(2)]  # two masters, one database
    masters = [CertService(s, ca, make_policy("auto-approve-group"), inventory) for s in stores]
    try:
        for round_ in range(3):  # a few tries: without the lock both masters approve almost every time
            pems = [make_request("system:node:node-1")[0] for _ in masters]
            made = await asyncio.gather(*(m.create(SHARED, body(p, name=f"r{round_}-{i}"))
                                          for i, (m, p) in enumerate(zip(masters, pems, strict=True))))
            states = sorted(c.state for c in made)
            if round_ == 0:
                assert states == ["Approved", "Denied"], [(c.name, c.state, c.conditions) for c in made]
            else:  # node-1 has its (approved) certificate now: a shared credential gets no other
                assert states == ["Denied", "Denied"]
        denied = [c for c in await stores[0].list_csrs() if c.state == "Denied"]
        assert all("already has a valid client certificate" in c.conditions[-1].message for c in denied)
    finally:
        for s in stores:
            await s.close()


async def test_sqlite_lock_contract(tmp_path: Path) -> None:
    a, b = SQLiteStore(tmp_path / "l.db"), SQLiteStore(tmp_path / "l.db")
    try:
        await check_lock_contract(a, b)
        # A holder that stalls past its ttl (by the host's clock) loses the lock: another takes it, and the stalled
        # one's fenced write fails even if nobody took it over.
        crashed = await a.acquire_lock("node/n3", "crashed", 0.2)
        assert crashed is not None and await b.acquire_lock("node/n3", "master-b", 30) is None
        await asyncio.sleep(0.3)
        with pytest.raises(LockLost):
            await a.create_csr(make_csr(CALLER, name="after-expiry"), crashed)
        assert await b.acquire_lock("node/n3", "master-b", 30) is not None
    finally:
        await a.close()
        await b.close()


def test_sqlite_refuses_live_locks_of_the_old_format(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # a version-1 file: wall-clock locks without generations
        db.execute("CREATE TABLE locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL)")
        db.execute("INSERT INTO locks VALUES ('first-kubelet-client/n1', 'old', ?)", (time.time() + 30,))
    with pytest.raises(StoreError, match="stop every master before upgrading"):
        SQLiteStore(path)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE locks SET expires = ?", (time.time() - 1,))
    store = SQLiteStore(path)  # only expired old locks: upgraded
    try:
        assert asyncio.run(store.acquire_lock("first-kubelet-client/n1", "new", 30)) is not None
    finally:
        asyncio.run(store.close())


async def test_a_decision_held_elsewhere_answers_contended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "LOCK_WAIT", 0.3)
    store = SQLiteStore(tmp_path / "certs.db")
    master = CertService(store, CertificateAuthority.create("c"), make_policy("auto-approve-group"),
                         NodeInventory.of([("node-1", ["192.0.2.11"])]))
    try:
        hung = await store.acquire_lock("first-kubelet-client/node-1", "a master that hangs", 30)
        assert hung is not None
        with pytest.raises(Contended, match="another master is deciding a certificate for node 'node-1'"):
            await master.create(SHARED, body(make_request("system:node:node-1")[0], name="waits"))
        assert await store.list_csrs() == []  # nothing decided without the lock
        await store.release_lock(hung)
        made = await master.create(SHARED, body(make_request("system:node:node-1")[0], name="after"))
        assert made.state == "Approved"
    finally:
        await store.close()


async def test_a_certificate_signed_after_the_lock_ran_out_is_discarded(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The signer holds the node's lock while it signs a first certificate and records it under the lock's fence: a
    master that stalls past the lock while signing cannot record the certificate, which goes nowhere."""
    store = SQLiteStore(tmp_path / "certs.db")
    master = CertService(store, CertificateAuthority.create("c"), make_policy("auto-approve-group"),
                         NodeInventory.of([("node-1", ["192.0.2.11"])]), lock_ttl=0.2)
    real_sign = service_module.sign

    def stalling_sign(*args: object, **kwargs: object) -> bytes:
        pem = real_sign(*args, **kwargs)  # type: ignore[arg-type]
        time.sleep(0.4)  # the whole process stalls (the event loop too) past the lock's ttl
        return pem

    try:
        assert (await master.create(SHARED, body(make_request("system:node:node-1")[0], name="x"))).state == "Approved"
        monkeypatch.setattr(service_module, "sign", stalling_sign)
        assert await master.sign_ready() == 0
        assert (await store.get_csr("x")).certificate is None
        assert "issued" not in [r.action for r in await store.list_audit("x")]
        monkeypatch.setattr(service_module, "sign", real_sign)
        assert await master.sign_ready() == 1
        assert (await store.get_csr("x")).state == "Issued"
    finally:
        await store.close()

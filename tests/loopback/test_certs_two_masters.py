"""Two masters (two services on one store) deciding at once: a shared credential gets one first certificate per
node, not one per master. The decision is serialised across masters by a lock in the store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from certs import service as service_module
from certs.approval import make_policy
from certs.ca import CertificateAuthority
from certs.service import CertService
from certs.signers import NodeInventory
from certs.sqlite_store import SQLiteStore
from certs.store import Contended
from certs.tokens import Identity
from tests.certs_util import body, make_request
from tests.store_contract import check_lock_contract

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
    finally:
        await a.close()
        await b.close()


async def test_a_decision_held_elsewhere_answers_contended(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "LOCK_WAIT", 0.3)
    store = SQLiteStore(tmp_path / "certs.db")
    master = CertService(store, CertificateAuthority.create("c"), make_policy("auto-approve-group"),
                         NodeInventory.of([("node-1", ["192.0.2.11"])]))
    try:
        assert await store.acquire_lock("first-kubelet-client/node-1", "a master that hangs", 30)
        with pytest.raises(Contended, match="another master is deciding a certificate for node 'node-1'"):
            await master.create(SHARED, body(make_request("system:node:node-1")[0], name="waits"))
        assert await store.list_csrs() == []  # nothing decided without the lock
        await store.release_lock("first-kubelet-client/node-1", "a master that hangs")
        made = await master.create(SHARED, body(make_request("system:node:node-1")[0], name="after"))
        assert made.state == "Approved"
    finally:
        await store.close()

"""The behaviour every certs store must have, run against SQLite (loopback tests) and etcd (system tests)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from certs.store import AlreadyExists, AuditRecord, Conflict, Fence, LockLost, NotFound, Store, update_csr
from certs.tokens import Identity, new_bootstrap_token
from tests.certs_util import make_csr

CALLER = Identity("system:bootstrap:abcdef", groups=("system:bootstrappers",), method="bootstrap",
                  token_id="abcdef", node="node-1")


async def check_store_contract(store: Store) -> None:
    """CSR create/get/list/CAS, tokens, audit."""
    csr = make_csr(CALLER, name="csr-one")
    created = await store.create_csr(csr)
    assert created.resource_version
    with pytest.raises(AlreadyExists):
        await store.create_csr(make_csr(CALLER, name="csr-one"))
    got = await store.get_csr("csr-one")
    assert got.to_dict() == created.to_dict() and got.requester_node == "node-1"
    await store.create_csr(make_csr(CALLER, name="csr-two"))
    assert [c.name for c in await store.list_csrs()] == ["csr-one", "csr-two"]
    with pytest.raises(NotFound):
        await store.get_csr("nope")

    # Compare-and-swap: a stale copy cannot overwrite a newer one.
    stale = await store.get_csr("csr-one")
    fresh = await store.get_csr("csr-one")
    fresh.add_condition("Approved", "Test", "first writer")
    await store.replace_csr(fresh)
    stale.add_condition("Denied", "Test", "second writer")
    with pytest.raises(Conflict):
        await store.replace_csr(stale)
    assert [c.type for c in (await store.get_csr("csr-one")).conditions] == ["Approved"]

    # update_csr re-reads, so concurrent updates all land.
    async def add_cert(name: str) -> None:
        await update_csr(store, name, lambda c: c.set_certificate(b"PEM"))

    await update_csr(store, "csr-two", lambda c: c.add_condition("Approved", "T", "t"))
    results = await asyncio.gather(add_cert("csr-two"), add_cert("csr-two"), return_exceptions=True)
    assert sum(1 for r in results if r is None) == 1  # exactly one writer set the certificate
    final = await store.get_csr("csr-two")
    assert final.state == "Issued" and final.certificate == b"PEM"

    # Delete returns the object as it was; a second delete, and reads, find nothing; others are untouched.
    await store.create_csr(make_csr(CALLER, name="csr-gone"))
    gone = await store.delete_csr("csr-gone")
    assert gone.name == "csr-gone" and gone.requester_node == "node-1"
    with pytest.raises(NotFound):
        await store.delete_csr("csr-gone")
    with pytest.raises(NotFound):
        await store.get_csr("csr-gone")
    assert [c.name for c in await store.list_csrs()] == ["csr-one", "csr-two"]

    tok = new_bootstrap_token(dt.timedelta(hours=1), node="node-1")
    await store.put_token(tok)
    with pytest.raises(AlreadyExists):
        await store.put_token(tok)
    assert await store.get_token(tok.token_id) == tok
    assert [t.token_id for t in await store.list_tokens()] == [tok.token_id]
    assert await store.delete_token(tok.token_id) is True
    assert await store.delete_token(tok.token_id) is False
    assert await store.get_token(tok.token_id) is None

    for i in range(3):
        await store.append_audit(AuditRecord.now("csr-one", "approved" if i else "created", f"actor-{i}"))
    await store.append_audit(AuditRecord.now("csr-two", "created", "x"))
    assert [r.actor for r in await store.list_audit("csr-one")] == ["actor-0", "actor-1", "actor-2"]
    assert len(await store.list_audit()) == 4


async def check_lock_contract(a: Store, b: Store) -> None:
    """Named locks two masters (``a`` and ``b`` on the same data) use to decide one thing at a time, and the fence
    that makes a write under a lock fail once the lock is no longer its holder's."""
    held = await a.acquire_lock("node/n1", "master-a", 30)
    assert held is not None
    assert await b.acquire_lock("node/n1", "master-b", 30) is None  # held by a
    assert await a.acquire_lock("node/n1", "master-a", 30) == held  # the owner may take it again: same fence
    other = await b.acquire_lock("node/n2", "master-b", 30)  # another name is independent
    assert other is not None
    await b.release_lock(Fence("node/n1", "master-b", held.token + 1000))  # not b's: nothing happens
    assert await b.acquire_lock("node/n1", "master-b", 30) is None
    # Writes fenced by a held lock go through.
    created = await a.create_csr(make_csr(CALLER, name="fenced"), held)
    created.add_condition("Approved", "T", "under the lock")
    await a.replace_csr(created, held)
    await a.release_lock(held)
    taken = await b.acquire_lock("node/n1", "master-b", 30)
    assert taken is not None and taken.token != held.token
    # The old holder's fence is dead: its writes fail and store nothing, whatever it believes.
    with pytest.raises(LockLost):
        await a.create_csr(make_csr(CALLER, name="late"), held)
    with pytest.raises(NotFound):
        await a.get_csr("late")
    stale = await a.get_csr("fenced")
    stale.set_certificate(b"PEM")
    with pytest.raises(LockLost):
        await a.replace_csr(stale, held)
    assert (await b.get_csr("fenced")).certificate is None
    # A fenced create of an existing name is AlreadyExists, as without a fence.
    with pytest.raises(AlreadyExists):
        await b.create_csr(make_csr(CALLER, name="fenced"), taken)
    # Racing for a free lock: exactly one wins.
    won = await asyncio.gather(*(s.acquire_lock("node/n4", f"racer-{i}", 30) for i, s in enumerate([a, b, a, b])))
    assert sum(w is not None for w in won) == 1

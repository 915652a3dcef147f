"""The etcd store against a real etcd (started here on loopback): the store contract, and two stores (two
masters) seeing the same CSRs and never overwriting each other."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from certs.etcd_store import EtcdStore, client_tls
from certs.store import Conflict, StoreError
from tests.certs_util import make_csr
from tests.etcdbed import ETCD, EtcdTLS, running_etcd
from tests.store_contract import CALLER, check_lock_contract, check_store_contract

pytestmark = pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason=f"etcd binary not found at {ETCD}")


@pytest.fixture(scope="module")
def etcd_url() -> Iterator[str]:
    with running_etcd() as url:
        yield url


async def test_etcd_store_contract(etcd_url: str) -> None:
    store = EtcdStore([etcd_url], prefix="/t/contract")
    try:
        await check_store_contract(store)
    finally:
        await store.close()


async def test_two_masters_share_csrs_with_compare_and_swap(etcd_url: str) -> None:
    a = EtcdStore([etcd_url], prefix="/t/shared")
    b = EtcdStore(["http://127.0.0.1:9", etcd_url], prefix="/t/shared")  # first endpoint is dead: falls over
    other = EtcdStore([etcd_url], prefix="/t/elsewhere")
    try:
        await a.create_csr(make_csr(CALLER, name="from-a"))
        seen = await b.get_csr("from-a")
        assert seen.state == "Pending" and seen.username == CALLER.user
        assert await other.list_csrs() == []  # prefixes separate clusters
        by_a = await a.get_csr("from-a")
        seen.add_condition("Denied", "B", "b denies")
        await b.replace_csr(seen)
        by_a.add_condition("Approved", "A", "a approves")
        with pytest.raises(Conflict):
            await a.replace_csr(by_a)
        assert [c.type for c in (await a.get_csr("from-a")).conditions] == ["Denied"]
    finally:
        for s in (a, b, other):
            await s.close()
    dead = EtcdStore(["http://127.0.0.1:9"], timeout=2)
    try:
        with pytest.raises(StoreError, match="no etcd endpoint answered"):
            await dead.list_csrs()
    finally:
        await dead.close()


@pytest.fixture(scope="module")
def etcd_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, EtcdTLS]]:
    tls = EtcdTLS.create(tmp_path_factory.mktemp("etcd-tls"))
    with running_etcd(tls=tls) as url:
        yield url, tls


async def test_etcd_over_mutual_tls(etcd_tls: tuple[str, EtcdTLS]) -> None:
    url, tls = etcd_tls
    assert url.startswith("https://")
    store = EtcdStore([url], prefix="/t/tls", tls=client_tls(tls.ca, tls.client_cert, tls.client_key))
    try:
        await check_store_contract(store)
    finally:
        await store.close()


@pytest.mark.parametrize("how", ["system trust store", "no client certificate"])
async def test_etcd_tls_refusals_are_store_errors(etcd_tls: tuple[str, EtcdTLS], how: str) -> None:
    url, tls = etcd_tls
    context = client_tls() if how == "system trust store" else client_tls(tls.ca)
    store = EtcdStore([url], prefix="/t/tls", timeout=5, tls=context)
    try:
        with pytest.raises(StoreError) as err:
            await store.list_csrs()
        if how == "system trust store":
            assert "certificate verify failed" in str(err.value)  # etcd's certificate is not trusted
    finally:
        await store.close()


def test_client_tls_names_the_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="etcd_ca"):
        client_tls(tmp_path / "missing.crt")
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(StoreError, match="etcd_cert"):
        client_tls(None, bad, bad)


async def test_etcd_lock_contract(etcd_url: str) -> None:
    a, b = EtcdStore([etcd_url], prefix="/t/locks"), EtcdStore([etcd_url], prefix="/t/locks")
    try:
        await check_lock_contract(a, b)
    finally:
        await a.close()
        await b.close()

"""A store that grows keeps working: 10,000 CSRs and 10,000 tokens in a real etcd (seeded in well under 60 s), read
whole and in pages, while CSRs are still created, decided and signed. Also: a store error always says what happened
(a timeout's text is not empty)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator

import pytest

from certs.approval import make_policy
from certs.ca import CertificateAuthority
from certs.etcd_client import EtcdClient, b64
from certs.etcd_store import EtcdStore
from certs.service import CertService
from certs.signers import NodeInventory
from certs.store import InvalidContinue, StoreError
from certs.tokens import Identity, new_bootstrap_token
from tests.certs_util import body, make_csr, make_request
from tests.etcdbed import ETCD, running_etcd
from tests.store_contract import CALLER

pytestmark = pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason=f"etcd binary not found at {ETCD}")

N = 10_000
SHARED = Identity("bootstrap-shared", groups=("system:bootstrappers",), method="token")


@pytest.fixture(scope="module")
def etcd_url() -> Iterator[str]:
    with running_etcd() as url:
        yield url


async def _seed(client: EtcdClient, items: list[tuple[str, str]], batch: int = 128) -> None:
    """Write (key, value) pairs, ``batch`` puts per transaction (etcd's default limit is 128)."""
    for i in range(0, len(items), batch):
        ops = [{"request_put": {"key": b64(k), "value": b64(v)}} for k, v in items[i:i + batch]]
        await client.txn([], ops)


@pytest.mark.slow
async def test_ten_thousand_csrs_and_tokens(etcd_url: str) -> None:
    prefix = "/t/scale"
    store = EtcdStore([etcd_url], prefix=prefix, timeout=20)
    template = make_csr(CALLER, cn="system:node:seeded", name="x").to_record()
    csrs, tokens = [], []
    for i in range(N):
        record = json.loads(json.dumps(template))
        record["metadata"]["name"] = f"seed-{i:05d}"
        csrs.append((f"{prefix}/csrs/seed-{i:05d}", json.dumps(record)))
        tok = new_bootstrap_token(None, description=f"seeded {i}")
        tokens.append((f"{prefix}/tokens/{tok.token_id}", json.dumps(tok.to_dict())))
    started = time.monotonic()
    await _seed(store.etcd, csrs + tokens)
    seeded = time.monotonic() - started
    assert seeded < 60, f"seeding took {seeded:.1f}s"
    master = CertService(store, CertificateAuthority.create("scale"), make_policy("auto-approve-group"),
                         NodeInventory.of([("node-1", ["192.0.2.11"])]))
    try:
        everything = await store.list_csrs()
        assert len(everything) == N and everything[0].name == "seed-00000"
        assert len(await store.list_tokens()) == N
        assert await store.get_token(tokens[-1][0].rsplit("/", 1)[1]) is not None

        # Pages: name order, each CSR once, pinned to the first page's revision (a CSR made meanwhile is not in it).
        names: list[str] = []
        token = ""
        for page_no in range(N // 1000 + 2):
            page, token = await store.list_csrs_page(1000, token)
            names += [c.name for c in page]
            if page_no == 0:
                await store.create_csr(make_csr(CALLER, name="seed-00000a"))
            if not token:
                break
        assert names == [f"seed-{i:05d}" for i in range(N)]
        with pytest.raises(InvalidContinue):
            await store.list_csrs_page(10, "garbage")

        # The service keeps working on the big store: a first certificate is decided, signed and listed.
        made = await master.create(SHARED, body(make_request("system:node:node-1")[0], name="fresh"))
        assert made.state == "Approved"
        assert await master.sign_ready() == 1
        assert (await store.get_csr("fresh")).state == "Issued"
        assert master.counts["Issued"] == 1 and master.counts["Pending"] == N + 1
    finally:
        await store.close()


async def test_a_timeout_is_named_not_empty(etcd_url: str) -> None:
    """An endpoint that accepts and never answers: the error says which endpoint and that it timed out."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        store = EtcdStore([url], prefix="/t/silent", timeout=0.3)
        try:
            with pytest.raises(StoreError) as err:
                await asyncio.wait_for(store.list_csrs(), 10)
            assert f"{url}: " in str(err.value) and "Timeout" in str(err.value), str(err.value)
        finally:
            await store.close()

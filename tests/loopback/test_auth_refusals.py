"""Authentication on the certificates API of a real ``tunneld serve``: no token, a wrong or malformed one, an expired
bootstrap token and a client certificate from another CA are all refused, the refusals show in the daemon's log,
and hostile CSR bodies (hypothesis) get a 4xx, never a 5xx or a certificate.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from certs.api import CSR_PATH
from tests.certs_daemon import Daemon, DaemonConfig, cli, session, write_config
from tunneld.dev.pki import DevCA

from .conftest import next_base

pytestmark = pytest.mark.slow
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="tdhyp"))


@pytest.fixture
async def daemon(short_dir: Path) -> AsyncIterator[tuple[DaemonConfig, Daemon, str, str]]:
    cfg = write_config(short_dir / "m", next_base())
    assert cli("ca", "init", "--config", str(cfg.path)).returncode == 0
    good = cli("token", "create", "--config", str(cfg.path), "--ttl", "1h").stdout.strip()
    short = cli("token", "create", "--config", str(cfg.path), "--ttl", "1s")
    assert short.returncode == 0, short.stderr
    d = Daemon(cfg)
    await d.start()
    try:
        yield cfg, d, good, short.stdout.strip()
    finally:
        await d.stop()


async def get_status(cfg: DaemonConfig, headers: dict[str, str], cert: tuple[Path, Path] | None = None) -> int:
    ctx = ssl.create_default_context(cafile=str(cfg.ca_cert))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    async with aiohttp.ClientSession(cfg.url, headers=headers, connector=aiohttp.TCPConnector(ssl=ctx),
                                     timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.get(CSR_PATH) as r:
            return r.status


async def test_missing_wrong_expired_and_foreign_credentials_are_refused(daemon, short_dir: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, d, good, short = daemon
    assert await get_status(cfg, {"Authorization": f"Bearer {good}"}) == 200  # the baseline works
    await asyncio.sleep(1.5)  # let the 1 s token expire
    wrong_secret = good.split(".")[0] + "." + ("0" * 16 if good.split(".")[1] != "0" * 16 else "1" * 16)
    for headers in (
        {},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": f"Bearer {wrong_secret}"},
        {"Authorization": "Bearer abcdef.0123456789abcdef"},
        {"Authorization": "Bearer " + "x" * 5000},
        {"Authorization": f"Bearer {short}"},
    ):
        assert await get_status(cfg, headers) == 401, headers
    log = d.log.decode()
    assert "expired bootstrap token presented" in log, log[-2000:]
    assert log.count("certificates API refused") >= 7, log[-2000:]  # one audit line per refused request
    assert good.split(".")[1] not in log and wrong_secret.split(".")[1] not in log  # secrets never logged

    # A client certificate from another CA does not get past the TLS handshake.
    foreign = DevCA("not the cluster CA").issue_client("system:node:node-1")
    crt, key = short_dir / "foreign.crt", short_dir / "foreign.key"
    crt.write_bytes(foreign.cert_pem)
    key.write_bytes(foreign.key_pem)
    key.chmod(0o600)
    with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
        await get_status(cfg, {}, cert=(crt, key))
    assert await get_status(cfg, {"Authorization": f"Bearer {good}"}) == 200  # and the API is still serving


BODIES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
CSR_LIKE = st.fixed_dictionaries({
    "apiVersion": st.sampled_from(["certificates.k8s.io/v1", "v1", ""]),
    "kind": st.sampled_from(["CertificateSigningRequest", "Pod"]),
    "metadata": st.fixed_dictionaries({"name": st.text(max_size=30)}),
    "spec": st.fixed_dictionaries({
        "request": st.text(max_size=60),
        "signerName": st.sampled_from(["kubernetes.io/kube-apiserver-client-kubelet", "kubernetes.io/kubelet-serving",
                                       "../../etc", ""]),
        "usages": st.lists(st.text(max_size=20), max_size=3),
    }),
})


async def test_hostile_csr_bodies_get_a_4xx_never_a_certificate(daemon) -> None:  # type: ignore[no-untyped-def]
    cfg, _, good, _ = daemon
    loop = asyncio.get_running_loop()

    async def post(body: object, raw: bytes | None) -> None:
        async with session(cfg, good) as s:
            if raw is not None:
                resp = await s.post(CSR_PATH, data=raw, headers={"Content-Type": "application/json"})
            else:
                resp = await s.post(CSR_PATH, json=body)
            async with resp:
                text = await resp.text()
                assert 400 <= resp.status < 500, (resp.status, text[:300])

    @settings(max_examples=40, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(BODIES, CSR_LIKE), raw=st.one_of(st.none(), st.binary(max_size=64)))
    def check(body: object, raw: bytes | None) -> None:
        # hypothesis drives a sync function (in a worker thread); each example runs on the test's loop.
        asyncio.run_coroutine_threadsafe(post(body, raw), loop).result(30)

    await asyncio.to_thread(check)
    async with session(cfg, good) as s, s.get(CSR_PATH) as r:
        items = (await r.json())["items"]
    assert all(not i.get("status", {}).get("certificate") for i in items), "a hostile body got a certificate"

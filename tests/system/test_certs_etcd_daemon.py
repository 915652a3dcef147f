"""Two masters (two real `tunneld serve`) sharing a real etcd: a CSR made through one is seen, approved and
issued through the other, and a pending CSR survives restarting both daemons."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import aiohttp
import pytest

from certs.api import CSR_PATH
from certs.etcd_client import EtcdClient, b64
from tests.certs_daemon import Daemon, acli, cli, session, wait_for, write_config
from tests.certs_util import body, make_request
from tests.etcdbed import ETCD, EtcdTLS, running_etcd

pytestmark = pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason=f"etcd binary not found at {ETCD}")


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tde", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _rows(out: str) -> dict[str, str]:
    return {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:]}


async def test_two_masters_share_csrs_and_restart_keeps_pending(work: Path) -> None:
    with running_etcd() as url:
        a = write_config(work / "a", "127.0.0.1", name="a", store="etcd", etcd=url, etcd_prefix="/shared")
        b = write_config(work / "b", "127.0.0.1", name="b", store="etcd", etcd=url, etcd_prefix="/shared",
                         ca_dir=work / "a")
        assert cli("ca", "init", "--config", str(a.path), "--no-ssh").returncode == 0
        token = cli("token", "create", "--config", str(a.path), "--ttl", "1h").stdout.strip()
        masters = [Daemon(a), Daemon(b)]
        for m in masters:
            await m.start()
        try:
            pem, _ = make_request("system:node:node-2")
            async with session(b, token) as s:  # the token made against A's config is known to B (same store)
                async with s.post(CSR_PATH, json=body(pem, name="via-b")) as r:
                    assert r.status == 201, await r.text()
            seen = await acli("csr", "list", "--config", str(a.path))
            assert _rows(seen.stdout) == {"via-b": "Pending"}, seen.stdout + seen.stderr
        finally:
            for m in masters:
                assert await m.stop() == 0

        masters = [Daemon(a), Daemon(b)]
        for m in masters:
            await m.start()
        try:
            assert _rows((await acli("csr", "list", "--config", str(b.path))).stdout) == {"via-b": "Pending"}
            ok = await acli("csr", "approve", "via-b", "--config", str(a.path))
            assert ok.returncode == 0, ok.stderr
            async with session(b, token) as s:
                obj = await wait_for(s, "via-b", lambda o: o["status"].get("certificate"))
            assert [c["type"] for c in obj["status"]["conditions"]] == ["Approved"]
            assert _rows((await acli("csr", "list", "--config", str(b.path))).stdout) == {"via-b": "Approved,Issued"}

            # `tunneld csr list --limit/--continue` pages in name order and says how to get the next page.
            async with session(a, token) as s:
                for name in ("via-a", "via-c"):
                    async with s.post(CSR_PATH, json=body(make_request("system:node:node-2")[0], name=name)) as r:
                        assert r.status == 201, await r.text()
            first = await acli("csr", "list", "--config", str(b.path), "--limit", "2")
            assert list(_rows(first.stdout)) == ["via-a", "via-b"], first.stdout
            nxt = first.stderr.strip().split()
            assert nxt[:-1] == ["more:", "tunneld", "csr", "list", "--limit", "2", "--continue"], first.stderr
            last = await acli("csr", "list", "--config", str(b.path), "--limit", "2", "--continue", nxt[-1])
            assert list(_rows(last.stdout)) == ["via-c"] and "more:" not in last.stderr, last.stdout + last.stderr
            every = await acli("csr", "list", "--config", str(b.path))  # without --limit: all pages
            assert list(_rows(every.stdout)) == ["via-a", "via-b", "via-c"] and not every.stderr, every.stderr
        finally:
            for m in masters:
                assert await m.stop() == 0


async def test_daemon_and_admin_cli_use_etcd_over_mutual_tls(work: Path) -> None:
    tls = EtcdTLS.create(work)
    with running_etcd(tls=tls) as url:
        files = f'etcd_ca = "{tls.ca}"\netcd_cert = "{tls.client_cert}"\netcd_key = "{tls.client_key}"\n'
        cfg = write_config(work / "m", "127.0.0.1", store="etcd", etcd=url, etcd_tls=files)
        assert cli("ca", "init", "--config", str(cfg.path), "--no-ssh").returncode == 0
        made = cli("token", "create", "--config", str(cfg.path), "--ttl", "1h")
        assert made.returncode == 0, made.stderr
        daemon = Daemon(cfg)
        await daemon.start()
        try:
            pem, _ = make_request("system:node:node-1")
            async with session(cfg, made.stdout.strip()) as s:
                async with s.post(CSR_PATH, json=body(pem, name="over-tls")) as r:
                    assert r.status == 201, await r.text()
            listed = await acli("csr", "list", "--config", str(cfg.path))
            assert _rows(listed.stdout) == {"over-tls": "Pending"}, listed.stdout + listed.stderr
        finally:
            assert await daemon.stop() == 0

        # Without the client certificate etcd refuses the handshake: the admin CLI says the store failed.
        bare = write_config(work / "n", "127.0.0.1", store="etcd", etcd=url, etcd_tls=f'etcd_ca = "{tls.ca}"\n')
        refused = cli("token", "list", "--config", str(bare.path))
        assert refused.returncode != 0 and "etcd" in refused.stderr, refused.stderr


async def _status(cfg_socket: Path, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(cfg_socket))) as s:
        async with s.get("http://localhost" + path) as r:
            return r.status, await r.text()


async def test_store_readiness_and_endpoint_metric(work: Path) -> None:
    """`/readyz/store` and `tunneld_store_endpoint_healthy{endpoint}` follow the etcd endpoints the daemon uses: a
    dead endpoint is 0 beside a live 1, and with etcd gone the readiness check fails with the reason."""
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens there once closed
    daemon = None
    with running_etcd() as url:
        cfg = write_config(work / "m", "127.0.0.1", store="etcd", etcd=f"{dead}\", \"{url}")
        assert cli("ca", "init", "--config", str(cfg.path), "--no-ssh").returncode == 0
        daemon = Daemon(cfg)
        await daemon.start()
        want = {f'tunneld_store_endpoint_healthy{{endpoint="{dead}"}} 0.0',
                f'tunneld_store_endpoint_healthy{{endpoint="{url}"}} 1.0'}
        for _ in range(100):  # the signer loop's first pass tries both
            _, metrics = await _status(cfg.socket, "/metrics")
            if want <= set(metrics.splitlines()):
                break
            await asyncio.sleep(0.1)
        assert want <= set(metrics.splitlines()), metrics
        assert await _status(cfg.socket, "/readyz/store") == (200, "ok")
    try:
        for _ in range(100):  # etcd is gone: the next signer pass finds no endpoint
            code, text = await _status(cfg.socket, "/readyz/store?verbose")
            if code != 200:
                break
            await asyncio.sleep(0.1)
        assert code == 500 and "no store endpoint answered its last request" in text, (code, text)
    finally:
        assert await daemon.stop() == 0


async def test_a_new_master_refuses_a_store_with_live_old_locks(work: Path) -> None:
    """An older tunneld's wall-clock lock is still live in the store: `tunneld serve` of this version does not start,
    and says to stop every master before upgrading (one line, no traceback)."""
    with running_etcd() as url:
        cfg = write_config(work / "m", "127.0.0.1", store="etcd", etcd=url, etcd_prefix="/upgrading")
        assert cli("ca", "init", "--config", str(cfg.path), "--no-ssh").returncode == 0
        raw = EtcdClient([url])
        try:
            old = json.dumps({"owner": "v1-master/csr-x", "expires": time.time() + 120})
            await raw.txn([], [{"request_put": {"key": b64("/upgrading/locks/first-kubelet-client/node-1"),
                                                "value": b64(old)}}])
        finally:
            await raw.close()
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "tunneld", "serve", "--config", str(cfg.path), "--grace", "1"],
            capture_output=True, text=True, timeout=60)
        assert out.returncode == 1, out.stderr
        assert "cannot start" in out.stderr and "stop every master before upgrading" in out.stderr, out.stderr
        assert "Traceback" not in out.stderr, out.stderr

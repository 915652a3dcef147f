"""The certificates API on a real TLS listener and a real unix socket, for loopback tests of the CSR API."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from certs.api import APIServer, api_tls_context, local_authenticator, make_app, tls_authenticator
from certs.approval import make_policy
from certs.ca import CertificateAuthority, cert_pem, key_pem
from certs.service import CertService
from certs.signers import NodeInventory
from certs.sqlite_store import SQLiteStore
from certs.tokens import BootstrapToken, new_bootstrap_token, parse_token_file
from tunneld.certsd import ADMIN_PREFIX

ADMIN_TOKEN = "0123456789abcdef0123456789abcdef"


@dataclass
class Env:
    ca: CertificateAuthority
    service: CertService
    url: str
    host: str
    port: int
    socket: Path
    dir: Path
    ca_file: Path

    def client(self, token: str | None = None, cert: tuple[Path, Path] | None = None) -> aiohttp.ClientSession:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if cert:
            ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return aiohttp.ClientSession(self.url, headers=headers, connector=aiohttp.TCPConnector(ssl=ctx),
                                     timeout=aiohttp.ClientTimeout(total=10))

    def tls_client_context(self) -> ssl.SSLContext:
        """What a raw-socket client needs to talk TLS to the listener."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    async def token(self, ttl: dt.timedelta | None = dt.timedelta(hours=1), **kw: object) -> BootstrapToken:
        tok = new_bootstrap_token(ttl, **kw)  # type: ignore[arg-type]
        await self.service.store.put_token(tok)
        return tok


@contextlib.asynccontextmanager
async def api_env(directory: Path, host: str, policy: str = "queue", **service: object) -> AsyncIterator[Env]:
    """CA, SQLite store, service (``policy``, extra ``service`` keywords), TLS listener on ``host``, admin socket,
    and the signer loop; all stopped on exit."""
    ca = CertificateAuthority.create("api-test-ca")
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(ca.pem)
    cert, key = ca.issue_server([host])
    (directory / "api.crt").write_bytes(cert_pem(cert))
    (directory / "api.key").write_bytes(key_pem(key))
    store = SQLiteStore(directory / "certs.db")
    inventory = NodeInventory.of([("node-1", ["192.0.2.11"]), ("node-2", ["192.0.2.12"])])
    svc = CertService(store, ca, make_policy(policy), inventory,
                      parse_token_file(f'{ADMIN_TOKEN},admin,0,"system:masters"\n'), **service)  # type: ignore[arg-type]
    tls = APIServer(make_app(svc, tls_authenticator(svc), server_url=f"https://{host}:0"))
    await tls.start(host, 0, api_tls_context(str(directory / "api.crt"), str(directory / "api.key"), str(ca_file)))
    local = make_app(svc, local_authenticator())
    local.add_subapp(ADMIN_PREFIX, make_app(svc, local_authenticator()))  # where the daemon mounts it (tunneld csr)
    local_runner = web.AppRunner(local)
    await local_runner.setup()
    sock = directory / "admin.sock"
    await web.UnixSite(local_runner, str(sock)).start()
    signer = asyncio.create_task(svc.run_signer(interval=0.2))
    assert tls.port is not None
    try:
        yield Env(ca, svc, f"https://{host}:{tls.port}", host, tls.port, sock, directory, ca_file)
    finally:
        signer.cancel()
        await asyncio.gather(signer, return_exceptions=True)
        await tls.stop()
        await local_runner.cleanup()
        await store.close()

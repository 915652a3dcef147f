"""The daemon's certificates part: builds the CA, store, policy and API from :class:`~tunneld.config.Config`.

The gateway creates a :class:`CertsDaemon` only when ``[api]`` is configured. It serves the certificates API on
``[api] listen`` (HTTPS; a server certificate issued by the cluster CA at startup unless ``tls_cert``/``tls_key`` are
given), mounts the same API for administrators under :data:`ADMIN_PREFIX` on the local status socket (identity from
``SO_PEERCRED``; ``tunneld csr`` uses it), runs the signer loop, and hands the inventory to :mod:`certs` as plain data.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
import socket
import ssl
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from aiohttp import web

from certs.api import api_tls_context, local_authenticator, make_app, tls_authenticator
from certs.approval import make_policy
from certs.ca import CertificateAuthority, cert_pem, key_pem
from certs.etcd_store import EtcdStore, client_tls
from certs.files import write_secret
from certs.nodessh import NodeSSHIssuer
from certs.service import CertService
from certs.signers import NodeInventory
from certs.sqlite_store import SQLiteStore
from certs.store import Store
from certs.tokens import StaticToken, load_token_file
from netnames import split_host_port
from proxy.server import Limits
from tunneld.apilistener import APIListener
from tunneld.config import APISettings, Config, CSRSettings, Node
from tunneld.ops.logs import add_secret
from tunneld.tlsfiles import TLSFiles

log = logging.getLogger("tunneld.certs")

ADMIN_PREFIX = "/certs"
"""Where the administrators' CSR API is mounted on the status socket."""


def open_store(settings: CSRSettings) -> Store:
    """The configured CSR store (``[csr] store``)."""
    if settings.store == "etcd":
        tls = client_tls(settings.etcd_ca, settings.etcd_cert, settings.etcd_key) if settings.etcd_https else None
        return EtcdStore(settings.etcd_endpoints, settings.etcd_prefix, tls=tls)
    return SQLiteStore(settings.sqlite_path)


def load_static_tokens(path: Path | None) -> list[StaticToken]:
    """The static token file's records, each token registered with the log redaction so no line can print it."""
    static = load_token_file(path) if path is not None else []
    for record in static:
        add_secret(record.token)
    return static


def node_inventory(nodes: Iterable[Node]) -> NodeInventory:
    """The inventory as certs sees it: each node's name and address."""
    return NodeInventory.of((n.name, [n.address]) for n in nodes)


def _wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def server_url(api: APISettings) -> str:
    """The URL published in cluster-info: ``external_url``, or ``https://<listen>`` (host name for 0.0.0.0/::)."""
    if api.external_url:
        return api.external_url.rstrip("/")
    host, port = split_host_port(api.listen)
    if _wildcard(host):
        host = api.server_names[0] if api.server_names else socket.getfqdn()
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port}"


def node_ssh_issuer(path: Path | None, may_dial_in: Callable[[str], str | None],
                    validity: int = 24 * 3600) -> NodeSSHIssuer | None:
    """The issuer of nodes' SSH certificates, with ``[ca] ssh_user_ca`` (valid ``ssh_node_validity`` seconds)."""
    if path is None:
        return None
    from certs.sshca import SSHCA  # asyncssh, only when dial-in nodes get certificates here

    return NodeSSHIssuer(SSHCA.load(path), may_dial_in, validity)


class CertsDaemon:
    """CA + store + policy + API listener + signer loop, as the gateway runs them."""

    def __init__(self, config: Config) -> None:
        assert config.api is not None and config.ca is not None, "[api] needs [ca] (checked by load_config)"
        self.settings = config.api
        self.ca_settings = config.ca
        self.ca = CertificateAuthority.load(config.ca.cert, config.ca.key)
        static = load_static_tokens(config.auth.token_file)
        self.store = open_store(config.csr)
        policy = make_policy(config.csr.approval, config.csr.approve_group)
        self.service = CertService(self.store, self.ca, policy, node_inventory(config.nodes), static,
                                   max_pending=config.csr.max_pending_per_requester)
        self.url = server_url(config.api)
        lim = config.limits
        self._nodes: dict[str, Node] = {n.name: n for n in config.nodes}
        self.node_ssh = node_ssh_issuer(config.ca.ssh_user_ca, self._may_dial_in, config.ca.ssh_node_validity)
        self.api = APIListener(make_app(self.service, tls_authenticator(self.service), self.url, self.node_ssh),
                               Limits(lim.max_connections, lim.max_header_bytes, lim.header_timeout, lim.idle_timeout))
        self._signer: asyncio.Task[None] | None = None
        log.info("certificates: approval policy %s, store %s", policy.name, config.csr.store)

    def mount(self, status_app: web.Application) -> None:
        """Add the administrators' API under :data:`ADMIN_PREFIX` to the (not yet started) status application."""
        status_app.add_subapp(ADMIN_PREFIX, make_app(self.service, local_authenticator()))

    def set_nodes(self, nodes: Iterable[Node]) -> None:
        """The inventory changed (reload, Kubernetes source)."""
        nodes = list(nodes)
        self._nodes = {n.name: n for n in nodes}
        self.service.set_inventory(node_inventory(nodes))

    def _may_dial_in(self, name: str) -> str | None:
        node = self._nodes.get(name)
        if node is None:
            return "not in the inventory"
        return None if node.mode == "dial-in" else f"its mode is {node.mode}, not dial-in"

    def reload(self, config: Config) -> None:
        """Re-read the static token file (other certificate settings apply on restart)."""
        if config.auth.token_file is not None:
            try:
                self.service.authenticator.set_static(load_static_tokens(config.auth.token_file))
            except ValueError as exc:
                log.error("token file not reloaded: %s", exc)

    def tls_context(self, config: Config) -> ssl.SSLContext | None:
        """The API listener's context, built afresh (the ``tls_context`` role of :class:`~tunneld.tlsfiles.TLSFiles`):
        ``[api] tls_cert``/``tls_key`` as the files are now, else a server certificate just issued by the CA.
        Client certificates are verified against the CA this daemon signs with (loaded at start: ``[ca]`` changes
        take effect on restart), never against what the CA file may hold since."""
        api = config.api
        if api is None:
            return None
        if api.tls_cert is not None and api.tls_key is not None:
            return api_tls_context(str(api.tls_cert), str(api.tls_key), self.ca.pem)
        host, _ = split_host_port(api.listen)
        names = [*api.server_names, "localhost", socket.gethostname()]
        if not _wildcard(host):
            names.insert(0, host)
        cert, key = self.ca.issue_server(names)
        # ssl only loads keys from files: a private directory that exists for the duration of the load.
        tmp = Path(tempfile.mkdtemp(prefix="tunneld-api-"))
        try:
            write_secret(tmp / "tls.crt", cert_pem(cert))
            write_secret(tmp / "tls.key", key_pem(key))
            return api_tls_context(str(tmp / "tls.crt"), str(tmp / "tls.key"), self.ca.pem)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    async def start(self, tls: TLSFiles) -> None:
        """Check the store's version, bind the API listener (its TLS a role of ``tls``, rebuilt on reload) and start
        the signer loop."""
        await self.store.check_schema()
        host, port = split_host_port(self.settings.listen)
        await self.api.start(host, port, tls.server("certificates API", self.tls_context))
        self._signer = asyncio.create_task(self.service.run_signer(), name="csr-signer")
        log.info("certificates API at %s (CA pin %s)", self.url, self.ca.pin)

    async def stop(self) -> None:
        """Stop the signer, close the listener and the store."""
        if self._signer is not None:
            self._signer.cancel()
            await asyncio.gather(self._signer, return_exceptions=True)
            self._signer = None
        await self.api.stop()
        await self.store.close()

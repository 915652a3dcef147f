"""The HTTP API (aiohttp): ``certificates.k8s.io/v1`` CertificateSigningRequests and ``kube-public/cluster-info``.

Routes (the JSON shapes are Kubernetes')::

    GET  /api/v1/namespaces/kube-public/configmaps/cluster-info            unauthenticated (on the TLS listener)
    POST /apis/certificates.k8s.io/v1/certificatesigningrequests           create (201)
    GET  /apis/certificates.k8s.io/v1/certificatesigningrequests           list (admins: all; others: their own)
    GET  /apis/certificates.k8s.io/v1/certificatesigningrequests/{name}    get
    DELETE /apis/certificates.k8s.io/v1/certificatesigningrequests/{name}  delete (admins; a Status "Success")
    PUT  /apis/certificates.k8s.io/v1/certificatesigningrequests/{name}/approval   approve/deny (admins)
    GET  /apis/certificates.k8s.io/v1/certificatesigningrequests/{name}/audit      decision trail (admins; ours)
    POST /apis/tunneld.io/v1/nodesshcertificates         a node's SSH user certificate (ours; :mod:`certs.nodessh`)

Who is calling is decided by an ``Authenticate`` function: on the TLS listener a bearer token (static or bootstrap)
or a client certificate verified by TLS against the cluster CA (:func:`tls_authenticator`); on the daemon's local
unix socket the peer's uid from ``SO_PEERCRED`` (:func:`local_authenticator`), for ``tunneld csr``. Errors are
``metav1.Status`` objects with the matching HTTP code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from cryptography import x509

import netnames
from certs.csr import ConditionConflict, CSRInvalid
from certs.nodessh import PATH as NODE_SSH_PATH
from certs.nodessh import NodeSSHIssuer
from certs.service import CertService, Forbidden, QuotaExceeded
from certs.store import AlreadyExists, Conflict, Contended, InvalidContinue, NotFound, StoreError
from certs.tokens import ADMIN_GROUP, Identity, identity_from_certificate

log = logging.getLogger("certs.api")
audit = logging.getLogger("certs.audit")
http_log = logging.getLogger("certs.http")
"""aiohttp's server logger for the API listener (see :class:`_MalformedRequests`)."""

CSR_PATH = "/apis/certificates.k8s.io/v1/certificatesigningrequests"
CLUSTER_INFO_PATH = "/api/v1/namespaces/kube-public/configmaps/cluster-info"
MAX_BODY = 1024 * 1024
MAX_LIMIT = 1000
"""Largest page a list returns (``?limit=``)."""

Authenticate = Callable[[web.Request], Awaitable[Identity | None]]


class Unauthorized(Exception):
    """No valid credentials (HTTP 401)."""


class BadRequest(Exception):
    """The request body cannot be read as JSON (HTTP 400)."""


class _MalformedRequests(logging.Filter):
    """aiohttp reports a request its parser refused (bytes not allowed in a header, ...) as an error with a traceback
    that quotes the offending line, credentials included. Such a refusal becomes the one ``certs.audit`` line every
    refusal is, with the parser's reason and without the quoted bytes; anything else passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        reason = ((exc.message or type(exc).__name__).splitlines() or [""])[0].strip(" :")[:100]
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        audit.warning("certificates API refused: malformed request: %s", reason,
                      extra={"peer": str(peer or "unknown"), "status": exc.code})
        return False


http_log.addFilter(_MalformedRequests())


def status(code: int, reason: str, message: str) -> web.Response:
    """A ``metav1.Status`` failure response."""
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    return web.json_response(body, status=code)


def tls_authenticator(service: CertService) -> Authenticate:
    """Bearer token when an Authorization header is sent (it must then be valid), else the client certificate."""

    async def authenticate(request: web.Request) -> Identity | None:
        header = request.headers.get("Authorization")
        if header is not None:
            # HTTP header values are bytes; aiohttp hands them over decoded leniently (surrogate escapes). A token is
            # visible ASCII: anything else is refused here, before it reaches a hash or a comparison.
            if not header.isascii() or not header.isprintable():
                raise Unauthorized("Unauthorized: the Authorization header is not printable ASCII")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return None
            return await service.authenticator.authenticate(token.strip())
        transport = request.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if der:
            return identity_from_certificate(x509.load_der_x509_certificate(der))
        return None

    return authenticate


def peer_uid(request: web.Request) -> int | None:
    """The uid of the process on the other end of a unix socket connection (``SO_PEERCRED``), else None."""
    transport = request.transport
    return netnames.peer_uid(transport.get_extra_info("socket") if transport is not None else None)


def local_authenticator(admin_uids: Iterable[int] | None = None) -> Authenticate:
    """Callers on the local unix socket are administrators when their uid is root or the daemon's own (or one of
    ``admin_uids``); the audit names them ``uid=N``. Anything not on a unix socket is refused."""
    allowed = set(admin_uids) if admin_uids is not None else {0, os.geteuid()}

    async def authenticate(request: web.Request) -> Identity | None:
        uid = peer_uid(request)
        if uid is None:
            return None
        if uid not in allowed:
            raise Forbidden(f"uid={uid} may not manage certificate signing requests (root or the daemon's user)")
        return Identity(f"uid={uid}", str(uid), (ADMIN_GROUP,), method="local")

    return authenticate


def _refused(request: web.Request, code: int, why: str) -> None:
    """One audit line per refused caller: who (address), what (method, path), why; never the credentials."""
    audit.warning("certificates API refused: %s", why, extra={
        "peer": request.remote or "unix", "method": request.method, "path": request.path[:200], "status": code})


def make_app(service: CertService, authenticate: Authenticate, server_url: str | None = None,
             node_ssh: NodeSSHIssuer | None = None) -> web.Application:
    """The API application. ``server_url`` (the URL nodes reach this API at) enables ``cluster-info``; ``node_ssh``
    enables ``nodesshcertificates``."""

    @web.middleware
    async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        try:
            return await handler(request)
        except Unauthorized as exc:
            _refused(request, 401, str(exc) or "Unauthorized")
            return status(401, "Unauthorized", str(exc) or "Unauthorized")
        except Forbidden as exc:
            _refused(request, 403, str(exc))
            return status(403, "Forbidden", str(exc))
        except BadRequest as exc:
            _refused(request, 400, str(exc))
            return status(400, "BadRequest", str(exc))
        except NotFound as exc:
            return status(404, "NotFound", str(exc))
        except InvalidContinue as exc:
            return status(410, "Expired", str(exc)) if exc.expired else status(400, "BadRequest", str(exc))
        except AlreadyExists as exc:
            return status(409, "AlreadyExists", str(exc))
        except (ConditionConflict, Conflict) as exc:
            return status(409, "Conflict", str(exc))
        except CSRInvalid as exc:
            return status(422, "Invalid", str(exc))
        except QuotaExceeded as exc:
            _refused(request, 429, str(exc))
            return status(429, "TooManyRequests", str(exc))
        except Contended as exc:
            log.info("%s", exc)
            return status(503, "ServiceUnavailable", str(exc))
        except StoreError as exc:
            log.error("store error: %s", exc)
            return status(503, "ServiceUnavailable", "the certificate store is unavailable")
        except web.HTTPRequestEntityTooLarge:
            _refused(request, 413, f"request body larger than {MAX_BODY} bytes")
            return status(413, "RequestEntityTooLarge", f"request body larger than {MAX_BODY} bytes")
        except web.HTTPException as exc:
            if exc.status >= 400:
                return status(exc.status, exc.reason.replace(" ", ""), exc.reason)
            raise

    async def caller(request: web.Request) -> Identity:
        ident = await authenticate(request)
        if ident is None:
            raise Unauthorized("Unauthorized: a valid bearer token or client certificate is required")
        return ident

    async def body(request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BadRequest("the body is not valid JSON") from exc
        except RecursionError as exc:  # the C decoder guards its recursion: [[[[... 50,000 deep lands here
            raise BadRequest("the body is not valid JSON: nested too deeply") from exc

    async def create(request: web.Request) -> web.Response:
        who = await caller(request)
        data = await body(request)
        csr = await service.create(who, data)
        return web.json_response(csr.to_dict(), status=201)

    async def list_(request: web.Request) -> web.Response:
        who = await caller(request)
        limit_text, token = request.query.get("limit", ""), request.query.get("continue", "")
        meta: dict[str, str] = {}
        if limit_text or token:
            if not limit_text.isdigit() or not 0 < int(limit_text) <= MAX_LIMIT:
                raise BadRequest(f"limit: a whole number from 1 to {MAX_LIMIT} is required")
            page, nxt = await service.list_page(who, int(limit_text), token[:4096])
            items = [c.to_dict() for c in page]
            if nxt:
                meta["continue"] = nxt
        else:
            items = [c.to_dict() for c in await service.list(who)]
        return web.json_response({"apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequestList",
                                  "metadata": meta, "items": items})

    async def get(request: web.Request) -> web.Response:
        who = await caller(request)
        return web.json_response((await service.get(who, request.match_info["name"])).to_dict())

    async def delete(request: web.Request) -> web.Response:
        who = await caller(request)
        csr = await service.delete(who, request.match_info["name"])
        return web.json_response({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {"name": csr.name, "group": "certificates.k8s.io", "kind": "certificatesigningrequests",
                        "uid": csr.metadata_uid}})

    async def approval(request: web.Request) -> web.Response:
        who = await caller(request)
        data = await body(request)
        csr = await service.approval_from_body(who, request.match_info["name"], data)
        return web.json_response(csr.to_dict())

    async def audit(request: web.Request) -> web.Response:
        who = await caller(request)
        if not who.is_admin:
            raise Forbidden(f"{who.user} may not read the audit log")
        name = request.match_info["name"]
        await service.get(who, name)
        records = await service.store.list_audit(name)
        return web.json_response({"kind": "AuditRecordList", "items": [r.to_dict() for r in records]})

    async def cluster_info(request: web.Request) -> web.Response:
        assert server_url is not None
        return web.json_response(await service.cluster_info(server_url))

    async def node_ssh_certificate(request: web.Request) -> web.Response:
        assert node_ssh is not None
        who = await caller(request)
        return web.json_response(node_ssh.issue(who, await body(request)), status=201)

    app = web.Application(middlewares=[errors], client_max_size=MAX_BODY)
    routes = [
        web.post(CSR_PATH, create),
        web.get(CSR_PATH, list_),
        web.get(CSR_PATH + "/{name}", get),
        web.delete(CSR_PATH + "/{name}", delete),
        web.put(CSR_PATH + "/{name}/approval", approval),
        web.get(CSR_PATH + "/{name}/audit", audit),
    ]
    if server_url is not None:
        routes.append(web.get(CLUSTER_INFO_PATH, cluster_info))
    if node_ssh is not None:
        routes.append(web.post(NODE_SSH_PATH, node_ssh_certificate))
    app.add_routes(routes)
    return app


def api_tls_context(cert_file: str, key_file: str, ca: str | bytes) -> ssl.SSLContext:
    """The API listener's TLS: our server certificate; client certificates optional, verified against the CA
    (``ca``: a file name, or the CA certificate itself as PEM bytes)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    if isinstance(ca, bytes):
        ctx.load_verify_locations(cadata=ca.decode("ascii"))
    else:
        ctx.load_verify_locations(cafile=ca)
    return ctx


class APIServer:
    """Runs an API application on one TCP listener (TLS)."""

    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None, logger=http_log)
        self.port: int | None = None

    async def start(self, host: str, port: int, context: ssl.SSLContext | None) -> None:
        """Bind and serve; :attr:`port` holds the bound port (useful with port 0)."""
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=context)
        await site.start()
        server = site._server
        if isinstance(server, asyncio.Server) and server.sockets:
            self.port = server.sockets[0].getsockname()[1]
        log.info("certificates API listening", extra={"host": host, "port": self.port, "tls": context is not None})

    async def stop(self) -> None:
        """Close the listener and open connections."""
        await self._runner.cleanup()

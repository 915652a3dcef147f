"""A small HTTPS client for the control plane's certificate API (the node side of bootstrap).

It speaks the subset of the Kubernetes API the bootstrap needs: the unauthenticated ``cluster-info`` ConfigMap in
``kube-public`` and the ``certificates.k8s.io/v1`` CertificateSigningRequest collection (create, get, list). Callers
authenticate with a bearer token or a client certificate; the server is verified against a given CA, except for the
one deliberate unverified fetch of ``cluster-info`` during discovery. Responses are size-bounded, and failures are
translated into :class:`APIError` (the server answered with a ``Status``) or :class:`APIUnavailable` (no answer).
"""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

CLUSTER_INFO_PATH = "/api/v1/namespaces/kube-public/configmaps/cluster-info"
CSR_PATH = "/apis/certificates.k8s.io/v1/certificatesigningrequests"
MAX_BODY = 8 * 1024 * 1024


class APIUnavailable(Exception):
    """The API server could not be reached or gave no usable answer."""


class APIError(Exception):
    """The API server refused a request (a ``Status`` object: code, reason, message)."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        """Remember the HTTP status, the Status reason and message."""
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message


def tls_context(
    ca_pem: bytes | None, client_cert: Path | None = None, client_key: Path | None = None
) -> ssl.SSLContext:
    """A client TLS context verifying the server against ``ca_pem`` (host name included); ``None`` verifies nothing.

    Unverified contexts exist only for the discovery step, whose answer is authenticated by other means.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_pem is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cadata=ca_pem.decode("ascii", errors="replace"))
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert), str(client_key or client_cert))
    return ctx


class APIClient:
    """One API server, one identity. Use as ``async with APIClient(...) as api:``."""

    def __init__(self, server: str, context: ssl.SSLContext, token: str | None = None, timeout: float = 30.0) -> None:
        """``server`` is the base URL (``https://host:port``); ``token`` a bearer token, if any."""
        if not server.startswith("https://"):
            raise ValueError(f"the API server URL must start with https:// (got {server!r})")
        self.server = server.rstrip("/")
        self._context = context
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        """No token in reprs."""
        return f"APIClient({self.server!r}, token={'<set>' if self._token else None})"

    async def __aenter__(self) -> APIClient:
        """Open the HTTP session."""
        headers = {"Accept": "application/json", "User-Agent": "tunneld-bootstrap"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        connector = aiohttp.TCPConnector(ssl=self._context, limit=4)
        self._session = aiohttp.ClientSession(headers=headers, connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send a JSON request; return the decoded JSON answer or raise :class:`APIError`/:class:`APIUnavailable`."""
        assert self._session is not None, "use APIClient as an async context manager"
        url = self.server + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            async with self._session.request(method, url, data=data, headers=headers, allow_redirects=False) as resp:
                raw = await _read_bounded(resp)
                status = resp.status
        except ssl.SSLCertVerificationError as exc:
            raise APIUnavailable(f"{url}: the server's certificate is not trusted: {exc.verify_message}") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            raise APIUnavailable(f"{url}: the server's certificate is not trusted: {exc.certificate_error}") from exc
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise APIUnavailable(f"{url}: {str(exc) or type(exc).__name__}") from exc
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        if 200 <= status < 300:
            if answer is None:
                raise APIUnavailable(f"{url}: answered {status} without a JSON body")
            return answer
        if isinstance(answer, dict) and answer.get("kind") == "Status":
            raise APIError(status, str(answer.get("reason") or ""), str(answer.get("message") or ""))
        raise APIError(status, "", raw[:200].decode("utf-8", errors="replace").strip())

    async def cluster_info(self) -> dict[str, Any]:
        """The ``kube-public/cluster-info`` ConfigMap."""
        answer = await self.request("GET", CLUSTER_INFO_PATH)
        if not isinstance(answer, dict) or not isinstance(answer.get("data"), dict):
            raise APIUnavailable("cluster-info is not a ConfigMap with data")
        return answer

    async def create_csr(
        self, request_pem: bytes, signer_name: str, usages: list[str], *, generate_name: str = "node-csr-",
        expiration_seconds: int | None = None, name: str | None = None,
    ) -> dict[str, Any]:
        """POST a CertificateSigningRequest named ``name`` (else a server-assigned name); the created object."""
        spec: dict[str, Any] = {
            "request": base64.b64encode(request_pem).decode("ascii"),
            "signerName": signer_name,
            "usages": usages,
        }
        if expiration_seconds is not None:
            spec["expirationSeconds"] = expiration_seconds
        body = {
            "apiVersion": "certificates.k8s.io/v1",
            "kind": "CertificateSigningRequest",
            "metadata": {"name": name} if name else {"generateName": generate_name},
            "spec": spec,
        }
        return _object(await self.request("POST", CSR_PATH, body))

    async def get_csr(self, name: str) -> dict[str, Any]:
        """GET one CertificateSigningRequest."""
        return _object(await self.request("GET", f"{CSR_PATH}/{name}"))

    async def list_csrs(self) -> list[dict[str, Any]]:
        """GET the CertificateSigningRequests this caller may see."""
        answer = await self.request("GET", CSR_PATH)
        items = answer.get("items") if isinstance(answer, dict) else None
        if not isinstance(items, list):
            raise APIUnavailable("the CSR list has no items")
        return items


def _object(answer: Any) -> dict[str, Any]:
    if not isinstance(answer, dict) or not isinstance(answer.get("metadata"), dict):
        raise APIUnavailable("the answer is not a Kubernetes object")
    return answer


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    if resp.content_length is not None and resp.content_length > MAX_BODY:
        raise APIUnavailable(f"answer of {resp.content_length} bytes is larger than {MAX_BODY}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY:
            raise APIUnavailable(f"answer larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)

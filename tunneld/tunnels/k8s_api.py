"""The Kubernetes API boundary of the node source: list and watch Node objects over lightkube's configured client.

    LIST   GET /api/v1/nodes?limit=500[&continue=TOKEN][&labelSelector=SEL]
    WATCH  GET /api/v1/nodes?watch=true&resourceVersion=RV&allowWatchBookmarks=true&timeoutSeconds=T[&labelSelector=]

Every failure is raised as a typed :class:`~tunneld.tunnels.k8s_nodes.KubeInventoryError`; tokens are never logged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from tunneld.config import KubernetesInventorySettings
from tunneld.tunnels.k8s_nodes import (
    KubeAPIError,
    KubeAuthError,
    KubeCredentialsError,
    KubeInventoryError,
    KubeProtocolError,
    ResourceExpired,
    get_path,
)

NODES_PATH = "/api/v1/nodes"
LIST_PAGE_SIZE = 500
MAX_LIST_PAGE_BYTES = 64 * 1024 * 1024
MAX_EVENT_BYTES = 8 * 1024 * 1024



def _status_error(code: int, body: bytes, server: str) -> KubeAPIError:
    reason, message = "", ""
    with contextlib.suppress(ValueError, AttributeError):
        status = json.loads(body[:64 * 1024])
        reason = str(status.get("reason") or "")
        message = str(status.get("message") or "")
        code = int(status.get("code") or code)
    return _typed_error(code, reason, message[:300], server)


def _typed_error(code: int, reason: str, message: str, server: str) -> KubeAPIError:
    reason = reason or {401: "Unauthorized", 403: "Forbidden", 410: "Gone"}.get(code, "Error")
    if code in (401, 403):
        return KubeAuthError(code, reason, message, server)
    if code == 410:
        return ResourceExpired(code, reason, message, server)
    return KubeAPIError(code, reason, message, server)


def resource_version(obj: Any) -> str | None:
    rv = get_path(obj, "metadata", "resourceVersion")
    return rv if isinstance(rv, str) and rv else None


class KubeAPI:
    """List and watch Node objects over an HTTP client configured with the cluster's URL, CA and credentials.

    Every failure is raised as a :class:`KubeInventoryError` subclass.
    """

    def __init__(self, client: Any, server: str, label_selector: str | None = None) -> None:
        from lightkube.config import client_adapter

        # The httpx flavour lightkube was built against (``httpx`` or its successor ``httpx2``).
        self._httpx = client_adapter.httpx
        self.client = client
        self.server = server
        self.label_selector = label_selector
        self.page_size = LIST_PAGE_SIZE

    @classmethod
    def from_settings(cls, settings: KubernetesInventorySettings, timeout: float = 10.0) -> KubeAPI:
        """Build from a kubeconfig file (its current context) or, without one, the pod's service account."""
        try:
            from lightkube import KubeConfig
            from lightkube.config import client_adapter
        except ImportError as exc:  # pragma: no cover - lightkube is in the "kubernetes" extra
            raise KubeCredentialsError("the kubernetes inventory needs lightkube: pip install 'tunneld[kubernetes]'") \
                from exc
        where = str(settings.kubeconfig) if settings.kubeconfig else "the in-cluster service account"
        try:
            kube = KubeConfig.from_file(settings.kubeconfig) if settings.kubeconfig else \
                KubeConfig.from_service_account()
            single = kube.get()
            if single is None:
                raise KubeCredentialsError(f"{where}: no current context")
            params = client_adapter.ConnectionParams(timeout=client_adapter.httpx.Timeout(timeout), trust_env=False)
            client = client_adapter.AsyncClient(single, params)
        except KubeCredentialsError:
            raise
        except Exception as exc:  # lightkube raises ConfigError, KeyError, OSError, ssl.SSLError, yaml errors
            raise KubeCredentialsError(f"{where}: {type(exc).__name__}: {exc}") from exc
        return cls(client, single.cluster.server, settings.label_selector)

    async def close(self) -> None:
        await self.client.aclose()

    def _params(self, **extra: str) -> dict[str, str]:
        params = dict(extra)
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        return params

    @contextlib.asynccontextmanager
    async def _request(self, params: dict[str, str], read_timeout: float) -> AsyncIterator[Any]:
        httpx = self._httpx
        timeout = httpx.Timeout(self.client.timeout.connect or 10.0, read=read_timeout)
        try:
            async with self.client.stream("GET", NODES_PATH, params=params, timeout=timeout) as resp:
                if resp.status_code != 200:
                    body = b""
                    async for chunk in resp.aiter_bytes():
                        body += chunk
                        if len(body) > 64 * 1024:
                            break
                    raise _status_error(resp.status_code, body, self.server)
                yield resp
        except httpx.HTTPError as exc:
            raise KubeInventoryError(f"{self.server}: {type(exc).__name__}: {str(exc) or 'connection failed'}") from exc
        except OSError as exc:  # TLS verification failures and friends surface as OSError subclasses
            raise KubeInventoryError(f"{self.server}: {type(exc).__name__}: {exc}") from exc

    async def list_nodes(self, read_timeout: float = 60.0) -> tuple[list[dict[str, Any]], str]:
        """All nodes (in pages of :attr:`page_size`) and the resourceVersion the list is consistent at."""
        items: list[dict[str, Any]] = []
        token = ""
        for _ in range(100_000):
            params = self._params(limit=str(self.page_size))
            if token:
                params["continue"] = token
            async with self._request(params, read_timeout) as resp:
                body = bytearray()
                async for chunk in resp.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_LIST_PAGE_BYTES:
                        raise KubeProtocolError(f"{self.server}: a NodeList page exceeds {MAX_LIST_PAGE_BYTES} bytes")
            try:
                page = json.loads(body)
            except ValueError as exc:
                raise KubeProtocolError(f"{self.server}: the NodeList is not JSON: {exc}") from exc
            page_items = page.get("items") if isinstance(page, dict) else None
            rv = resource_version(page)
            if not isinstance(page_items, list) or rv is None:
                raise KubeProtocolError(f"{self.server}: not a NodeList (items and metadata.resourceVersion needed)")
            items.extend(i for i in page_items if isinstance(i, dict))
            token = get_path(page, "metadata", "continue") or ""
            if not token:
                return items, rv
        raise KubeProtocolError(f"{self.server}: the NodeList never ends")

    async def watch_nodes(self, resource_version: str, timeout_seconds: int) \
            -> AsyncGenerator[tuple[str, dict[str, Any]], None]:
        """Events after ``resource_version`` until the server ends the stream. ERROR events are raised as
        :class:`KubeAPIError` (:class:`ResourceExpired` for 410); BOOKMARKs are yielded like other events."""
        params = self._params(watch="true", resourceVersion=resource_version, allowWatchBookmarks="true",
                              timeoutSeconds=str(timeout_seconds))
        async with self._request(params, read_timeout=timeout_seconds + 30.0) as resp:
            buf = bytearray()
            try:
                async for chunk in resp.aiter_bytes():
                    buf += chunk
                    while (end := buf.find(b"\n")) >= 0:
                        line = bytes(buf[:end])
                        del buf[:end + 1]
                        if line.strip():
                            yield self._event(line)
                    if len(buf) > MAX_EVENT_BYTES:
                        raise KubeProtocolError(f"{self.server}: a watch event exceeds {MAX_EVENT_BYTES} bytes")
            except self._httpx.HTTPError as exc:
                raise KubeInventoryError(f"{self.server}: watch broke: {type(exc).__name__}: {exc}") from exc
            if buf.strip():
                yield self._event(bytes(buf))

    def _event(self, line: bytes) -> tuple[str, dict[str, Any]]:
        try:
            event = json.loads(line)
        except ValueError as exc:
            raise KubeProtocolError(f"{self.server}: a watch event is not JSON: {exc}") from exc
        kind = get_path(event, "type")
        obj = get_path(event, "object")
        if not isinstance(kind, str) or not isinstance(obj, dict):
            raise KubeProtocolError(f"{self.server}: a watch event needs a type and an object")
        if kind == "ERROR":
            code = obj.get("code")
            raise _typed_error(code if isinstance(code, int) else 500, str(obj.get("reason") or ""),
                               str(obj.get("message") or "")[:300], self.server)
        return kind, obj



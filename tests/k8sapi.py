"""A small Kubernetes API server for tests: Node objects over HTTPS with the real list/watch wire format.

What it speaks (as kube-apiserver does):

- ``GET /api/v1/nodes[?limit=N&continue=T&labelSelector=S]``: a ``NodeList`` whose ``metadata.resourceVersion`` is
  the version the list is consistent at, paginated with ``metadata.continue``.
- ``GET /api/v1/nodes?watch=true&resourceVersion=RV[&allowWatchBookmarks=true&timeoutSeconds=T&labelSelector=S]``:
  a chunked ``application/json`` stream of lines ``{"type": ..., "object": ...}``: every change after RV from the
  history, then live changes. A modification that moves an object out of (into) a label selection is sent as
  DELETED (ADDED), as the real server does. BOOKMARKs go only to watchers that asked for them.
- A resourceVersion older than the compacted history: a single ``ERROR`` event whose object is a ``Status`` with
  code 410 and reason ``Expired`` (or, with ``gone_as_http``, an HTTP 410 answer carrying that Status).
- ``Authorization: Bearer <token>`` is checked (constant time); anything else gets a 401 Status.

Every resourceVersion is a counter; objects carry the version of their last change. Tests drive it with
:meth:`add_node`, :meth:`modify_node`, :meth:`delete_node`, :meth:`drop_watches`, :meth:`compact` and
:meth:`bookmark`, and read :attr:`requests` to see what the client asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import json
import secrets
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from certs.files import write_secret
from tunneld.dev.pki import DevCA

JSON = "application/json"


def node_object(name: str, internal_ip: str | None, pod_cidr: str | None = None, kubelet_port: int | None = 10250,
                labels: dict[str, str] | None = None, external_ip: str | None = None,
                unschedulable: bool = False, ready: bool = True) -> dict[str, Any]:
    """A Node object shaped as the API returns it (the fields the gateway reads, and a few it must ignore)."""
    addresses = [{"type": "Hostname", "address": name}]
    if internal_ip is not None:
        addresses.insert(0, {"type": "InternalIP", "address": internal_ip})
    if external_ip is not None:
        addresses.append({"type": "ExternalIP", "address": external_ip})
    spec: dict[str, Any] = {}
    if pod_cidr is not None:
        spec["podCIDR"] = pod_cidr
        spec["podCIDRs"] = [pod_cidr]
    if unschedulable:
        spec["unschedulable"] = True
    status: dict[str, Any] = {
        "addresses": addresses,
        "conditions": [{"type": "Ready", "status": "True" if ready else "Unknown",
                        "reason": "KubeletReady" if ready else "NodeStatusUnknown"}],
        "nodeInfo": {"kubeletVersion": "v1.30.0", "osImage": "Debian GNU/Linux 12"},
    }
    if kubelet_port is not None:
        status["daemonEndpoints"] = {"kubeletEndpoint": {"Port": kubelet_port}}
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {"name": name, "uid": secrets.token_hex(16), "labels": dict(labels or {})},
        "spec": spec,
        "status": status,
    }


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _matches(obj: dict[str, Any] | None, selector: str | None) -> bool:
    """Equality-based label selectors (``a=b,c!=d,e``), enough for the tests."""
    if obj is None:
        return False
    if not selector:
        return True
    labels = obj["metadata"].get("labels") or {}
    for term in selector.split(","):
        term = term.strip()
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.strip().rstrip("=")) != value.strip().lstrip("="):
                return False
        elif term not in labels:
            return False
    return True


@dataclass
class _Change:
    rv: int
    old: dict[str, Any] | None
    new: dict[str, Any] | None


@dataclass(eq=False)
class _Watcher:
    selector: str | None
    bookmarks: bool
    queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


@dataclass
class Request:
    """What one client request asked for."""

    kind: str  # "list" or "watch"
    params: dict[str, str]
    status: int = 200


class FakeKubeAPI:
    """An HTTPS API server holding Node objects, on ``host`` (a loopback address) and a free port."""

    def __init__(self, workdir: Path, host: str = "127.0.0.1", token: str | None = None) -> None:
        self.workdir = workdir
        self.host = host
        self.token = token or secrets.token_urlsafe(24)
        self.nodes: dict[str, dict[str, Any]] = {}
        self.rv = 100
        self.compacted = 0
        """Watches from a resourceVersion below this get 410 Expired."""
        self.gone_as_http = False
        """Answer an expired resourceVersion with HTTP 410 instead of an ERROR event."""
        self.forbidden = False
        """Answer every (authenticated) request with 403, as for a user without RBAC permission on nodes."""
        self.requests: list[Request] = []
        self.history: list[_Change] = []
        self._watchers: set[_Watcher] = set()
        self._pages: dict[str, list[dict[str, Any]]] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.ca_file = workdir / "k8s-ca.crt"

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        """Serve on ``port`` (0: a free one). A work directory that already holds a CA and serving certificate (an
        earlier server's) is reused, as a restarted API server keeps its certificate."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        cert, key = self.workdir / "k8s-apiserver.crt", self.workdir / "k8s-apiserver.key"
        if not (self.ca_file.exists() and cert.exists() and key.exists()):
            ca = DevCA("test kubernetes CA")
            issued = ca.issue_serving("kube-apiserver", [self.host, "localhost"])
            self.ca_file.write_bytes(ca.cert_pem)
            cert.write_bytes(issued.cert_pem)
            write_secret(key, issued.key_pem)
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)
        app = web.Application()
        app.router.add_get("/api/v1/nodes", self._nodes)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port, ssl_context=tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        self.drop_watches()
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    def write_kubeconfig(self, path: Path | None = None, token: str | None = None) -> Path:
        """A kubeconfig (YAML; JSON is YAML) for this server: CA file, bearer token, one context. Written 0600."""
        path = path or self.workdir / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)}}],
            "users": [{"name": "tunneld", "user": {"token": token if token is not None else self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "tunneld"}}],
            "current-context": "test",
        }
        write_secret(path, json.dumps(config, indent=2).encode())
        return path

    # -- changes driven by the test ----------------------------------------------------------------------------

    def _change(self, old: dict[str, Any] | None, new: dict[str, Any] | None) -> None:
        self.rv += 1
        if new is not None:
            new["metadata"]["resourceVersion"] = str(self.rv)
        change = _Change(self.rv, copy.deepcopy(old), copy.deepcopy(new))
        if new is None and change.old is not None:  # a DELETED event carries the deletion's version
            change.old["metadata"]["resourceVersion"] = str(self.rv)
        self.history.append(change)
        for w in self._watchers:
            w.queue.put_nowait(change)

    def add_node(self, obj: dict[str, Any]) -> None:
        name = obj["metadata"]["name"]
        assert name not in self.nodes, name
        self.nodes[name] = obj
        self._change(None, obj)

    def modify_node(self, name: str, obj: dict[str, Any]) -> None:
        old = self.nodes[name]
        obj["metadata"]["uid"] = old["metadata"]["uid"]
        self.nodes[name] = obj
        self._change(old, obj)

    def touch_node(self, name: str) -> None:
        """A MODIFIED event that changes nothing the gateway reads (like a status heartbeat)."""
        obj = copy.deepcopy(self.nodes[name])
        obj["status"]["nodeInfo"]["heartbeat"] = str(self.rv)
        self.modify_node(name, obj)

    def delete_node(self, name: str) -> None:
        self._change(self.nodes.pop(name), None)

    def compact(self) -> None:
        """Forget the history: any watch from a version before now gets 410 Expired."""
        self.compacted = self.rv + 1
        self.history.clear()

    def bookmark(self) -> None:
        """Send a BOOKMARK with the current version to watchers that allowed bookmarks."""
        for w in self._watchers:
            if w.bookmarks:
                w.queue.put_nowait(("BOOKMARK", self.rv))

    def drop_watches(self, abort: bool = False) -> None:
        """End every open watch: cleanly (the chunked stream ends) or by cutting the connection."""
        for w in self._watchers:
            w.queue.put_nowait("abort" if abort else "end")

    @property
    def watch_count(self) -> int:
        return len(self._watchers)

    def list_requests(self) -> list[Request]:
        return [r for r in self.requests if r.kind == "list"]

    def watch_requests(self) -> list[Request]:
        return [r for r in self.requests if r.kind == "watch"]

    # -- HTTP --------------------------------------------------------------------------------------------------

    @staticmethod
    def _json(data: dict[str, Any], status: int = 200) -> web.Response:
        return web.Response(body=json.dumps(data).encode(), status=status, headers={"Content-Type": JSON})

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        expected = f"Bearer {self.token}"
        return hmac.compare_digest(header.encode(), expected.encode())

    async def _nodes(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        watch = params.get("watch") in ("true", "1")
        record = Request("watch" if watch else "list", params)
        self.requests.append(record)
        if not self._authorized(request):
            record.status = 401
            return self._json(_status(401, "Unauthorized", "Unauthorized"), 401)
        if self.forbidden:
            record.status = 403
            verb = "watch" if watch else "list"
            return self._json(_status(403, "Forbidden", f'nodes is forbidden: User "tunneld" cannot {verb} resource '
                                      '"nodes" in API group "" at the cluster scope'), 403)
        if watch:
            return await self._watch(request, params, record)
        return self._list(params, record)

    def _list(self, params: dict[str, str], record: Request) -> web.Response:
        selector = params.get("labelSelector")
        token = params.get("continue")
        if token:
            if token not in self._pages:
                record.status = 410
                return self._json(_status(410, "Expired", "The provided continue parameter is too old"), 410)
            rest = self._pages.pop(token)
        else:
            rest = [copy.deepcopy(o) for _, o in sorted(self.nodes.items()) if _matches(o, selector)]
        limit = int(params.get("limit") or 0)
        page, more = (rest[:limit], rest[limit:]) if limit > 0 else (rest, [])
        meta: dict[str, Any] = {"resourceVersion": str(self.rv)}
        if more:
            next_token = secrets.token_urlsafe(12)
            self._pages[next_token] = more
            meta["continue"] = next_token
        items = []
        for obj in page:
            obj = copy.deepcopy(obj)
            obj.pop("kind", None)  # items of a list carry no kind/apiVersion
            obj.pop("apiVersion", None)
            items.append(obj)
        return self._json({"kind": "NodeList", "apiVersion": "v1", "metadata": meta, "items": items})

    @staticmethod
    def _event_for(change: _Change, selector: str | None) -> tuple[str, dict[str, Any]] | None:
        was, now = _matches(change.old, selector), _matches(change.new, selector)
        if now and was:
            return "MODIFIED", change.new  # type: ignore[return-value]
        if now:
            return "ADDED", change.new  # type: ignore[return-value]
        if was:
            gone = copy.deepcopy(change.old) if change.new is None else copy.deepcopy(change.new)
            gone["metadata"]["resourceVersion"] = str(change.rv)  # type: ignore[index]
            return "DELETED", gone  # type: ignore[return-value]
        return None

    async def _watch(self, request: web.Request, params: dict[str, str], record: Request) -> web.StreamResponse:
        selector = params.get("labelSelector")
        rv_text = params.get("resourceVersion", "")
        expired = None
        backlog: list[tuple[str, dict[str, Any]]] = []
        if rv_text in ("", "0"):
            backlog = [("ADDED", copy.deepcopy(o)) for _, o in sorted(self.nodes.items()) if _matches(o, selector)]
        elif not rv_text.isdigit():
            record.status = 400
            return self._json(_status(400, "BadRequest", f"invalid resourceVersion {rv_text!r}"), 400)
        else:
            rv = int(rv_text)
            if rv < self.compacted - 1:
                expired = _status(410, "Expired", f"too old resource version: {rv} ({self.compacted - 1})")
            else:
                for change in self.history:
                    if change.rv > rv and (ev := self._event_for(change, selector)) is not None:
                        backlog.append(ev)
        if expired is not None and self.gone_as_http:
            record.status = 410
            return self._json(expired, 410)
        resp = web.StreamResponse(headers={"Content-Type": JSON})
        resp.enable_chunked_encoding()
        await resp.prepare(request)

        async def send(kind: str, obj: dict[str, Any]) -> None:
            await resp.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

        if expired is not None:
            await send("ERROR", expired)
            await resp.write_eof()
            return resp
        watcher = _Watcher(selector, params.get("allowWatchBookmarks") == "true")
        self._watchers.add(watcher)
        timeout = float(params.get("timeoutSeconds") or 1800)
        try:
            for kind, obj in backlog:
                await send(kind, obj)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while loop.time() < deadline:
                if request.transport is None or request.transport.is_closing():
                    return resp  # the client went away
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), min(max(deadline - loop.time(), 0.0), 0.05))
                except TimeoutError:
                    continue
                if item == "end":
                    break
                if item == "abort":
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if isinstance(item, tuple):
                    await send("BOOKMARK", {"kind": "Node", "apiVersion": "v1",
                                            "metadata": {"resourceVersion": str(item[1])}})
                elif (ev := self._event_for(item, selector)) is not None:
                    await send(*ev)
        except ConnectionResetError:
            return resp
        finally:
            self._watchers.discard(watcher)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

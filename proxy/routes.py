"""Parsing apiserver-style URLs into what to reach. Pure functions, no I/O.

    /api/v1/nodes/{id}/proxy[/{path}]
    /api/v1/namespaces/{ns}/pods/{id}/proxy[/{path}]
    /api/v1/namespaces/{ns}/services/{id}/proxy[/{path}]
    /api/v1/namespaces/{ns}/pods/{pod}/{log|exec|attach|portforward}

``{id}`` is ``name``, ``name:port`` or ``scheme:name:port`` (scheme ``http`` or ``https``), as the apiserver's
``SplitSchemeNamePort``. The target is decided by these identifying segments alone: they are percent-decoded one
segment at a time and must be plain names, so no encoding trick (``%2F``, ``%2e%2e``) can move the request to another
node, pod or service. The forwarded path keeps its encoding but may not contain dot segments or encoded slashes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from netnames import is_dns_subdomain, is_port_name, parse_port
from proxy.errors import RouteError

__all__ = ["Route", "RouteError", "parse", "split_scheme_name_port"]
SUBRESOURCES = ("log", "exec", "attach", "portforward")
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")


@dataclass(frozen=True)
class Route:
    """What a request asks for."""

    kind: str
    """``node``, ``pod``, ``service`` (proxy) or a pod subresource: ``log``, ``exec``, ``attach``, ``portforward``."""
    name: str
    namespace: str | None = None
    scheme: str = ""
    port: str = ""
    path: str = "/"
    """For proxy kinds: the path to request on the target (still percent-encoded)."""
    query: str = ""
    prefix: str = ""
    """The URL prefix up to and including ``/proxy`` (for rewriting redirects)."""


def _segment(raw: str, what: str) -> str:
    value = unquote(raw, errors="strict")
    if not value:
        raise RouteError(400, f"empty {what}")
    if "/" in value or "\\" in value or any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise RouteError(400, f"invalid {what} {value!r}")
    return value


def _name(raw: str, what: str) -> str:
    value = _segment(raw, what)
    if not is_dns_subdomain(value):
        raise RouteError(400, f"invalid {what} {value!r}")
    return value


def split_scheme_name_port(ident: str) -> tuple[str, str, str]:
    """``name`` | ``name:port`` | ``scheme:name:port`` -> (scheme, name, port)."""
    parts = ident.split(":")
    if len(parts) == 1:
        scheme, name, port = "", parts[0], ""
    elif len(parts) == 2:
        scheme, (name, port) = "", parts
    elif len(parts) == 3:
        scheme, name, port = parts
    else:
        raise RouteError(400, f"invalid id {ident!r}: expected [scheme:]name[:port]")
    if scheme not in ("", "http", "https"):
        raise RouteError(400, f"invalid scheme {scheme!r}: expected http or https")
    if not is_dns_subdomain(name):
        raise RouteError(400, f"invalid name {name!r}")
    if port and not is_port_name(port):
        try:
            port = str(parse_port(port))
        except ValueError:
            raise RouteError(400, f"invalid port {port!r}") from None
    return scheme, name, port


def _rest_path(segments: list[str]) -> str:
    path = "/" + "/".join(segments)
    if not _PATH_CHARS.fullmatch(path):
        raise RouteError(400, "invalid characters in path")
    for seg in segments:
        decoded = unquote(seg)
        if decoded in (".", "..") or "/" in decoded or "\\" in decoded or "\x00" in decoded:
            raise RouteError(400, "dot segments and encoded slashes are not allowed in proxied paths")
    return path


def parse(target: str) -> Route:
    """Parse a request target (origin form, ``/path?query``). Raises :class:`RouteError`."""
    if not target.startswith("/"):
        raise RouteError(400, "request target must be a path")
    raw_path, _, query = target.partition("?")
    if "#" in raw_path:
        raise RouteError(400, "fragment in request target")
    segs = raw_path.split("/")[1:]
    try:
        return _parse(segs, query)
    except UnicodeDecodeError as exc:
        raise RouteError(400, "invalid percent-encoding") from exc


def _parse(segs: list[str], query: str) -> Route:
    if segs[:2] != ["api", "v1"]:
        raise RouteError(404, "not found: only /api/v1/... proxy and pod subresource URLs are served here")
    rest = segs[2:]
    if len(rest) >= 3 and rest[0] == "nodes" and rest[2] == "proxy":
        scheme, name, port = split_scheme_name_port(_segment(rest[1], "node"))
        prefix = "/api/v1/nodes/" + rest[1] + "/proxy"
        return Route("node", name, None, scheme, port, _rest_path(rest[3:]), query, prefix)
    if len(rest) >= 4 and rest[0] == "namespaces" and rest[2] in ("pods", "services"):
        ns = _name(rest[1], "namespace")
        if len(rest) >= 5 and rest[4] == "proxy":
            kind = "pod" if rest[2] == "pods" else "service"
            scheme, name, port = split_scheme_name_port(_segment(rest[3], kind))
            prefix = f"/api/v1/namespaces/{rest[1]}/{rest[2]}/{rest[3]}/proxy"
            return Route(kind, name, ns, scheme, port, _rest_path(rest[5:]), query, prefix)
        if rest[2] == "pods" and len(rest) == 5 and rest[4] in SUBRESOURCES:
            return Route(rest[4], _name(rest[3], "pod"), ns, query=query)
    raise RouteError(404, "not found: unknown path")

"""TLS contexts built from files, rebuilt from scratch on SIGHUP (certificate and trust rotation without a restart).

Every TLS role (a listener, or a client such as the kubelet client) is a *role*: a function that builds a complete
context from a :class:`~tunneld.config.Config`. Reload builds a fresh context for each role from the new config —
its file paths as they are now, their contents as they are now — so a CA removed from a file, or a
``certificate_authority`` pointed at another file, is no longer trusted afterwards (OpenSSL's stores only grow, so
loading into the old context would keep the old CA). A role whose new files do not build (missing, unparsable, a key
that does not match its certificate) keeps its current context and reports why.

Clients take the new context through a callback (the proxy front reads its context per request). A listener keeps
the :class:`ssl.SSLContext` it was started with (asyncio and aiohttp hold it), so that context is only a front door:
its SNI callback, which OpenSSL runs for every ClientHello (with or without a server name), moves the connection to
the role's current context before any certificate is chosen or verified. Connections already open keep theirs.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from proxy.tls import client_context, server_context
from tunneld.config import Config, TLSServerSettings

log = logging.getLogger("tunneld.tls")

Build = Callable[[Config], ssl.SSLContext | None]
"""Builds a role's context from a config (None: the role has no TLS in that config)."""


@dataclass
class _Role:
    what: str
    build: Build
    current: ssl.SSLContext
    apply: Callable[[ssl.SSLContext], None] | None = None  # clients: hand the new context over
    front: ssl.SSLContext | None = None  # listeners: the context the listener holds


def _str(path: object) -> str | None:
    return None if path is None else str(path)


def _server(tls: TLSServerSettings | None) -> ssl.SSLContext | None:
    return None if tls is None else server_context(str(tls.cert), str(tls.key), _str(tls.client_ca))


def egress_listener(config: Config) -> ssl.SSLContext | None:
    """The egress TCP listener's context (``[egress] tls_cert``/``tls_key``/``client_ca``)."""
    return _server(config.egress.tls)


def proxy_listener(config: Config) -> ssl.SSLContext | None:
    """The proxy TCP listener's context (``[proxy] tls_cert``/``tls_key``/``client_ca``); with a token file too, a
    client certificate is optional: a caller may bring a bearer token instead (see :mod:`proxy.authn`)."""
    ctx = _server(config.proxy.tls)
    if ctx is not None and ctx.verify_mode == ssl.CERT_REQUIRED and config.auth.token_file is not None:
        ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def kubelet_client(config: Config) -> ssl.SSLContext:
    """The kubelet client's context (``[kubelet]``)."""
    k = config.kubelet
    return client_context(_str(k.certificate_authority), _str(k.client_certificate), _str(k.client_key))


def proxy_targets(config: Config) -> ssl.SSLContext:
    """The context for https: pod and service targets (``[proxy] target_certificate_authority``)."""
    return client_context(_str(config.proxy.target_certificate_authority))


class TLSFiles:
    """Builds each TLS role's context from a config and rebuilds them all on :meth:`reload`."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._roles: list[_Role] = []

    def server(self, what: str, build: Build) -> ssl.SSLContext | None:
        """A listener's context (None when the config has no TLS for it); reload swaps what it serves."""
        ctx = build(self._config)
        if ctx is None:
            return None
        role = _Role(what, build, ctx, front=ctx)

        def switch(obj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, current: ssl.SSLContext) -> None:
            if role.current is not current:
                obj.context = role.current
        ctx.sni_callback = switch
        self._roles.append(role)
        return ctx

    def client(self, what: str, build: Callable[[Config], ssl.SSLContext],
               apply: Callable[[ssl.SSLContext], None]) -> ssl.SSLContext:
        """A client's context; reload passes each new one to ``apply``."""
        ctx = build(self._config)
        self._roles.append(_Role(what, build, ctx, apply=apply))
        return ctx

    def reload(self, config: Config | None = None) -> list[str]:
        """Build every role afresh from ``config`` (default: the current one, files re-read); returns one message
        per role that keeps its current context."""
        if config is not None:
            self._config = config
        problems = []
        for role in self._roles:
            problem = self._rebuild(role)
            if problem is not None:
                problems.append(f"{role.what}: {problem}")
                log.error("%s: %s", role.what, problem)
            else:
                log.info("%s: certificates reloaded", role.what)
        return problems

    def _rebuild(self, role: _Role) -> str | None:
        try:
            ctx = role.build(self._config)
        except (OSError, ssl.SSLError, ValueError) as exc:
            return f"certificates not reloaded, keeping the current ones: {exc}"
        if ctx is None:
            return "TLS was turned off for this listener: that takes effect on restart; keeping the current ones"
        if role.front is not None and ctx.verify_mode != role.front.verify_mode:
            # A connection's verify mode comes from the listener's own context; only certificates and stores move.
            return ("client certificate verification was turned on or off: that takes effect on restart; "
                    "keeping the current certificates")
        role.current = ctx
        if role.apply is not None:
            role.apply(ctx)
        return None

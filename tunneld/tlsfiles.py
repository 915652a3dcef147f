"""TLS contexts built from files, re-read in place on SIGHUP (certificate rotation without a restart).

A listening server keeps the :class:`ssl.SSLContext` it was given, so rotation loads the new certificate and key
into that same context: every handshake from then on uses them, connections already open keep theirs. The files are
first loaded into a fresh context, so a broken or mismatched pair is refused and the old one stays in use. CA files
are loaded again too; a CA *removed* from a file stays trusted until restart (OpenSSL stores only grow).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from proxy.tls import client_context, server_context
from tunneld.config import TLSServerSettings

log = logging.getLogger("tunneld.tls")


@dataclass
class _Entry:
    what: str
    context: ssl.SSLContext
    build: Callable[[], ssl.SSLContext]
    cert: str | None
    key: str | None
    ca: str | None


class TLSFiles:
    """Builds contexts from certificate files and remembers them for :meth:`reload`."""

    def __init__(self) -> None:
        self._entries: list[_Entry] = []

    def server(self, what: str, tls: TLSServerSettings | None) -> ssl.SSLContext | None:
        """A listener's context (see :func:`proxy.tls.server_context`), or None without TLS settings."""
        if tls is None:
            return None
        cert, key, ca = str(tls.cert), str(tls.key), str(tls.client_ca) if tls.client_ca else None
        ctx = server_context(cert, key, ca)
        self._entries.append(_Entry(what, ctx, lambda: server_context(cert, key, ca), cert, key, ca))
        return ctx

    def client(self, what: str, ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
        """A client context (see :func:`proxy.tls.client_context`)."""
        ctx = client_context(ca, cert, key)
        self._entries.append(_Entry(what, ctx, lambda: client_context(ca, cert, key), cert, key, ca))
        return ctx

    def reload(self) -> list[str]:
        """Re-read every file; returns one message per context that could not be reloaded (it keeps the old ones)."""
        problems = []
        for e in self._entries:
            try:
                e.build()  # all files valid and the key matches the certificate?
                if e.cert and e.key:
                    e.context.load_cert_chain(e.cert, e.key)
                if e.ca:
                    e.context.load_verify_locations(cafile=e.ca)
            except (OSError, ssl.SSLError) as exc:
                problems.append(f"{e.what}: certificates not reloaded, keeping the current ones: {exc}")
                log.error("%s: certificates not reloaded, keeping the current ones: %s", e.what, exc)
            else:
                log.info("%s: certificates reloaded", e.what, extra={"cert": e.cert})
        return problems

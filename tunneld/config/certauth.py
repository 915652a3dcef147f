"""Loaders for the certificate authority's sections: ``[ca]``, ``[api]``, ``[auth]`` and ``[csr]``."""

from __future__ import annotations

import urllib.parse

from netnames import is_loopback, split_host_port
from tunneld.config.reader import Section
from tunneld.config.schema import APPROVAL_POLICIES, APISettings, AuthSettings, CASettings, CSRSettings


def certs_sections(c: Section, a: Section, au: Section, cs: Section, problems: list[str]
           ) -> tuple[CASettings | None, APISettings | None, AuthSettings, CSRSettings]:
    """The ``[ca]``, ``[api]``, ``[auth]`` and ``[csr]`` sections (the certificates part of the daemon)."""
    cert, key, ssh_key = c.path("cert", None), c.path("key", None), c.path("ssh_key", None)
    ssh_user_ca = c.path("ssh_user_ca", None)
    ssh_node_validity = c.integer("ssh_node_validity", 24 * 3600, minimum=60, maximum=30 * 24 * 3600)
    c.unknown()
    ca = (CASettings(cert, key, ssh_key, ssh_user_ca, ssh_node_validity) if cert is not None and key is not None
          else None)
    if (cert is None) != (key is None):
        c.problem("cert" if cert is None else "key", "cert and key go together")
    api: APISettings | None = None
    listen = a.get("listen", str, None)
    tls_cert, tls_key = a.path("tls_cert", None), a.path("tls_key", None)
    names = a.get("server_names", list, [])
    external = a.get("external_url", str, None)
    a.unknown()
    if listen is not None:
        try:
            split_host_port(listen)
        except ValueError as exc:
            a.problem("listen", str(exc))
        if (tls_cert is None) != (tls_key is None):
            a.problem("tls_cert" if tls_cert is None else "tls_key", "tls_cert and tls_key go together")
        if ca is None:
            a.problem("listen", "the certificates API needs the cluster CA: set [ca] cert and key")
        if not all(isinstance(n, str) and n for n in names):
            a.problem("server_names", "expected a list of host names or addresses")
        if external is not None and not external.startswith("https://"):
            a.problem("external_url", f"{external!r} must start with https://")
        api = APISettings(listen, tls_cert, tls_key, tuple(str(n) for n in names), external)
    elif a.data:
        a.problem("listen", "required when [api] is present")
    auth = AuthSettings(token_file=au.path("token_file", None))
    au.unknown()
    default = CSRSettings()
    csr = CSRSettings(
        approval=cs.get("approval", str, default.approval),
        approve_group=cs.get("approve_group", str, default.approve_group),
        store=cs.get("store", str, default.store),
        sqlite_path=cs.path("sqlite_path", default.sqlite_path) or default.sqlite_path,
        etcd_endpoints=tuple(str(e) for e in cs.get("etcd_endpoints", list, [])),
        etcd_prefix=cs.get("etcd_prefix", str, default.etcd_prefix),
        etcd_ca=cs.path("etcd_ca", None),
        etcd_cert=cs.path("etcd_cert", None),
        etcd_key=cs.path("etcd_key", None),
        max_pending_per_requester=cs.integer("max_pending_per_requester", default.max_pending_per_requester,
                                             minimum=1, maximum=100_000),
    )
    cs.unknown()
    if csr.approval not in APPROVAL_POLICIES:
        cs.problem("approval", f"{csr.approval!r} is not one of {', '.join(APPROVAL_POLICIES)}")
    if csr.store not in ("sqlite", "etcd"):
        cs.problem("store", f"{csr.store!r} is not sqlite or etcd")
    if csr.store == "etcd" and not csr.etcd_endpoints:
        cs.problem("etcd_endpoints", "required with store = \"etcd\" (e.g. [\"http://127.0.0.1:2379\"])")
    for endpoint in csr.etcd_endpoints:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            cs.problem("etcd_endpoints", f"{endpoint!r} must be an http:// or https:// URL")
        elif url.scheme == "http" and not is_loopback(url.hostname):
            # The store holds bootstrap tokens and the audit trail: never in clear text over a network.
            cs.problem("etcd_endpoints", f"{endpoint!r} is plain http to another host: use https:// (with etcd_ca, "
                                         "and etcd_cert/etcd_key if etcd checks client certificates)")
    if (csr.etcd_cert is None) != (csr.etcd_key is None):
        cs.problem("etcd_cert" if csr.etcd_cert is None else "etcd_key", "etcd_cert and etcd_key go together")
    tls_options = [k for k in ("etcd_ca", "etcd_cert", "etcd_key") if getattr(csr, k) is not None]
    if tls_options and not csr.etcd_https:
        cs.problem(tls_options[0], "only used with https:// etcd_endpoints")
    if not csr.etcd_prefix.startswith("/"):
        cs.problem("etcd_prefix", "must start with /")
    return ca, api, auth, csr


"""Checks on the files a config names: they exist, are files, and this user can read them."""

from __future__ import annotations

import os
from pathlib import Path

from certs.tokens import TokenFileError, load_token_file
from tunneld.config.schema import Config


def check_files(config: Config) -> list[str]:
    """Problems with the files ``config`` names (missing, a directory, unreadable), as ``FILE: KEY: path: why``.

    Kept apart from :func:`load_config` so a config can be built in tests without the files; ``check-config``,
    ``serve`` and reload use :func:`load_checked`.
    """
    named: list[tuple[str, Path | None]] = [
        ("ssh.private_key", config.ssh.private_key),
        ("ssh.certificate", config.ssh.certificate),
        ("ssh.known_hosts", None if config.ssh.insecure_skip_host_key_check else config.ssh.known_hosts),
        ("kubelet.certificate_authority", config.kubelet.certificate_authority),
        ("kubelet.client_certificate", config.kubelet.client_certificate),
        ("kubelet.client_key", config.kubelet.client_key),
        ("proxy.target_certificate_authority", config.proxy.target_certificate_authority),
    ]
    for section, tls in (("egress", config.egress.tls), ("proxy", config.proxy.tls)):
        if tls is not None:
            named += [(f"{section}.tls_cert", tls.cert), (f"{section}.tls_key", tls.key),
                      (f"{section}.client_ca", tls.client_ca)]
    if config.api is not None and config.ca is not None:  # the CA files are only needed to serve the API
        named += [("ca.cert", config.ca.cert), ("ca.key", config.ca.key),
                  ("api.tls_cert", config.api.tls_cert), ("api.tls_key", config.api.tls_key)]
    if config.api is not None or config.proxy.listen is not None:  # who reads the token file
        named.append(("auth.token_file", config.auth.token_file))
    if config.csr.store == "etcd":
        named += [("csr.etcd_ca", config.csr.etcd_ca), ("csr.etcd_cert", config.csr.etcd_cert),
                  ("csr.etcd_key", config.csr.etcd_key)]
    if config.dialin is not None:
        d = config.dialin
        named += [("dialin.host_key", d.host_key), ("dialin.host_certificate", d.host_certificate),
                  ("dialin.user_ca", d.user_ca), ("dialin.revoked_keys", d.revoked_keys)]
    for node in config.nodes:
        named += [(f"nodes ({node.name}).known_hosts", node.known_hosts),
                  (f"nodes ({node.name}).host_key", node.host_key)]
    problems = []
    for key, path in named:
        if path is None:
            continue
        why = unusable(path)
        if why:
            problems.append(f"{config.path}: {key}: {path}: {why}")
        elif key == "auth.token_file":
            try:
                load_token_file(path)
            except TokenFileError as exc:
                problems.append(f"{config.path}: {key}: {exc}")
    return problems


def unusable(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file, or None."""
    try:
        if path.is_dir():
            return "is a directory, not a file"
        if not path.exists():
            return "file not found"
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(path, os.R_OK):
        return "not readable by this user"
    return None

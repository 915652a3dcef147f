"""Checks on what the files a config names hold: each is parsed the way ``serve`` will parse it, so a key that does
not load, a certificate that does not match its key, or a known_hosts file that does not parse is reported by
``check-config`` (and refused by ``serve`` and reload) instead of making the daemon retry forever.

Files that are missing or unreadable are :mod:`tunneld.config.files`' business and skipped here.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from tunneld.config.files import unusable
from tunneld.config.schema import Config


def _readable(*paths: Path | None) -> bool:
    return all(p is not None and unusable(p) is None for p in paths)


def _ssl_reason(exc: Exception) -> str:
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            return "the key does not belong to the certificate"
        return reason.replace("_", " ").lower()
    return str(exc)


def _cert_key(problems: list[str], where: str, cert_key: str, key_key: str, cert: Path | None,
              key: Path | None) -> None:
    if cert is None or key is None or not _readable(cert, key):
        return
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        problems.append(f"{where}: {key_key}: {key}: does not load with {cert_key} {cert}: {_ssl_reason(exc)}")


def _ca_file(problems: list[str], where: str, key: str, path: Path | None) -> None:
    if path is None or not _readable(path):
        return
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=str(path))
    except (ssl.SSLError, OSError) as exc:
        problems.append(f"{where}: {key}: {path}: not a PEM CA certificate: {_ssl_reason(exc)}")


def _ssh(problems: list[str], where: str, config: Config) -> None:
    from tunneld.tunnels.ssh import ssh_file_problem  # asyncssh is imported only when there is a file to parse

    checked: set[tuple[str, Path]] = set()  # 5,000 nodes may name the same known_hosts file

    def check(key: str, kind: str, path: Path | None, extra: Callable[[], str | None] | None = None) -> None:
        if path is None or (kind, path) in checked or not _readable(path):
            return
        checked.add((kind, path))
        why = ssh_file_problem(kind, path)
        if why is None and extra is not None:
            why = extra()
        if why:
            problems.append(f"{where}: {key}: {path}: {why}")

    s = config.ssh
    check("ssh.private_key", "private_key", s.private_key)
    if s.private_key is not None and _readable(s.private_key):
        key = s.private_key
        check("ssh.certificate", "certificate", s.certificate, lambda: ssh_file_problem("pair", key, s.certificate))
    if not s.insecure_skip_host_key_check:
        check("ssh.known_hosts", "known_hosts", s.known_hosts)
    for node in config.nodes:
        check(f"nodes ({node.name}).known_hosts", "known_hosts", node.known_hosts)
        check(f"nodes ({node.name}).host_key", "public_key", node.host_key)


def check_contents(config: Config) -> list[str]:
    """Problems with what the config's files hold, as ``FILE: KEY: path: why``."""
    where = str(config.path)
    problems: list[str] = []
    _ssh(problems, where, config)
    k = config.kubelet
    _cert_key(problems, where, "kubelet.client_certificate", "kubelet.client_key", k.client_certificate, k.client_key)
    _ca_file(problems, where, "kubelet.certificate_authority", k.certificate_authority)
    _ca_file(problems, where, "proxy.target_certificate_authority", config.proxy.target_certificate_authority)
    for section, tls in (("egress", config.egress.tls), ("proxy", config.proxy.tls)):
        if tls is not None:
            _cert_key(problems, where, f"{section}.tls_cert", f"{section}.tls_key", tls.cert, tls.key)
            _ca_file(problems, where, f"{section}.client_ca", tls.client_ca)
    if config.api is not None and config.ca is not None:
        _cert_key(problems, where, "api.tls_cert", "api.tls_key", config.api.tls_cert, config.api.tls_key)
        if _readable(config.ca.cert, config.ca.key):
            from certs.ca import CAError, CertificateAuthority
            try:
                CertificateAuthority.load(config.ca.cert, config.ca.key)
            except CAError as exc:
                problems.append(f"{where}: ca: {exc}")
    return problems

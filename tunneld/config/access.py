"""Who may use the proxy front: the ``[[authz.rules]]`` table, and the check that no listener is left open.

No silent downgrade: a TCP ``[proxy] listen`` must have a way to authenticate its callers (``[auth] token_file``
for bearer tokens, ``[proxy] client_ca`` for client certificates) unless ``insecure_anonymous_loopback = true`` says,
explicitly, that anonymous callers on loopback are wanted; an address that is not loopback also needs TLS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from netnames import is_loopback, split_host_port
from proxy.authz import Rule, rule_problems
from tunneld.config.reader import Section
from tunneld.config.schema import AuthSettings, AuthzSettings, ProxySettings

NO_AUTH = ("no authentication is configured for this TCP listener: set [auth] token_file (bearer tokens), "
           "or [proxy] tls_cert, tls_key and client_ca (client certificates), or serve on [proxy] socket instead "
           "(callers known by their uid); insecure_anonymous_loopback = true keeps anonymous access on loopback, "
           "for labs only")

INSECURE_ANONYMOUS = ("proxy.insecure_anonymous_loopback = true: callers on the loopback proxy listener need no "
                      "credentials (they are system:anonymous in system:unauthenticated); for labs only")


def authz_section(az: Section, base: Path, problems: list[str]) -> AuthzSettings:
    """``[authz]`` with its ``[[authz.rules]]``; no ``rules`` key means the default table."""
    if "rules" not in az.data:
        az.unknown()
        return AuthzSettings()
    raw: list[Any] = az.get("rules", list, [])
    az.unknown()
    rules = []
    for i, entry in enumerate(raw):
        where = f"authz.rules[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected a table")
            continue
        sec = Section(entry, where, base, problems)
        lists = {key: _names(sec, key) for key in ("users", "groups", "resources", "verbs")}
        sec.unknown()
        for problem in rule_problems(**lists):
            problems.append(f"{where}: {problem}")
        rules.append(Rule(**{key: frozenset(values) for key, values in lists.items()}))
    return AuthzSettings(tuple(rules))


def _names(sec: Section, key: str) -> list[str]:
    values = sec.get(key, list, [])
    if not all(isinstance(v, str) for v in values):
        sec.problem(key, "expected a list of strings")
        return []
    return list(values)


def check_proxy_access(proxy: ProxySettings, auth: AuthSettings, problems: list[str]) -> None:
    """Refuse a TCP proxy listener nobody can authenticate to (see the module docstring)."""
    def problem(key: str, message: str) -> None:
        problems.append(f"proxy.{key}: {message}")

    if proxy.listen is None:
        if proxy.insecure_anonymous_loopback:
            problem("insecure_anonymous_loopback", "only applies to a listen address")
        return
    try:
        host, _ = split_host_port(proxy.listen)
    except ValueError:
        return  # reported by the [proxy] loader
    tokens = auth.token_file is not None
    certificates = proxy.tls is not None and proxy.tls.client_ca is not None
    if not is_loopback(host):
        if proxy.insecure_anonymous_loopback:
            problem("insecure_anonymous_loopback", f"{host} is not a loopback address")
        if proxy.tls is None:
            problem("listen", f"{host} is not loopback: serving it needs tls_cert and tls_key (and client_ca or "
                              "[auth] token_file), so that credentials never cross a network in clear text")
    if not tokens and not certificates and not proxy.insecure_anonymous_loopback:
        problem("listen", NO_AUTH)

"""Loaders for the fronts' sections: ``[egress]``, ``[proxy]`` (with their TLS keys) and ``[[services]]``."""

from __future__ import annotations

import grp
from pathlib import Path
from typing import Any

from netnames import is_dns_subdomain, parse_ip, split_host_port
from tunneld.config.reader import Section
from tunneld.config.schema import EgressSettings, ProxySettings, ServicePort, ServiceSettings, TLSServerSettings


def tls_keys(sec: Section, problems: list[str], require_client_ca: bool) -> TLSServerSettings | None:
    cert, key, ca = sec.path("tls_cert", None), sec.path("tls_key", None), sec.path("client_ca", None)
    if cert is None and key is None:
        if ca is not None:
            sec.problem("client_ca", "needs tls_cert and tls_key")
        return None
    if cert is None or key is None:
        sec.problem("tls_cert" if cert is None else "tls_key", "tls_cert and tls_key go together")
        return None
    if require_client_ca and ca is None:
        sec.problem("client_ca", "required: callers must present a client certificate signed by this CA")
    return TLSServerSettings(cert, key, ca)


def socket_mode(sec: Section) -> int:
    """``socket_mode``: an octal string, never giving access to others (default ``"0600"``)."""
    mode_text = sec.get("socket_mode", str, "0600")
    try:
        mode = int(mode_text, 8)
        if mode & ~0o777:
            raise ValueError
    except ValueError:
        sec.problem("socket_mode", f"{mode_text!r} is not an octal file mode such as \"0600\" or \"0660\"")
        return 0o600
    if mode & 0o007:
        sec.problem("socket_mode", "must not give access to others (use a group: 0660)")
    return mode


def listener_sections(e: Section, p: Section, problems: list[str]) -> tuple[EgressSettings, ProxySettings]:
    egress = EgressSettings(
        socket=e.path("socket", None), socket_mode=socket_mode(e), listen=e.get("listen", str, None),
        tls=tls_keys(e, problems, require_client_ca=True), grpc_socket=e.path("grpc_socket", None),
        grpc_max_pending_dials=e.integer("grpc_max_pending_dials", 256, minimum=1, maximum=100_000),
    )
    if egress.socket is not None and egress.socket == egress.grpc_socket:
        e.problem("grpc_socket", f"{egress.grpc_socket} is also egress.socket: the two fronts need their own sockets")
    if egress.listen is not None:
        try:
            split_host_port(egress.listen)
        except ValueError as exc:
            e.problem("listen", str(exc))
        if egress.tls is None:
            e.problem("listen", "needs tls_cert, tls_key and client_ca (the TCP egress front is mutual TLS only)")
    e.unknown()
    proxy = ProxySettings(
        listen=p.get("listen", str, None),
        tls=tls_keys(p, problems, require_client_ca=False),
        socket=p.path("socket", None), socket_mode=socket_mode(p), socket_group=p.get("socket_group", str, None),
        insecure_anonymous_loopback=p.get("insecure_anonymous_loopback", bool, False),
        target_certificate_authority=p.path("target_certificate_authority", None),
        pods_refresh=p.number("pods_refresh", 30.0),
    )
    if proxy.listen is not None:
        try:
            split_host_port(proxy.listen)
        except ValueError as exc:
            p.problem("listen", str(exc))
    if proxy.socket_group is not None:
        try:
            grp.getgrnam(proxy.socket_group)
        except KeyError:
            p.problem("socket_group", f"no group named {proxy.socket_group!r} on this host")
        if proxy.socket is None:
            p.problem("socket_group", "needs socket")
    p.unknown()
    return egress, proxy


def services_section(raw: list[Any], base: Path, problems: list[str]) -> list[ServiceSettings]:
    services: list[ServiceSettings] = []
    seen: set[tuple[str, str]] = set()
    for i, entry in enumerate(raw):
        label = f"services[{i}]"
        if not isinstance(entry, dict):
            problems.append(f"{label}: expected a table")
            continue
        sec = Section(entry, label, base, problems)
        name, ns = sec.get("name", str, ""), sec.get("namespace", str, "default")
        if name:
            sec.where = label = f"{label} ({ns}/{name})"
        for key, value in (("name", name), ("namespace", ns)):
            if not value or not is_dns_subdomain(value):
                sec.problem(key, "required: a lower-case DNS name")
        cluster_ip, endpoints = sec.get("cluster_ip", str, None), sec.get("endpoints", list, [])
        cip = _address(sec, "cluster_ip", cluster_ip)
        eps = tuple(a for a in (_address(sec, "endpoints", e) for e in endpoints) if a)
        if not cluster_ip and not endpoints:
            sec.problem("endpoints", "a service needs a cluster_ip or endpoints")
        ports: list[ServicePort] = []
        for j, port in enumerate(sec.get("ports", list, [])):
            ps = Section(port if isinstance(port, dict) else {}, f"{label}.ports[{j}]", base, problems)
            number = ps.port("port", 1) if "port" in ps.data else 0
            if not number:
                ps.problem("port", "required")
            target = ps.port("target_port", number or 1)
            ports.append(ServicePort(number, target, ps.get("name", str, "")))
            ps.unknown()
        if not ports:
            sec.problem("ports", "at least one port is required")
        sec.unknown()
        if (ns, name) in seen:
            problems.append(f"{label}: defined more than once")
        seen.add((ns, name))
        services.append(ServiceSettings(ns, name, tuple(ports), cip, eps))
    return services


def _address(sec: Section, key: str, value: object) -> str | None:
    """An IP literal of a service in canonical form; a problem (and None) for anything else, numbers included."""
    if value is None:
        return None
    try:
        return str(parse_ip(value))
    except ValueError as exc:
        sec.problem(key, str(exc))
        return None

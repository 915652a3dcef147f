"""Configuration: one TOML file, read once into a frozen, validated :class:`~tunneld.config.schema.Config`.

Every mistake is collected (not just the first) and reported as ``FILE: KEY: message`` so an operator can fix the
whole file in one pass. Relative paths are resolved against the directory of the file that names them.
Nodes come from ``[[nodes]]`` tables in the config file and/or in the inventory file named by
``[inventory] file``; see :mod:`tunneld.config.nodes`. With ``[inventory] source = "kubernetes"`` more nodes come
from an API server at run time (:mod:`tunneld.tunnels.k8s_watch`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tunneld.config.access import authz_section, check_proxy_access
from tunneld.config.certauth import certs_sections
from tunneld.config.contents import check_contents
from tunneld.config.dialin import dialin_section
from tunneld.config.files import check_files
from tunneld.config.fronts import listener_sections, services_section
from tunneld.config.nodes import load_inventory_nodes, overlapping_pod_cidrs, parse_nodes
from tunneld.config.reader import Section, read_toml
from tunneld.config.schema import Config, Node
from tunneld.config.sections import (
    dial_section,
    gc_section,
    health_section,
    inventory_section,
    kubelet_section,
    limits_section,
    log_section,
    policy_section,
    ssh_keys_problems,
    ssh_section,
    status_section,
)
from tunneld.errors import ConfigError


def load_config(path: str | Path) -> Config:
    """Read and validate the config file (and the inventory file it names). Raises :class:`ConfigError`."""
    config, found = _load(Path(path).resolve())
    if found:
        raise ConfigError(found)
    return config


def _load(path: Path) -> tuple[Config, list[str]]:
    """The config as far as it could be read, and every problem found (a TOML syntax error raises)."""
    data = read_toml(path)
    problems: list[str] = []
    base = path.parent
    top = Section(data, "", base, problems)

    def table(name: str) -> Section:
        return Section(top.get(name, dict, {}), name, base, problems)

    egress, proxy = listener_sections(table("egress"), table("proxy"), problems)
    ca, api, auth, csr = certs_sections(table("ca"), table("api"), table("auth"), table("csr"), problems)
    check_proxy_access(proxy, auth, problems)
    authz = authz_section(table("authz"), base, problems)
    if authz.rules is not None:
        source = f"[[authz.rules]] of {path}"
        authz = dataclasses.replace(authz, source=source)
    log_level, log_format = log_section(table("log"))
    inv = table("inventory")
    inventory_file = inv.path("file", None)
    inventory_source, kubernetes = inventory_section(inv)
    inv.unknown()
    config = Config(
        path=path, ssh=ssh_section(table("ssh")), health=health_section(table("health")),
        dial=dial_section(table("dial")), status=status_section(table("status")), egress=egress, proxy=proxy,
        kubelet=kubelet_section(table("kubelet")), policy=policy_section(table("policy")),
        limits=limits_section(table("limits")), inventory_file=inventory_file, inventory_source=inventory_source,
        kubernetes=kubernetes, services=tuple(services_section(top.get("services", list, []), base, problems)),
        log_level=log_level, log_format=log_format, gc_full_collection_interval=gc_section(table("gc")), ca=ca,
        api=api, auth=auth, authz=authz, csr=csr,
        dialin=dialin_section(table("dialin"), "dialin" in data),
    )
    nodes = parse_nodes(top.get("nodes", list, []), base, problems) if "nodes" in data else []
    top.unknown()
    found = [f"{path}: {p}" for p in problems]
    nodes += _inventory_file_nodes(path, inventory_file, nodes, found)
    found += [f"{path}: {p}" for p in overlapping_pod_cidrs(nodes) + _shared_listeners(config)]
    if config.dialin is None and any(n.mode == "dial-in" for n in nodes):
        found.append(f"{path}: dialin: required (a [dialin] listener) when a node has mode = \"dial-in\"")
    if may_dial_out(config, nodes):
        missing = ssh_keys_problems(config.ssh)
        if missing and config.dialin is not None:
            why = ("the Kubernetes node source may add dial-out nodes" if config.inventory_source == "kubernetes"
                   else "nodes " + ", ".join(n.name for n in nodes if n.mode == "dial-out")[:200] + " are dial-out")
            missing = [f"{m}; {why}" for m in missing]
        found += [f"{path}: {m}" for m in missing]
    return dataclasses.replace(config, nodes=tuple(nodes)), found


def may_dial_out(config: Config, nodes: list[Node]) -> bool:
    """Whether the gateway may dial out to a node, and so needs ``[ssh] private_key`` and ``known_hosts``: unless it
    has a ``[dialin]`` listener, every node of the file is dial-in and no Kubernetes node source can add others."""
    return (config.dialin is None or config.inventory_source == "kubernetes"
            or any(n.mode != "dial-in" for n in nodes))


def _shared_listeners(config: Config) -> list[str]:
    """A unix socket path or TCP address two listeners are configured on (the second could never bind)."""
    listeners: list[tuple[str, str | None]] = [
        ("status.socket", str(config.status.socket) if config.status.socket else None),
        ("egress.socket", str(config.egress.socket) if config.egress.socket else None),
        ("status.listen", config.status.listen), ("egress.listen", config.egress.listen),
        ("proxy.listen", config.proxy.listen), ("api.listen", config.api.listen if config.api else None),
    ]
    seen: dict[str, str] = {}
    problems = []
    for key, value in listeners:
        if not value or value.endswith(":0"):  # port 0: any free port, never the same one
            continue
        if value in seen:
            problems.append(f"{key}: {value} is also {seen[value]}: each listener needs its own")
        else:
            seen[value] = key
    return problems


def _inventory_file_nodes(path: Path, inventory_file: Path | None, nodes: list[Node], found: list[str]) -> list[Node]:
    """The nodes of ``[inventory] file`` (problems, and names the config file defines too, go to ``found``)."""
    if inventory_file is None:
        return []
    try:
        more = load_inventory_nodes(inventory_file)
    except ConfigError as exc:
        found.extend(exc.problems)
        return []
    names = {n.name for n in nodes}
    for dup in sorted({n.name for n in more if n.name in names}):
        found.append(f"{inventory_file}: node {dup!r} is also defined in {path}")
    return more


def load_checked(path: str | Path) -> Config:
    """:func:`load_config` plus :func:`~tunneld.config.files.check_files`: what ``check-config``, ``serve`` and
    reload accept."""
    config, problems = _load(Path(path).resolve())
    problems += check_files(config)  # reported even when the config has other mistakes (a missing inventory file)
    problems += check_contents(config)
    if problems:
        raise ConfigError(problems)
    return config

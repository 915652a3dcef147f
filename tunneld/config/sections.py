"""One loader per section of the daemon's core: ``[ssh]``, ``[health]``, ``[dial]``, ``[status]``, ``[kubelet]``,
``[policy]``, ``[limits]``, ``[gc]``, ``[log]`` and ``[inventory]``.

Each takes its table as a :class:`~tunneld.config.reader.Section`, records every mistake, and returns the frozen
settings (with the default in place of a bad value, so that all mistakes are found in one pass).
"""

from __future__ import annotations

import os
from pathlib import Path

from netnames import parse_port_range, split_host_port
from tunneld.config.reader import Section
from tunneld.config.schema import (
    DialSettings,
    HealthSettings,
    KubeletSettings,
    KubernetesInventorySettings,
    LimitSettings,
    PolicySettings,
    SSHSettings,
    StatusSettings,
)


def ssh_section(s: Section) -> SSHSettings:
    """``[ssh]``: how the gateway logs in to nodes, checks their host keys and reconnects."""
    ssh = SSHSettings(
        user=s.get("user", str, "root"),
        private_key=s.path("private_key", None),
        certificate=s.path("certificate", None),
        known_hosts=s.path("known_hosts", None),
        insecure_skip_host_key_check=s.get("insecure_skip_host_key_check", bool, False),
        connect_timeout=s.number("connect_timeout", 10.0),
        keepalive_interval=s.number("keepalive_interval", 15.0),
        keepalive_count_max=s.integer("keepalive_count_max", 3, minimum=1, maximum=100),
        max_concurrent_connects=s.integer("max_concurrent_connects", 256, minimum=1, maximum=100_000),
        backoff_initial=s.number("backoff_initial", 1.0),
        backoff_max=s.number("backoff_max", 60.0),
        backoff_multiplier=s.number("backoff_multiplier", 2.0, above=1.0),
        backoff_jitter=s.get("backoff_jitter", float, 0.5),
        max_reconnect_attempts=s.integer("max_reconnect_attempts", 0, minimum=0),
        lean_packet_path=s.get("lean_packet_path", bool, True),
    )
    s.unknown()
    if not 0.0 <= ssh.backoff_jitter <= 1.0:
        s.problem("backoff_jitter", f"{ssh.backoff_jitter:g} is not between 0 and 1")
    if ssh.backoff_max < ssh.backoff_initial:
        s.problem("backoff_max", "must not be less than ssh.backoff_initial")
    return ssh


def ssh_keys_problems(ssh: SSHSettings) -> list[str]:
    """``[ssh] private_key`` and ``known_hosts`` when missing: required whenever the gateway may dial out (see
    :func:`tunneld.config.load._load`: a pure dial-in gateway does without them)."""
    problems = []
    if ssh.private_key is None:
        problems.append("ssh.private_key: required (the key the gateway logs in to nodes with)")
    if ssh.known_hosts is None and not ssh.insecure_skip_host_key_check:
        problems.append("ssh.known_hosts: required (a known_hosts file, typically one '@cert-authority' line for the "
                        "cluster's SSH CA); host-key checking can only be skipped with insecure_skip_host_key_check = "
                        "true")
    return problems


def health_section(h: Section) -> HealthSettings:
    """``[health]``: the probe sent through every tunnel, and how old a sync may be before readiness fails."""
    health = HealthSettings(
        period=h.number("period", 10.0),
        timeout=h.number("timeout", 5.0),
        host=h.get("host", str, "127.0.0.1"),
        port=h.port("port", 10248),
        path=h.get("path", str, "/healthz"),
        failure_threshold=h.integer("failure_threshold", 1, minimum=1, maximum=1000),
        enabled=h.get("enabled", bool, True),
        sync_max_age=h.number("sync_max_age", 600.0, above=None),
    )
    h.unknown()
    if not health.path.startswith("/") or any(c in health.path for c in "\r\n "):
        h.problem("path", "must be an absolute path without spaces")
    if health.sync_max_age < 0:
        h.problem("sync_max_age", "must be 0 (off) or more seconds")
    return health


def dial_section(d: Section) -> DialSettings:
    """``[dial]``: the dial timeout and whether addresses no node owns may use any healthy tunnel."""
    dial = DialSettings(timeout=d.number("timeout", 10.0), random_fallback=d.get("random_fallback", bool, True))
    d.unknown()
    return dial


def status_section(st: Section) -> StatusSettings:
    """``[status]``: where the local status API listens."""
    status = StatusSettings(
        socket=st.path("socket", Path("/run/tunneld/tunneld.sock")), listen=st.get("listen", str, None)
    )
    st.unknown()
    if status.listen is not None:
        try:
            split_host_port(status.listen)
        except ValueError as exc:
            st.problem("listen", str(exc))
    return status


def kubelet_section(k: Section) -> KubeletSettings:
    """``[kubelet]``: TLS towards kubelets, as kube-apiserver's ``--kubelet-*`` flags."""
    kubelet = KubeletSettings(
        certificate_authority=k.path("certificate_authority", None),
        client_certificate=k.path("client_certificate", None),
        client_key=k.path("client_key", None),
    )
    k.unknown()
    if (kubelet.client_certificate is None) != (kubelet.client_key is None):
        k.problems.append("kubelet: client_certificate and client_key go together")
    return kubelet


def policy_section(po: Section) -> PolicySettings:
    """``[policy]``: which ports on nodes and pods the fronts may reach, and whether a pod CIDR's first address (the
    node's bridge) counts as a pod."""
    policy = PolicySettings(
        node_ports=_ports(po, "node_ports", ()), pod_ports=_ports(po, "pod_ports", ("1-65535",)),
        allow_pod_gateway=po.get("allow_pod_gateway", bool, False),
    )
    po.unknown()
    return policy


def limits_section(li: Section) -> LimitSettings:
    """``[limits]``: bounds on every front listener and on channels per tunnel."""
    limits = LimitSettings(
        max_connections=li.integer("max_connections", 1024, minimum=1, maximum=1_000_000),
        max_header_bytes=li.integer("max_header_bytes", 16 * 1024, minimum=1024, maximum=1024 * 1024),
        header_timeout=li.number("header_timeout", 10.0),
        idle_timeout=li.number("idle_timeout", 60.0),
        max_channels_per_tunnel=li.integer("max_channels_per_tunnel", 1000, minimum=1, maximum=1_000_000),
        stream_idle_timeout=li.number("stream_idle_timeout", 14400.0),
        stream_max_lifetime=li.number("stream_max_lifetime", 0.0, above=None),
    )
    if limits.stream_max_lifetime < 0:
        li.problem("stream_max_lifetime", f"{limits.stream_max_lifetime:g} is less than 0 (0: no limit)")
    li.unknown()
    return limits


def gc_section(g: Section) -> float:
    """``[gc]``: seconds between the scheduled full garbage collections (0: CPython's own collector settings)."""
    interval = g.number("full_collection_interval", 300.0, above=None)
    g.unknown()
    if interval < 0:
        g.problem("full_collection_interval", f"{interval:g} is less than 0 (0: CPython's defaults)")
        return 300.0
    return interval


def log_section(lg: Section) -> tuple[str, str]:
    """``[log]``: level and format."""
    level = lg.get("level", str, "info").lower()
    fmt = lg.get("format", str, "logfmt").lower()
    lg.unknown()
    if level not in ("debug", "info", "warning", "error"):
        lg.problem("level", "must be one of debug, info, warning, error")
    if fmt not in ("logfmt", "json"):
        lg.problem("format", "must be logfmt or json")
    return level, fmt


_IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


def in_cluster() -> bool:
    """Whether this process runs in a Kubernetes pod with a service account (the in-cluster credentials)."""
    return "KUBERNETES_SERVICE_HOST" in os.environ and _IN_CLUSTER_TOKEN.is_file()


def inventory_section(inv: Section) -> tuple[str, KubernetesInventorySettings | None]:
    source = inv.get("source", str, "file")
    kubeconfig = inv.path("kubeconfig", None)
    selector = inv.get("label_selector", str, None)
    ssh_port = inv.port("ssh_port", 22)
    if source not in ("file", "kubernetes"):
        inv.problem("source", f"{source!r}: must be \"file\" or \"kubernetes\"")
        return "file", None
    if source == "file":
        for key in ("kubeconfig", "label_selector", "ssh_port"):
            if key in inv.data:
                inv.problem(key, 'only applies with source = "kubernetes"')
        return source, None
    if kubeconfig is None and not in_cluster():
        inv.problem("kubeconfig", "required: not running in a pod, so there is no service account to use")
    elif kubeconfig is not None and not kubeconfig.is_file():
        inv.problem("kubeconfig", f"{kubeconfig}: file not found")
    if selector is not None and (not selector.strip() or len(selector) > 1024 or not selector.isprintable()):
        inv.problem("label_selector", "must be a non-empty label selector such as \"node-role/worker=true\"")
        selector = None
    return source, KubernetesInventorySettings(kubeconfig=kubeconfig, label_selector=selector, ssh_port=ssh_port)



def _ports(sec: Section, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = sec.get(key, list, None)
    if raw is None:
        return default
    out = []
    for item in raw:
        try:
            parse_port_range(item)
        except ValueError as exc:
            sec.problem(key, str(exc))
            continue
        out.append(str(item))
    return tuple(out)

"""The composition root: config -> pool -> dialer -> fronts (egress CONNECT, proxy URLs) and the status API.

:class:`Gateway` owns every long-lived object and knows the order to start, reload and stop them in. Nothing else
builds these objects, so each of them can be tested alone with whatever collaborators a test hands it.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import ssl
import weakref
from dataclasses import replace
from typing import Any

from certs.tokens import Authenticator as TokenAuthenticator
from certs.tokens import BootstrapToken, StaticToken
from netnames import split_host_port
from proxy.apiproxy import APIProxyFront
from proxy.authn import UNAUTHENTICATED_GROUP, Authenticator
from proxy.authz import ANY, DEFAULT_RULES, Authorizer, Rule
from proxy.connect import ConnectFront
from proxy.directory import Directory, NodeInfo, ServiceInfo, ServicePortInfo
from proxy.grpcfront import GRPCLimits, KonnectivityFront
from proxy.kubeapi import NodeTunnel
from proxy.policy import Policy, PolicyDialer, PortSet
from proxy.server import Limits, Server
from tunneld import __version__
from tunneld.certsd import CertsDaemon, load_static_tokens
from tunneld.config import Config, Node, load_checked
from tunneld.config.access import INSECURE_ANONYMOUS, check_proxy_access
from tunneld.errors import ConfigError
from tunneld.ops.collector import CollectorTuning
from tunneld.ops.lifecycle import ReloadLog
from tunneld.ops.metrics import InstrumentedDialer, Metrics
from tunneld.ops.readiness import HealthChecks, TunnelSync
from tunneld.ops.status import StatusServer, make_app
from tunneld.tlsfiles import TLSFiles, egress_listener, kubelet_client, proxy_listener, proxy_targets
from tunneld.tunnels.dialer import TunnelDialer
from tunneld.tunnels.dialin_setup import build_listener
from tunneld.tunnels.inventory import InventoryDiff
from tunneld.tunnels.k8s_nodes import merge_nodes
from tunneld.tunnels.k8s_watch import KubeInventory
from tunneld.tunnels.pool import Pool

log = logging.getLogger("tunneld")

LIVE: weakref.WeakSet[Gateway] = weakref.WeakSet()
"""Every gateway built in this process while it exists (tests check each one gives back what it took)."""


def build_policy(config: Config) -> Policy:
    """The destination policy for the current inventory and services."""
    node_hosts: dict[str, int] = {}
    for node in config.nodes:
        node_hosts[node.name] = node.kubelet_port
        node_hosts[node.address] = node.kubelet_port
    service_hosts: dict[str, set[int]] = {}
    for svc in config.services:
        if svc.cluster_ip:
            service_hosts.setdefault(svc.cluster_ip, set()).update(p.port for p in svc.ports)
        for ep in svc.endpoints:
            service_hosts.setdefault(ep, set()).update(p.target_port for p in svc.ports)
    return Policy(
        node_hosts=node_hosts,
        node_ports=PortSet.parse(config.policy.node_ports),
        pod_networks=tuple(n.pod_cidr for n in config.nodes if n.pod_cidr is not None),
        pod_ports=PortSet.parse(config.policy.pod_ports),
        service_hosts={h: frozenset(p) for h, p in service_hosts.items()},
        allow_pod_gateway=config.policy.allow_pod_gateway,
    )


def directory_entries(config: Config) -> tuple[list[NodeInfo], list[ServiceInfo]]:
    nodes = [NodeInfo(n.name, n.address, n.kubelet_port, (n.pod_cidr,) if n.pod_cidr is not None else ())
             for n in config.nodes]
    services = [
        ServiceInfo(s.namespace, s.name, tuple(ServicePortInfo(p.port, p.target_port, p.name) for p in s.ports),
                    s.cluster_ip, s.endpoints)
        for s in config.services
    ]
    return nodes, services


def _sans_tls(config: Config) -> tuple[object, object]:
    """The listener settings that need a restart (TLS file paths and contents apply on reload)."""
    return replace(config.egress, tls=None), replace(config.proxy, tls=None)


def build_authorizer(config: Config) -> Authorizer:
    """The proxy front's rule table: ``[[authz.rules]]``, else the default (plus anonymous callers, when
    ``insecure_anonymous_loopback`` asks for them)."""
    if config.authz.rules is not None:
        return Authorizer(config.authz.rules, config.authz.source)
    if config.proxy.insecure_anonymous_loopback:
        anonymous = Rule(groups=frozenset({UNAUTHENTICATED_GROUP}), resources=frozenset({ANY}),
                         verbs=frozenset({ANY}))
        return Authorizer((*DEFAULT_RULES, anonymous),
                          "the default rules (system:masters; system:unauthenticated by insecure_anonymous_loopback)")
    return Authorizer(DEFAULT_RULES, config.authz.source)


async def _no_bootstrap_tokens(token_id: str) -> BootstrapToken | None:
    return None  # bootstrap tokens are for the certificates API only


class Gateway:
    """The running daemon."""

    def __init__(self, config: Config) -> None:
        LIVE.add(self)
        self.config = config
        self.certs = CertsDaemon(config) if config.api is not None else None
        """The certificates API, store and signer; only with ``[api]``."""
        self.pool = Pool(config.ssh, config.health, max_channels=config.limits.max_channels_per_tunnel)
        self.collector = CollectorTuning(config.gc_full_collection_interval)
        """The garbage collector's tuning: started by :func:`tunneld.ops.lifecycle.serve` (the process's owner), not
        by :meth:`start`, so a gateway built inside another program leaves that program's collector alone."""
        self.metrics = Metrics(self.pool, self.csr_counts,
                               self.certs.store.endpoint_health if self.certs is not None else None,
                               self.collector.snapshot)
        self.unchecked_dialer = InstrumentedDialer(TunnelDialer(self.pool, config.dial), self.metrics)
        """Metrics, then the tunnels: for the gateway's own requests (the dev cluster's self-check), never a front's."""
        self.dialer = PolicyDialer(self.unchecked_dialer, build_policy(config))
        """What the fronts dial through: the destination policy in front of :attr:`unchecked_dialer`."""
        self.sync = TunnelSync(self.pool, config.health.sync_max_age)
        self.health = HealthChecks(self.sync)
        if self.certs is not None:
            self.health.endpoints["readyz"]["store"] = self.certs.service.store_check
        self.directory = Directory(*directory_entries(config))
        self.tls = TLSFiles(config)
        """Every TLS context built from files; SIGHUP builds each one afresh."""
        self.connect_front = ConnectFront(self.dialer)
        self.proxy_tokens = TokenAuthenticator(self._static_tokens(config), _no_bootstrap_tokens)
        """The ``[auth] token_file`` callers of the proxy front (re-read on reload)."""
        p = config.proxy
        authn = Authenticator(self.proxy_tokens.authenticate if config.auth.token_file else None,
                              socket_gid=grp.getgrnam(p.socket_group).gr_gid if p.socket_group else None,
                              anonymous_loopback=p.insecure_anonymous_loopback)
        self.api_front = APIProxyFront(
            self.dialer, self.directory, authn=authn, authz=build_authorizer(config),
            kubelet_tls=self.tls.client("kubelet client", kubelet_client, self._set_kubelet_tls),
            target_tls=self.tls.client("proxy targets", proxy_targets, self._set_target_tls),
            pods_refresh=config.proxy.pods_refresh, node_states=self.node_states, gateway_version=__version__,
        )
        lim = config.limits
        limits = Limits(lim.max_connections, lim.max_header_bytes, lim.header_timeout, lim.idle_timeout,
                        lim.stream_idle_timeout, lim.stream_max_lifetime)
        self.egress = Server("egress", self.connect_front, limits)
        self.grpc_front = KonnectivityFront(self.dialer, GRPCLimits(
            lim.max_connections, config.egress.grpc_max_pending_dials, lim.header_timeout))
        self.proxy = Server("proxy", self.api_front, limits)
        status_app = make_app(self.pool, self.info, self.health, self.metrics)
        if self.certs is not None:
            self.certs.mount(status_app)
        self.status = StatusServer(status_app, config.status)
        self.kube: KubeInventory | None = None
        """The Kubernetes node source, with ``[inventory] source = "kubernetes"``, once started."""
        self.kube_options: dict[str, Any] = {}
        """Extra keyword arguments for :class:`KubeInventory` (tests pass short backoffs here)."""
        self._kube_nodes: list[Node] = []
        self._merge_notes: set[str] = set()
        self.reloads = ReloadLog()
        self.dialin = build_listener(config.dialin, self.pool) if config.dialin is not None else None
        """The ``[dialin]`` SSH listener dial-in nodes connect to."""

    def _set_kubelet_tls(self, ctx: ssl.SSLContext) -> None:
        self.api_front.kubelet_tls = ctx

    def _set_target_tls(self, ctx: ssl.SSLContext) -> None:
        self.api_front.target_tls = ctx

    def node_states(self) -> dict[str, NodeTunnel]:
        """Each node's tunnel, for the Ready condition of the read-only API's Nodes (not the kubelet's word)."""
        return {name: NodeTunnel(t.state.value == "up", t.state.value, t.machine.since, t.machine.last_error)
                for name, t in self.pool.tunnels.items()}

    @staticmethod
    def _static_tokens(config: Config) -> list[StaticToken]:
        return load_static_tokens(config.auth.token_file)  # registered with the log redaction

    def warnings(self) -> list[str]:
        """Insecure access in force, for the log at every start and for ``tunneld status``."""
        return [INSECURE_ANONYMOUS] if self.config.proxy.insecure_anonymous_loopback else []

    def csr_counts(self) -> dict[str, int]:
        """Certificate signing requests by state (empty without ``[api]``), refreshed by the signer loop."""
        return dict(self.certs.service.counts) if self.certs is not None else {}

    @property
    def kubelet_tls_verified(self) -> bool:
        return self.config.kubelet.certificate_authority is not None

    def info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "reload": self.reloads.snapshot(),
            "config": str(self.config.path) if self.config.path else None,
            "nodes": len(self.pool.tunnels),
            "states": self.pool.states(),
            "host_key_check": "disabled" if self.config.ssh.insecure_skip_host_key_check else "strict",
            "kubelet_tls": "verified" if self.kubelet_tls_verified else "unverified",
            "egress_connections": self.egress.connections,
            "grpc_streams": self.grpc_front.streams,
            "proxy_connections": self.proxy.connections,
            "inventory": self.kube.snapshot() if self.kube is not None else {"source": "file"},
            "proxy_authz": self.api_front.authz.source,
            "warnings": self.warnings(),
            "gc": self.collector.snapshot(),
        }

    async def start(self) -> None:
        """Bind every listener, then start connecting to the inventory."""
        if self.config.ssh.insecure_skip_host_key_check:
            log.warning("ssh.insecure_skip_host_key_check = true: node host keys are NOT verified")
        for warning in self.warnings():
            log.warning("%s", warning)
        if not self.kubelet_tls_verified:
            log.warning("kubelet TLS: unverified (set kubelet.certificate_authority to verify kubelets' certificates)")
        e, p = self.config.egress, self.config.proxy
        refused: list[str] = []
        check_proxy_access(p, self.config.auth, refused)  # as load_config demands, for configs built in code too
        if refused:
            raise RuntimeError(f"refusing to serve the proxy front: {'; '.join(refused)}")
        if e.socket is not None:
            await self.egress.listen_unix(e.socket, e.socket_mode)
        if e.listen is not None:
            host, port = split_host_port(e.listen)
            await self.egress.listen_tcp(host, port, self.tls.server("egress listener", egress_listener))
        if e.grpc_socket is not None:
            await self.grpc_front.listen_unix(e.grpc_socket, e.socket_mode)
        if p.socket is not None:
            gid = grp.getgrnam(p.socket_group).gr_gid if p.socket_group else None
            await self.proxy.listen_unix(p.socket, p.socket_mode, gid)
        if p.listen is not None:
            host, port = split_host_port(p.listen)
            await self.proxy.listen_tcp(host, port, self.tls.server("proxy listener", proxy_listener))
        await self.status.start()
        if self.certs is not None:
            await self.certs.start(self.tls)
        self.pool.apply(self.config.nodes)
        if self.dialin is not None:
            await self.dialin.start()
        if self.config.inventory_source == "kubernetes" and self.config.kubernetes is not None:
            kube = KubeInventory.from_settings(self.config.kubernetes, self._on_kube_nodes, **self.kube_options)
            await kube.start()
            self.kube = kube
        if p.listen is not None or p.socket is not None:
            self.api_front.pods.start()
        log.info("started", extra={"nodes": len(self.config.nodes), "version": __version__})

    async def reload(self) -> InventoryDiff:
        """Re-read the config file, apply the inventory diff (unchanged tunnels keep their connections) and the
        ``[ssh]``/``[health]`` settings, and send RETRY to every tunnel that gave up or was refused.

        Raises :class:`~tunneld.errors.ConfigError` (and changes nothing) when the new file is invalid. Every outcome
        is recorded in :attr:`reloads` (the status API shows it; ``tunneld reload`` waits on it).
        """
        try:
            change = await self._reload()
        except ConfigError as exc:
            self.reloads.record("refused", exc.problems)
            raise
        except Exception as exc:
            self.reloads.record("failed", [f"{type(exc).__name__}: {exc}"])
            raise
        self.reloads.record("reloaded", [])
        return change

    async def _reload(self) -> InventoryDiff:
        if self.config.path is None:
            raise RuntimeError("configuration was not loaded from a file")
        new = load_checked(self.config.path)
        if (_sans_tls(new), new.status, new.limits) != (_sans_tls(self.config), self.config.status,
                                                          self.config.limits):
            log.warning("listener and limit settings take effect on restart, not on reload")
        if (new.inventory_source, new.kubernetes) != (self.config.inventory_source, self.config.kubernetes):
            log.warning("[inventory] source settings take effect on restart, not on reload")
        if new.gc_full_collection_interval != self.config.gc_full_collection_interval:
            log.warning("[gc] settings take effect on restart, not on reload")
        changed = self.pool.configure(new.ssh, new.health)
        if changed:
            log.info("settings changed: %s; each applies to every tunnel from its next connection attempt, "
                     "probe or connection", ", ".join(changed))
        self.sync.max_age = new.health.sync_max_age
        self.config = replace(new, status=self.config.status, egress=self.config.egress, proxy=self.config.proxy,
                              limits=self.config.limits,
                              gc_full_collection_interval=self.config.gc_full_collection_interval)
        change = self._apply_inventory()
        retried = self.pool.retry_parked()  # changed or not: a reload is how an operator says "try again"
        if retried:
            log.info("retrying tunnels that gave up or were refused: %s", ", ".join(retried))
        self.tls.reload(new)
        if self.dialin is not None:
            self.dialin.reload_revoked()
        try:
            self.proxy_tokens.set_static(self._static_tokens(self.config))
            self.api_front.authn.tokens = self.proxy_tokens.authenticate if self.config.auth.token_file else None
        except ValueError as exc:
            log.error("proxy front: token file not reloaded, keeping the current tokens: %s", exc)
        self.api_front.authz = build_authorizer(self.config)
        if self.certs is not None:
            self.certs.reload(self.config)
        log.info("reloaded", extra={"added": len(change.added), "removed": len(change.removed),
                                    "changed": len(change.changed)})
        return change

    def _on_kube_nodes(self, nodes: list[Node]) -> None:
        self._kube_nodes = nodes
        self._apply_inventory()

    def _apply_inventory(self) -> InventoryDiff:
        """Apply the static ``[[nodes]]`` plus the Kubernetes nodes (a static node wins on a name clash) to the
        policy, the directory and the pool."""
        merged, notes = merge_nodes(self.config.nodes, self._kube_nodes)
        for note in sorted(set(notes) - self._merge_notes):
            log.warning("inventory: %s", note)
        self._merge_notes = set(notes)
        effective = replace(self.config, nodes=tuple(merged))
        self.dialer.policy = build_policy(effective)
        self.directory.update(*directory_entries(effective))
        if self.certs is not None:
            self.certs.set_nodes(merged)
        return self.pool.apply(merged)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, let open streams finish for up to ``grace`` seconds, then close every tunnel."""
        self.health.stopping = True
        if self.kube is not None:
            await self.kube.stop()
            self.kube = None
        await self.egress.stop_accepting()
        await self.proxy.stop_accepting()
        await self.api_front.pods.close()
        # One grace period for every front.
        await asyncio.gather(self.egress.close(grace), self.proxy.close(grace), self.grpc_front.close(grace))
        await self.status.stop()
        if self.certs is not None:
            await self.certs.stop()
        if self.dialin is not None:
            await self.dialin.stop()
        await self.pool.close(0.0)
        log.info("stopped")

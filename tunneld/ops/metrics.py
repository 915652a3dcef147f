"""Prometheus metrics (prometheus-client, in the gateway's own :class:`CollectorRegistry`; no global state).

Two kinds of families:

- read at scrape time from the pool (a custom collector, so nothing can drift from what ``tunneld status`` shows):
  tunnels by state, open channels and bytes per node, the last health-probe result and latency per node, and CSR
  counts by state when the gateway has a CSR store (``csr_counts`` callable), and the garbage collector's tuning and
  full collections (``tunneld_gc_*``, :mod:`tunneld.ops.collector`);
- counted as things happen: tunnel connects and connect failures (from the pool's state-change listeners) and the
  dial latency histogram with dial errors by kind (from :class:`InstrumentedDialer`, which wraps the dialer the fronts
  use).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy.dialer import Dialer, DialError, Stream
from tunneld.tunnels.pool import Pool, Tunnel
from tunneld.tunnels.state import State

log = logging.getLogger("tunneld.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DIAL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _PoolCollector(Collector):
    def __init__(self, pool: Pool, csr_counts: Callable[[], Mapping[str, int]] | None,
                 store_health: Callable[[], Mapping[str, bool]] | None = None) -> None:
        self._store_health = store_health
        self._pool = pool
        self._csr_counts = csr_counts

    def collect(self) -> Iterator[Metric]:
        tunnels = list(self._pool.tunnels.values())
        by_state = GaugeMetricFamily("tunneld_tunnels", "Tunnels by state.", labels=["state"])
        for state in State:
            by_state.add_metric([state.value], sum(1 for t in tunnels if t.state is state))
        yield by_state
        channels = GaugeMetricFamily("tunneld_open_channels", "Open forwarded channels per tunnel.", labels=["node"])
        total = CounterMetricFamily("tunneld_channels", "Channels opened per tunnel.", labels=["node"])
        traffic = CounterMetricFamily("tunneld_tunnel_bytes", "Bytes through each tunnel (in: from the node).",
                                      labels=["node", "direction"])
        probe_ok = GaugeMetricFamily("tunneld_health_probe_success",
                                     "1 if the node's last health probe passed, 0 if it failed.", labels=["node"])
        probe_latency = GaugeMetricFamily("tunneld_health_probe_duration_seconds",
                                          "Duration of the node's last health probe.", labels=["node"])
        probe_last = GaugeMetricFamily("tunneld_health_probes", "Tunnels by result of their last health probe.",
                                       labels=["result"])
        path = GaugeMetricFamily("tunneld_ssh_packet_path", "1 for the SSH packet path an up tunnel uses: lean "
                                 "(tunneld.tunnels.leanpath) or asyncssh.", labels=["node", "path"])
        results = {"ok": 0, "failed": 0, "none": 0}
        for t in tunnels:
            name = t.node.name
            if t.link is not None:
                path.add_metric([name, t.link.packet_path], 1)
            channels.add_metric([name], t.counters.open_channels)
            total.add_metric([name], t.counters.channels_total)
            traffic.add_metric([name, "in"], t.counters.bytes_in)
            traffic.add_metric([name, "out"], t.counters.bytes_out)
            p = t.last_probe
            if p is None:
                results["none"] += 1
                continue
            results["ok" if p.ok else "failed"] += 1
            probe_ok.add_metric([name], 1 if p.ok else 0)
            probe_latency.add_metric([name], p.latency)
        for result, count in results.items():
            probe_last.add_metric([result], count)
        yield from (channels, total, traffic, path, probe_ok, probe_latency, probe_last)
        counts = self._csrs()
        if counts is not None:
            csr = GaugeMetricFamily("tunneld_csrs", "Certificate signing requests by state.", labels=["state"])
            for csr_state, count in sorted(counts.items()):
                csr.add_metric([csr_state], count)
            yield csr
        if self._store_health is not None and (health := self._store_health()):
            store = GaugeMetricFamily("tunneld_store_endpoint_healthy",
                                      "1 if the certificate store endpoint served its last request.",
                                      labels=["endpoint"])
            for endpoint, ok in sorted(health.items()):
                store.add_metric([endpoint], 1 if ok else 0)
            yield store

    def _csrs(self) -> Mapping[str, int] | None:
        if self._csr_counts is None:
            return None
        try:
            return self._csr_counts()
        except Exception:  # a broken store must not break the whole scrape
            log.warning("csr_counts failed; tunneld_csrs left out of this scrape", exc_info=True)
            return None


class _GCCollector(Collector):
    """The garbage collector's settings and full collections (:mod:`tunneld.ops.collector`)."""

    def __init__(self, facts: Callable[[], Mapping[str, Any]]) -> None:
        self._facts = facts

    def collect(self) -> Iterator[Metric]:
        f = self._facts()
        yield GaugeMetricFamily("tunneld_gc_tuned", "1 once the collector is tuned (start-up objects frozen, full "
                                "collections on a schedule), 0 with CPython's defaults.", value=1 if f["tuned"] else 0)
        yield GaugeMetricFamily("tunneld_gc_frozen_objects", "Objects the collector no longer traverses (gc.freeze).",
                                value=f["frozen_objects"])
        thresholds = GaugeMetricFamily("tunneld_gc_threshold", "The collector's threshold per generation.",
                                       labels=["generation"])
        collections = CounterMetricFamily("tunneld_gc_collections", "Collections per generation since start.",
                                          labels=["generation"])
        for gen, (threshold, count) in enumerate(zip(f["thresholds"], f["collections"], strict=True)):
            thresholds.add_metric([str(gen)], threshold)
            collections.add_metric([str(gen)], count)
        yield from (thresholds, collections)
        yield CounterMetricFamily("tunneld_gc_full_collection_seconds", "Time spent in full (generation 2) "
                                  "collections since the tuning started.", value=f["full_collection_seconds"])
        yield GaugeMetricFamily("tunneld_gc_longest_full_collection_seconds", "The longest full collection (the "
                                "longest the event loop stood still for the collector).",
                                value=f["longest_full_collection_seconds"])


class Metrics:
    """The gateway's metrics registry and the instruments fed as things happen."""

    def __init__(self, pool: Pool, csr_counts: Callable[[], Mapping[str, int]] | None = None,
                 store_health: Callable[[], Mapping[str, bool]] | None = None,
                 gc_facts: Callable[[], Mapping[str, Any]] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connects = Counter("tunneld_tunnel_connects", "Successful SSH connections to nodes.",
                                registry=self.registry)
        self.connect_failures = Counter("tunneld_tunnel_connect_failures", "Failed SSH connection attempts.",
                                        registry=self.registry)
        self.disconnects = Counter("tunneld_tunnel_disconnects", "Established tunnels that were lost.",
                                   registry=self.registry)
        self.dial_seconds = Histogram("tunneld_dial_duration_seconds",
                                      "Time to open a channel through a tunnel (successful dials).",
                                      buckets=DIAL_BUCKETS, registry=self.registry)
        self.dial_errors = Counter("tunneld_dial_errors", "Failed dials by error (e.g. TunnelDown, DialTimeout).",
                                   labelnames=["error"], registry=self.registry)
        self.registry.register(_PoolCollector(pool, csr_counts, store_health))
        if gc_facts is not None:
            self.registry.register(_GCCollector(gc_facts))
        pool.listeners.append(self._on_change)

    def _on_change(self, tunnel: Tunnel, before: State, after: State) -> None:
        if before in (State.CONNECTING, State.WAITING) and after is State.UP:
            self.connects.inc()
        elif before is State.CONNECTING and after in (State.DOWN, State.GAVE_UP, State.REFUSED):
            self.connect_failures.inc()
        elif before in (State.UP, State.DEGRADED) and after is State.DOWN:
            self.disconnects.inc()

    def exposition(self) -> bytes:
        """The Prometheus text format of every family."""
        return generate_latest(self.registry)


class InstrumentedDialer:
    """A :class:`proxy.dialer.Dialer` that records latency and errors of another dialer."""

    def __init__(self, dialer: Dialer, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self._dialer = dialer
        self._metrics = metrics
        self._clock = clock

    async def dial(self, host: str, port: int) -> Stream:
        started = self._clock()
        try:
            stream = await self._dialer.dial(host, port)
        except DialError as exc:
            self._metrics.dial_errors.labels(error=type(exc).__name__).inc()
            raise
        self._metrics.dial_seconds.observe(self._clock() - started)
        return stream

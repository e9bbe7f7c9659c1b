"""The agent's Prometheus metrics, named as Cilium's with a ``cilia_`` prefix.

One registry per agent (not prometheus_client's global one), so agents in one process (tests)
keep their own counts. Served by the API at ``GET /metrics`` in the text exposition format.

| metric | labels | what |
|---|---|---|
| ``cilia_policy`` | | policies loaded |
| ``cilia_policy_max_revision`` | | the newest policy revision |
| ``cilia_policy_l7_total`` | rule (received, forwarded, denied, parse_errors), proxy_type | L7 requests decided |
| ``cilia_proxy_redirects`` | protocol_l7 | ports redirected to a proxy, by L7 protocol |
| ``cilia_drop_count_total`` | reason, direction | packets the kernel dropped |
| ``cilia_forward_count_total`` | direction | new flows the kernel let through (or redirected) |
| ``cilia_endpoint`` / ``cilia_identity`` | | endpoints and identities |
| ``cilia_xds_pushes_total`` / ``..._acks_total`` / ``..._nacks_total`` | type | xDS responses sent, acked, rejected |
| ``cilia_xds_push_latency_seconds`` | type | from sending a version to its ACK |
| ``cilia_envoy_up`` | | 1 while the managed Envoy runs (and is ready) |
| ``cilia_kvstore_connected`` (``_remote_endpoints``, ``_nodes``, ``_malformed_entries``) | | with ``--kvstore`` |
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..xds import AckTracker

L7_RULES = ("received", "forwarded", "denied", "parse_errors")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # Cilium's cilium_policy_l7_total{rule, proxy_type}: every L7 request a proxy saw, by outcome
        self.policy_l7 = Counter("cilia_policy_l7", "L7 requests by outcome (rule) and proxy type",
                                 ["rule", "proxy_type"], registry=r)
        self.drops = Counter("cilia_drop_count", "Packets dropped by the datapath", ["reason", "direction"], registry=r)
        self.forwards = Counter("cilia_forward_count", "New flows the datapath let through", ["direction"], registry=r)
        self.xds_pushes = Counter("cilia_xds_pushes", "xDS responses sent", ["type"], registry=r)
        self.xds_acks = Counter("cilia_xds_acks", "xDS versions acked", ["type"], registry=r)
        self.xds_nacks = Counter("cilia_xds_nacks", "xDS versions rejected (NACK)", ["type"], registry=r)
        self.xds_latency = Histogram("cilia_xds_push_latency_seconds", "From sending an xDS version to its ACK",
                                     ["type"], registry=r,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.policies = Gauge("cilia_policy", "Policies loaded", registry=r)
        self.max_revision = Gauge("cilia_policy_max_revision", "The newest policy revision", registry=r)
        self.endpoints = Gauge("cilia_endpoint", "Endpoints", registry=r)
        self.identities = Gauge("cilia_identity", "Security identities", registry=r)
        self.redirects = Gauge("cilia_proxy_redirects", "Ports redirected to a proxy", ["protocol_l7"], registry=r)
        self.envoy_up = Gauge("cilia_envoy_up", "1 while the managed Envoy runs", registry=r)

    def l7(self, proxy_type: str, allowed: bool | None) -> None:
        """One request the proxy decided (``None``: it could not be parsed)."""
        if allowed is None:
            self.policy_l7.labels("parse_errors", proxy_type).inc()
            return
        self.policy_l7.labels("received", proxy_type).inc()
        self.policy_l7.labels("forwarded" if allowed else "denied", proxy_type).inc()

    def set_redirects(self, by_protocol: dict[str, int]) -> None:
        self.redirects.clear()
        for protocol, n in by_protocol.items():
            self.redirects.labels(protocol).set(n)

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


def _kind(type_url: str) -> str:
    return type_url.rsplit(".", 1)[-1]


class MeteredAckTracker(AckTracker):
    """The xDS ACK tracker, also counting pushes, ACKs and NACKs and timing each push to its ACK."""

    def __init__(self, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._metrics = metrics
        self._clock = clock
        self._sent_at: dict[tuple[str, str, str], float] = {}
        self._lock = threading.Lock()

    def on_sent(self, node_id: str, type_url: str, version: str, *, stream: int) -> None:
        self._metrics.xds_pushes.labels(_kind(type_url)).inc()
        with self._lock:
            if len(self._sent_at) > 100_000:  # proxies that never answer must not grow this forever
                self._sent_at.clear()
            self._sent_at[(node_id, type_url, version)] = self._clock()
        super().on_sent(node_id, type_url, version, stream=stream)

    def on_ack(self, node_id: str, type_url: str, version: str, *, stream: int) -> None:
        with self._lock:
            sent = self._sent_at.pop((node_id, type_url, version), None)
        if sent is not None:
            self._metrics.xds_acks.labels(_kind(type_url)).inc()
            self._metrics.xds_latency.labels(_kind(type_url)).observe(self._clock() - sent)
        super().on_ack(node_id, type_url, version, stream=stream)

    def on_nack(self, node_id: str, type_url: str, version: str, message: str, *, stream: int) -> None:
        with self._lock:
            self._sent_at.pop((node_id, type_url, version), None)
        self._metrics.xds_nacks.labels(_kind(type_url)).inc()
        super().on_nack(node_id, type_url, version, message, stream=stream)

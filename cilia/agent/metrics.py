"""The agent's Prometheus metrics, named as Cilium's (and Hubble's) with a ``cilia_`` prefix.

One registry per agent (not prometheus_client's global one), so agents in one process (tests)
keep their own counts; it holds the process collector too (``process_*``). Served by the API at
``GET /metrics`` and, with ``--prometheus-serve-addr``, over TCP (``metrics_server``). Gauges of
the agent's state (endpoints, identities, enforcement, BPF map pressure, Kubernetes watches) are
read at scrape time by ``agent_metrics.AgentStateCollector``.

| metric | labels | what |
|---|---|---|
| ``cilia_policy`` | | policies loaded |
| ``cilia_policy_max_revision`` | | the newest policy revision |
| ``cilia_policy_import_errors_total`` | | policy imports refused |
| ``cilia_policy_implementation_delay`` | source | seconds from an import to every proxy's ACK |
| ``cilia_policy_l7_total`` | rule (received, forwarded, denied, parse_errors), proxy_type | L7 requests decided |
| ``cilia_proxy_redirects`` | protocol_l7 | ports redirected to a proxy, by L7 protocol |
| ``cilia_proxy_upstream_reply_seconds`` | error, protocol_l7, scope | until the upstream's reply arrived (HTTP) |
| ``cilia_drop_count_total`` / ``cilia_drop_bytes_total`` | reason, direction | packets/bytes the kernel dropped |
| ``cilia_forward_count_total`` / ``cilia_forward_bytes_total`` | direction | new flows let through (first packets) |
| ``cilia_errors_warnings_total`` | level, subsystem | errors and warnings the agent logged |
| ``cilia_xds_pushes_total`` / ``..._acks_total`` / ``..._nacks_total`` | type | xDS responses sent, acked, rejected |
| ``cilia_xds_push_latency_seconds`` | type | from sending a version to its ACK |
| ``cilia_envoy_up`` | | 1 while the managed Envoy runs (and is ready) |
| ``cilia_hubble_flows_processed_total`` | type, subtype, verdict | every flow recorded (Hubble's) |
| ``cilia_hubble_drop_total`` | reason, protocol | flows dropped (Hubble's) |
| ``cilia_hubble_http_requests_total`` | method, protocol, status, reporter | HTTP requests (Hubble's) |
| ``cilia_hubble_http_request_duration_seconds`` | method, reporter | HTTP request to response (Hubble's) |
| ``cilia_dns_proxy_requests_total`` | verdict (forwarded, denied, audit, error) | queries the DNS proxy handled |
| ``cilia_dns_proxy_latency_seconds`` | verdict | from a query's arrival to its answer leaving the proxy |
| ``cilia_hubble_dns_queries_total`` / ``..._responses_total`` | rcode, qtypes, ips_returned | DNS (Hubble's) |
| ``cilia_kvstore_connected`` (``_remote_endpoints``, ``_nodes``, ``_malformed_entries``) | | with ``--kvstore`` |
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

from ..xds import AckTracker
from .hubble import DROP_REASONS

if TYPE_CHECKING:
    from ..bpf.datapath import DatapathEvent
    from ..dnsproxy.server import DNSRecord
    from .flow import Flow

L7_RULES = ("received", "forwarded", "denied", "parse_errors")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


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
        # identities by kind are read at scrape time (cilia_identity{type}, agent_metrics); this
        # unregistered gauge only takes the count the agent still sets
        self.identities = Gauge("cilia_identity_count", "Security identities", registry=None)
        self._watching = False
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # labelled children, see _child
        self.redirects = Gauge("cilia_proxy_redirects", "Ports redirected to a proxy", ["protocol_l7"], registry=r)
        self.envoy_up = Gauge("cilia_envoy_up", "1 while the managed Envoy runs", registry=r)
        ProcessCollector(registry=r)
        self.drop_bytes = Counter("cilia_drop_bytes", "Bytes dropped by the datapath", ["reason", "direction"],
                                  registry=r)
        self.forward_bytes = Counter("cilia_forward_bytes", "Bytes of the first packets of new flows the datapath "
                                     "let through", ["direction"], registry=r)
        self.policy_import_errors = Counter("cilia_policy_import_errors", "Policy imports refused", registry=r)
        self.policy_implementation_delay = Histogram(
            "cilia_policy_implementation_delay", "Seconds from a policy import to every proxy's ACK of it",
            ["source"], registry=r, buckets=LATENCY_BUCKETS)
        self.proxy_upstream_reply = Histogram(
            "cilia_proxy_upstream_reply_seconds", "Seconds until the upstream's whole reply reached the proxy",
            ["error", "protocol_l7", "scope"], registry=r, buckets=LATENCY_BUCKETS)
        self.errors_warnings = Counter("cilia_errors_warnings", "Errors and warnings the agent logged",
                                       ["level", "subsystem"], registry=r)
        # issue 17: the DNS proxy, and Hubble's DNS metrics
        self.dns_requests = Counter("cilia_dns_proxy_requests", "DNS queries the DNS proxy handled, by verdict",
                                    ["verdict"], registry=r)
        self.dns_latency = Histogram("cilia_dns_proxy_latency_seconds", "From a DNS query's arrival at the proxy "
                                     "to its answer leaving it", ["verdict"], registry=r,
                                     buckets=(0.0001, 0.00025, 0.0005, *LATENCY_BUCKETS))
        self.dns_queries = Counter("cilia_hubble_dns_queries", "DNS queries", ["rcode", "qtypes", "ips_returned"],
                                   registry=r)
        self.dns_responses = Counter("cilia_hubble_dns_responses", "DNS responses",
                                     ["rcode", "qtypes", "ips_returned"], registry=r)
        # Hubble's flow metrics
        self.flows_processed = Counter("cilia_hubble_flows_processed", "Flows recorded",
                                       ["type", "subtype", "verdict"], registry=r)
        self.hubble_drops = Counter("cilia_hubble_drop", "Flows dropped", ["reason", "protocol"], registry=r)
        self.http_requests = Counter("cilia_hubble_http_requests", "HTTP requests",
                                     ["method", "protocol", "status", "reporter"], registry=r)
        self.http_duration = Histogram("cilia_hubble_http_request_duration_seconds",
                                       "Seconds from an HTTP request to its response", ["method", "reporter"],
                                       registry=r, buckets=LATENCY_BUCKETS)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: prometheus_client's lookup costs ~10 us, and the DNS
        proxy counts several per query."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def dns(self, records: Sequence[DNSRecord]) -> None:
        """Queries the DNS proxy handled (``parse_errors`` in ``cilia_policy_l7_total`` when
        malformed). Counters move once per batch and kind of record: the proxy hands records over
        by the hundred under load, and each increment takes a lock."""
        shapes: dict[tuple[str, bool, str, str, int], int] = {}
        for r in records:
            self._child(self.dns_latency, r.verdict).observe(r.latency)
            if r.upstream:
                self._child(self.proxy_upstream_reply, "true" if r.rcode == "ServFail" else "false", "dns",
                            "egress").observe(r.upstream)
            shape = (r.verdict, bool(r.query), r.qtype, r.rcode, len(r.ips))
            shapes[shape] = shapes.get(shape, 0) + 1
        for shape, n in shapes.items():
            for child in self._dns_children(shape):
                child.inc(n)

    def _dns_children(self, shape: tuple[str, bool, str, str, int]) -> list[Any]:
        """The counters one DNS record of this (verdict, parsed, qtype, rcode, addresses) moves."""
        verdict, parsed, qtype, rcode, ips = shape
        out = [self._child(self.dns_requests, verdict)]
        if not parsed:
            return [*out, self._child(self.policy_l7, "parse_errors", "dns")]
        out += [self._child(self.policy_l7, "received", "dns"),
                self._child(self.policy_l7, "denied" if verdict == "denied" else "forwarded", "dns"),
                self._child(self.dns_queries, "", qtype, "0")]
        if rcode:
            out.append(self._child(self.dns_responses, rcode, qtype, str(ips)))
        return out

    def l7(self, proxy_type: str, allowed: bool | None) -> None:
        """One request the proxy decided (``None``: it could not be parsed)."""
        if allowed is None:
            self.policy_l7.labels("parse_errors", proxy_type).inc()
            return
        self.policy_l7.labels("received", proxy_type).inc()
        self.policy_l7.labels("forwarded" if allowed else "denied", proxy_type).inc()

    def flow(self, f: Flow) -> None:
        """Hubble's flow metrics (and the proxy's upstream timing) for one recorded flow."""
        self.flows((f,))

    def flows(self, flows: Iterable[Flow]) -> None:
        """``flow`` for each of ``flows``; ``cilia_hubble_flows_processed`` moves once per kind."""
        processed: dict[tuple[str, str, str], int] = {}
        for f in flows:
            subtype = f.kind if f.type == "L7" else f.event_type
            key = (f.type, subtype, f.verdict.value)
            processed[key] = processed.get(key, 0) + 1
            if f.verdict.value == "DROPPED":
                reason = DROP_REASONS.get(f.drop_reason, (0, "POLICY_DENIED" if f.type == "L7" else "UNKNOWN"))[1]
                self._child(self.hubble_drops, reason, f.l4_protocol).inc()
            if f.kind == "http":
                self._http(f)
        for key, n in processed.items():
            self._child(self.flows_processed, *key).inc(n)

    def _http(self, f: Flow) -> None:
        reporter = "server" if f.direction == "ingress" else "client"
        method = str(f.l7.get("method", ""))
        self.http_requests.labels(method, str(f.l7.get("protocol", "")), str(f.l7.get("status") or ""),
                                  reporter).inc()
        if f.latency:
            self.http_duration.labels(method, reporter).observe(f.latency)
        if f.upstream_reply:
            status = f.l7.get("status")
            error = "true" if isinstance(status, int) and status >= 500 else "false"
            self.proxy_upstream_reply.labels(error, "http", f.direction).observe(f.upstream_reply)

    def datapath(self, ev: DatapathEvent) -> None:
        """Cilium's drop and forward counters for one kernel event (trace events are not counted)."""
        if ev.type == "drop":
            reason = ev.reason_text or str(ev.reason)
            self.drops.labels(reason, ev.direction).inc()
            self.drop_bytes.labels(reason, ev.direction).inc(ev.length)
        elif ev.type == "policy-verdict":
            self.forwards.labels(ev.direction).inc()
            self.forward_bytes.labels(ev.direction).inc(ev.length)

    def watch_agent(self, agent: object) -> None:
        """Also export the agent's state gauges (read at each scrape); once per registry."""
        from .agent_metrics import AgentStateCollector
        if not self._watching:
            self.registry.register(AgentStateCollector(agent))
            self._watching = True

    def set_redirects(self, by_protocol: dict[str, int]) -> None:
        self.redirects.clear()
        for protocol, n in by_protocol.items():
            self.redirects.labels(protocol).set(n)

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))


class LogCounter(logging.Handler):
    """Counts the warnings and errors logged under ``cilia`` (Cilium's errors_warnings_total),
    the subsystem being the logger's second name part (``cilia.envoy.supervisor`` -> envoy)."""

    def __init__(self, metrics: Metrics) -> None:
        super().__init__(logging.WARNING)
        self._metrics = metrics

    def emit(self, record: logging.LogRecord) -> None:
        parts = record.name.split(".")
        subsystem = parts[1] if len(parts) > 1 else parts[0]
        self._metrics.errors_warnings.labels(record.levelname.lower(), subsystem).inc()


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

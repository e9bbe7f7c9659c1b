"""Gauges of the agent's state, read when Prometheus scrapes (Cilium's names, ``cilia_`` prefix).

| metric | labels | what |
|---|---|---|
| ``cilia_identity`` | type | identities by kind (endpoint, cidr, reserved) |
| ``cilia_endpoint_state`` | endpoint_state | endpoints by state (ready, waiting-for-identity: all dropped) |
| ``cilia_policy_endpoint_enforcement_status`` | enforcement | endpoints by enforced directions |
| ``cilia_bpf_map_pressure`` | map_name | fill ratio of the BPF datapath's hash and LPM maps |
| ``cilia_lb_service_*_total`` | service_id, frontend, name | connections, packets, bytes, no_backend_drops |
| ``cilia_lb_service_backends`` | service_id, frontend, name, state | backends per service by state |
| ``cilia_k8s_client_{events,lists,errors}_total`` | resource | the Kubernetes watches' counts |
| ``cilia_k8s_client_connected`` | resource | 1 while a Kubernetes watch is connected |
| ``cilia_fqdn_active_names``, ``cilia_fqdn_active_ips`` | | names and addresses in the toFQDNs DNS cache |
| ``cilia_fqdn_learned_total`` | | addresses the DNS proxy's answers added |
| ``cilia_fqdn_gc_deletions_total`` | | addresses removed after their answer expired |

Read through the agent's own API methods (as the API renders them), so a scrape sees what
``cilia endpoint list`` and ``cilia identity list`` see.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .render import render

_log = logging.getLogger(__name__)


def enforcement(endpoint: dict[str, Any]) -> str:
    on = endpoint.get("enforcement", {})
    ingress, egress = bool(on.get("ingress")), bool(on.get("egress"))
    word = "both" if ingress and egress else "ingress" if ingress else "egress" if egress else "none"
    audit = endpoint.get("audit_mode", {})
    return f"{word}-audit" if word != "none" and any(audit.values()) else word


class AgentStateCollector(Collector):
    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        try:
            endpoints = render(self.agent.endpoints())["endpoints"]
            identities = render(self.agent.identities())["identities"]
        except Exception:  # a scrape must never fail the agent; say so in the log
            _log.exception("cannot read the agent's state for metrics")
            return
        by_kind = GaugeMetricFamily("cilia_identity", "Security identities by kind", labels=["type"])
        for kind, n in sorted(Counter(i["kind"] for i in identities).items()):
            by_kind.add_metric([kind], n)
        yield by_kind
        state = GaugeMetricFamily("cilia_endpoint_state", "Endpoints by state", labels=["endpoint_state"])
        by_state = Counter(e.get("state", "ready") for e in endpoints)
        for word in sorted({"ready", *by_state}):  # waiting-for-identity: issue 13's, no identity yet
            state.add_metric([word], by_state[word])
        yield state
        enforced = GaugeMetricFamily("cilia_policy_endpoint_enforcement_status",
                                     "Endpoints by the directions their policy is enforced in", labels=["enforcement"])
        for word, n in sorted(Counter(enforcement(e) for e in endpoints).items()):
            enforced.add_metric([word], n)
        yield enforced
        yield from self._map_pressure()
        yield from self._services()
        yield from self._kubernetes()
        yield from self._fqdn()

    def _fqdn(self) -> Iterator[Metric]:
        learner = getattr(self.agent, "fqdn", None)
        if learner is None:
            return
        stats = learner.stats()
        yield GaugeMetricFamily("cilia_fqdn_active_names", "Names in the toFQDNs DNS cache", value=stats["names"])
        yield GaugeMetricFamily("cilia_fqdn_active_ips", "Addresses in the toFQDNs DNS cache", value=stats["ips"])
        yield CounterMetricFamily("cilia_fqdn_learned", "Addresses DNS answers added to the cache",
                                  value=stats["learned"])
        yield CounterMetricFamily("cilia_fqdn_gc_deletions", "Addresses removed from the cache after their "
                                  "answer expired", value=stats["expired"])

    def _map_pressure(self) -> Iterator[Metric]:
        node = getattr(self.agent, "node", None)
        if node is None or not getattr(node, "started", False):
            return
        from ..bpf.bpfmap import MAP_TYPE_HASH, MAP_TYPE_LPM_TRIE, MAP_TYPE_LRU_HASH

        pressure = GaugeMetricFamily("cilia_bpf_map_pressure", "Fill ratio of a BPF map", labels=["map_name"])
        for name, m in sorted(node.loader.maps.items()):
            if not m.max_entries or m.map_type not in (MAP_TYPE_HASH, MAP_TYPE_LRU_HASH, MAP_TYPE_LPM_TRIE):
                continue  # arrays are always full; hash, LRU and LPM maps fill up
            try:
                pressure.add_metric([name], sum(1 for _ in m.keys()) / m.max_entries)
            except OSError:
                continue
        yield pressure

    def _services(self) -> Iterator[Metric]:
        node = getattr(self.agent, "node", None)
        if node is None or getattr(node, "lb", None) is None:
            return
        labels = ["service_id", "frontend", "name"]
        counters = {key: CounterMetricFamily(f"cilia_lb_service_{key}", f"BPF load balancer {key} by service",
                                             labels=labels)
                    for key in ("connections", "packets", "bytes", "no_backend_drops")}
        backends = GaugeMetricFamily("cilia_lb_service_backends", "Backends of a service by state",
                                     labels=[*labels, "state"])
        for s in self.agent.bpf_lb()["services"]:
            values = [str(s["id"]), f"{s['frontend']}/{s['protocol']}", s["name"]]
            for key, family in counters.items():
                family.add_metric(values, s[key])
            for state, n in sorted(Counter(b["state"] for b in s["backends"]).items()):
                backends.add_metric([*values, state], n)
        yield from counters.values()
        yield backends

    def _kubernetes(self) -> Iterator[Metric]:
        watcher = getattr(self.agent, "kubernetes", None)
        if watcher is None:
            return
        resources = watcher.status()["resources"]
        connected = GaugeMetricFamily("cilia_k8s_client_connected", "1 while the watch of a resource is connected",
                                      labels=["resource"])
        counters = {key: CounterMetricFamily(f"cilia_k8s_client_{key}", f"Kubernetes watch {key} by resource",
                                             labels=["resource"]) for key in ("events", "lists", "errors")}
        for resource, st in sorted(resources.items()):
            connected.add_metric([resource], 1.0 if st["connected"] else 0.0)
            counters["events"].add_metric([resource], st["events"])
            counters["lists"].add_metric([resource], st["lists"] + st["relists"])
            counters["errors"].add_metric([resource], st["errors"])
        yield connected
        yield from counters.values()

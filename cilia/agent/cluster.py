"""The agent as a node of a cluster: its kvstore connection and the records it shares.

``ClusterNode.connect(config)`` reaches the store (a clear error at start if the endpoints or
certificates are wrong), takes the node's lease and builds the cluster-wide identity allocator the
engine is given. ``attach(agent)`` (from ``Agent.start``) plugs in the rest: the publisher of this
node's endpoint addresses (a realizer sink), the feed of other nodes' addresses into the engine,
and the node record. ``status()`` is the ``kvstore`` part of ``cilia status``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client.metrics_core import Metric

from ..cluster import keys
from ..cluster.health import HEALTH_PORT, HealthProber, HealthServer
from ..cluster.identities import ClusterAllocator
from ..cluster.ipcache import IPCachePublisher, RemoteIPCache
from ..cluster.nodes import NodeRecord, NodeRegistry
from ..cluster.remotefeed import RemoteBatch, RemoteFeed, engine_change
from ..cluster.session import Session
from ..kvstore.base import KVStore, KVStoreError
from ..policy.identity import IdentityKind
from ..policy.model import IPNetwork

if TYPE_CHECKING:
    from .daemon import Agent

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVStoreConfig:
    """``cilia agent --kvstore etcd --kvstore-endpoints ...`` and what this node announces."""

    backend: Literal["etcd"]
    endpoints: tuple[str, ...]
    ca: Path | None = None  # TLS (https:// endpoints): the members' CA, and this client's certificate
    cert: Path | None = None
    key: Path | None = None
    lease_ttl: int = 15  # seconds a dead node's records outlive it
    timeout: float = 5.0
    identity_gc_grace: float = 300.0  # an unreferenced identity is deleted after this long
    node_ip: str | None = None
    pod_cidr: str | None = None
    health_ip: str | None = None
    health_port: int = HEALTH_PORT  # cluster health: served on health_ip (else node_ip), probed on the others; 0: off
    health_interval: float = 1.0  # seconds between probe rounds (each probe gives up after this long too)

    def open(self) -> KVStore:
        from ..kvstore.etcd import ClientTls, EndpointError, EtcdKVStore

        tls = ClientTls(self.ca, self.cert, self.key) if self.ca is not None else None
        try:
            store = EtcdKVStore(self.endpoints, tls, self.timeout)
        except EndpointError as e:
            raise KVStoreError(f"--kvstore-endpoints: {e}") from None
        try:
            store.revision()  # reach a member now: wrong addresses or certificates fail the start
        except KVStoreError as e:
            store.close()
            raise KVStoreError(f"kvstore {','.join(self.endpoints)}: {e}") from None
        return store


class ClusterNode:
    def __init__(self, store: KVStore, node: str, config: KVStoreConfig) -> None:
        self.store = store
        self.node = node
        self.config = config
        self.session = Session(store, node, config.lease_ttl)
        self.session.start()
        self.allocator = ClusterAllocator(store, self.session, grace=config.identity_gc_grace,
                                          gc_interval=min(config.identity_gc_grace / 2, 60.0))
        self.allocator.start()
        self.publisher = IPCachePublisher(store, self.session)
        self.nodes = NodeRegistry(store, self.session,
                                  NodeRecord(node, config.node_ip, config.pod_cidr, config.health_ip))
        self.remote: RemoteIPCache | None = None
        self.feed = RemoteFeed(self._apply_remote)
        self.health_server: HealthServer | None = None
        self.prober: HealthProber | None = None
        self.health_error: str | None = None  # why this node's health endpoint is not served
        self._agent: Agent | None = None

    @classmethod
    def connect(cls, node: str, config: KVStoreConfig) -> ClusterNode:
        store = config.open()
        try:
            return cls(store, node, config)
        except BaseException:
            store.close()
            raise

    def attach(self, agent: Agent) -> None:
        """Publish this node's endpoints (now and at every revision), receive the others'."""
        self._agent = agent
        agent.realizer.add(self.publisher)
        self.publisher.start()
        self.nodes.start()
        self.remote = RemoteIPCache(self.store, self.node, self._remote_changed)
        self.allocator.on_learned.append(self._identities_learned)
        self.feed.start()
        self.remote.start()
        self._start_health()
        self._metrics(agent)

    def _start_health(self) -> None:
        port = self.config.health_port
        if not port:
            return
        address = self.config.health_ip or self.config.node_ip
        if address is None:
            self.health_error = "no --health-ip or --node-ip: other nodes cannot probe this one"
        else:
            try:
                self.health_server = HealthServer(self.node, address, port)
                self.health_server.start()
            except OSError as e:  # probing the others is still worth doing; status says why
                self.health_error = f"health endpoint {address}:{port}: {e.strerror or e}"
                _log.warning("cluster health: %s", self.health_error)
        self.prober = HealthProber(self.node, self.nodes.list, port, interval=self.config.health_interval,
                                   timeout=self.config.health_interval)
        self.prober.start()

    def _metrics(self, agent: Agent) -> None:
        from prometheus_client import Gauge

        r = agent.metrics.registry
        Gauge("cilia_kvstore_connected", "1 while the kvstore answers (lease kept, watches running)",
              registry=r).set_function(lambda: 1.0 if self.status()["connected"] else 0.0)
        Gauge("cilia_kvstore_remote_endpoints", "Other nodes' endpoint addresses known from the kvstore",
              registry=r).set_function(lambda: float(len(self.remote.entries) if self.remote else 0))
        Gauge("cilia_kvstore_nodes", "Nodes announced in the kvstore", registry=r).set_function(
            lambda: float(len(self.nodes.nodes)))
        r.register(NodeConnectivityCollector(self))
        Gauge("cilia_kvstore_malformed_entries", "Entries in the kvstore skipped because they do not parse",
              registry=r).set_function(lambda: float(self.status()["malformed"]))

    def _remote_changed(self, upserts: Mapping[IPNetwork, int], deletes: Sequence[IPNetwork]) -> None:
        self.feed.add(upserts, deletes)

    def _apply_remote(self, batch: RemoteBatch) -> None:
        """One engine change (one revision, no state.json write) for everything that arrived
        while the previous one was applied."""
        if self._agent is not None:
            self._agent.change_engine(engine_change(batch), persist=False)

    # ------------------------------------------------------------------ reading (API)

    def node_list(self) -> dict[str, Any]:
        return {"nodes": [{**n.to_json(), "local": n.name == self.node} for n in self.nodes.list()]}

    def identity_list(self) -> dict[str, Any]:
        """Every cluster-wide identity (as mirrored) with the nodes referencing it."""
        refs = self.allocator.references()
        return {"identities": [{"id": i.id, "labels": i.labels.to_list(), "nodes": list(refs.get(i.id, ()))}
                               for i in self.allocator if i.kind is IdentityKind.ENDPOINT]}

    def read(self, key: str | None, prefix: str | None) -> dict[str, Any]:
        """``cilia kvstore get KEY`` / ``ls PREFIX``: only cilia's own keys (the store may be shared)."""
        wanted = key if key is not None else prefix
        if not wanted or not wanted.startswith(keys.ROOT):
            raise ValueError(f"only keys under {keys.ROOT} can be read, not {wanted!r}")
        if key is not None:
            kv = self.store.get(key)
            items, revision = ([kv] if kv is not None else []), kv.mod_revision if kv is not None else 0
        else:
            items, revision = self.store.get_prefix(wanted)
        return {"revision": revision,
                "entries": [{"key": kv.key, "value": kv.value.decode("utf-8", "replace"),
                             "mod_revision": kv.mod_revision, "lease": f"{kv.lease:x}" if kv.lease else None}
                            for kv in items]}

    def _identities_learned(self, identities: list[int]) -> None:
        """Labels that arrived after the addresses using them: those peers become selectable."""
        self.feed.learned(identities)

    def health(self) -> dict[str, Any]:
        """``cilia health status``: this node's health endpoint and what every other node answered."""
        report = self.prober.report() if self.prober is not None else []
        server = self.health_server
        return {"node": self.node, "port": self.config.health_port,
                "serving": f"{server.address[0]}:{server.address[1]}" if server is not None else None,
                "error": self.health_error, "probing": self.prober is not None,
                "rounds": self.prober.rounds if self.prober is not None else 0,
                "nodes": [h.to_json() for h in report]}

    def stop(self) -> None:
        if self.prober is not None:
            self.prober.stop()
        if self.health_server is not None:
            self.health_server.stop()
        self.feed.stop()
        for part in (self.remote, self.nodes, self.publisher):
            if part is not None:
                part.stop()
        self.allocator.stop()
        self.session.stop()
        self.store.close()

    def status(self) -> dict[str, Any]:
        mirrors = {"identities": self.allocator.mirror, "nodes": self.nodes.mirror}
        if self.remote is not None:
            mirrors["ipcache"] = self.remote.mirror
        errors = {name: m.last_error for name, m in mirrors.items() if not m.connected and m.last_error}
        if not self.session.healthy and self.session.last_error:
            errors["lease"] = self.session.last_error
        if self.publisher.last_error:
            errors["publish"] = self.publisher.last_error
        return {"backend": self.config.backend, "endpoints": list(self.config.endpoints), "node": self.node,
                "connected": not errors, "errors": errors,
                "remote_endpoints": len(self.remote.entries) if self.remote is not None else 0,
                "nodes": len(self.nodes.nodes),
                "malformed": self.allocator.malformed + self.nodes.malformed
                + (self.remote.malformed if self.remote is not None else 0),
                "watches": {name: {"connected": m.connected, "revision": m.revision, "relists": m.relists}
                            for name, m in mirrors.items()},
                **({"health": self._health_summary()} if self.prober is not None else {})}

    def _health_summary(self) -> dict[str, Any]:
        report = self.prober.report() if self.prober is not None else []
        return {"nodes": len(report), "reachable": sum(h.reachable for h in report),
                "unreachable": [h.name for h in report if not h.reachable], "error": self.health_error}


class NodeConnectivityCollector:
    """``cilia_node_connectivity_status`` / ``_latency_seconds`` per probed node and probe type,
    Cilium's names; a node that left the cluster leaves the metrics."""

    def __init__(self, cluster: ClusterNode) -> None:
        self.cluster = cluster

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        labels = ["source_node", "target_node", "target_address", "type"]
        status = GaugeMetricFamily("cilia_node_connectivity_status",
                                   "1 if the node answered the last probe of this type, else 0", labels=labels)
        latency = GaugeMetricFamily("cilia_node_connectivity_latency_seconds",
                                    "Round-trip time of the node's last answer to a probe of this type",
                                    labels=labels)
        prober = self.cluster.prober
        for h in prober.report() if prober is not None else []:
            for kind, result in (("icmp", h.icmp), ("http", h.http)):
                values = [self.cluster.node, h.name, h.address, kind]
                status.add_metric(values, 1.0 if result.ok else 0.0)
                if result.latency is not None:
                    latency.add_metric(values, result.latency)
        yield status
        yield latency

    def describe(self) -> list[Metric]:
        return []  # collected lazily: nothing to check at registration

"""Does a set of resources hang together? Dangling references between xDS types.

Envoy accepts a listener whose RDS route configuration or tcp_proxy cluster does not exist
yet, and an EDS cluster without endpoints: the listener or cluster then warms (or traffic
fails) until the missing piece arrives, which may be never. ``check`` finds such references
before the resources are published, like go-control-plane's ``Snapshot.Consistent``.

Only Envoy's own config protos are parsed here; typed configs of other types are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from cilia.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE


@dataclass(frozen=True, slots=True)
class Inconsistencies:
    """Dangling references, by the name of the resource that holds them; empty when consistent."""

    missing_routes: Mapping[str, frozenset[str]] = field(default_factory=dict)  # listener -> RDS names
    missing_clusters: Mapping[str, frozenset[str]] = field(default_factory=dict)  # listener -> cluster names
    missing_endpoints: Mapping[str, str] = field(default_factory=dict)  # EDS cluster -> service name

    def __bool__(self) -> bool:
        return bool(self.missing_routes or self.missing_clusters or self.missing_endpoints)

    def describe(self) -> list[str]:
        """One line per problem, sorted."""
        out = [f"listener {li}: route configuration {r} is missing"
               for li, names in self.missing_routes.items() for r in sorted(names)]
        out += [f"listener {li}: cluster {c} is missing"
                for li, names in self.missing_clusters.items() for c in sorted(names)]
        out += [f"cluster {c}: EDS ClusterLoadAssignment {n} is missing" for c, n in self.missing_endpoints.items()]
        return sorted(out)


def check(resources: Mapping[str, Mapping[str, Message]], memo: _Refs | None = None,
          eds_of: Mapping[str, Message] | None = None) -> Inconsistencies:
    """Check resources given by type URL and name (as ``Cache.snapshot()`` returns them).
    ``memo``: keeps each listener's references between calls (see ``Checker``). ``eds_of``: the
    clusters whose EDS assignment is checked (default: all).

    Reported: listeners naming an RDS route configuration that is not there; listeners whose
    HTTP routes (inline or via RDS), tcp_proxy or gRPC access logs name a cluster that is not
    there; EDS clusters whose ClusterLoadAssignment is not there.
    """
    listeners = resources.get(LISTENER, {})
    routes = resources.get(ROUTE, {})
    clusters = resources.get(CLUSTER, {})
    endpoints = resources.get(ENDPOINT, {})
    missing_routes: dict[str, frozenset[str]] = {}
    missing_clusters: dict[str, frozenset[str]] = {}
    for name, msg in listeners.items():
        if not isinstance(msg, listener_pb2.Listener):
            continue
        rds, direct = (memo or _Refs()).of(name, msg)
        refs = set(direct)
        for r in rds:
            route = routes.get(r)
            if isinstance(route, route_pb2.RouteConfiguration):
                refs.update(_route_clusters(route))
        # by lookups: "set - dict.keys()" walks every key of the dict, once per listener
        if lost := frozenset(r for r in rds if r not in routes):
            missing_routes[name] = lost
        if lost := frozenset(c for c in refs if c not in clusters):
            missing_clusters[name] = lost
    missing_endpoints: dict[str, str] = {}
    for name, msg in (clusters if eds_of is None else eds_of).items():
        if isinstance(msg, cluster_pb2.Cluster) and msg.type == cluster_pb2.Cluster.EDS:
            service = msg.eds_cluster_config.service_name or msg.name
            if service not in endpoints:
                missing_endpoints[name] = service
    return Inconsistencies(missing_routes, missing_clusters, missing_endpoints)


class _Refs:
    """The names a listener refers to, kept while the same message object comes back."""

    def __init__(self) -> None:
        self._done: dict[str, tuple[Message, frozenset[str], frozenset[str]]] = {}

    def of(self, name: str, msg: listener_pb2.Listener) -> tuple[frozenset[str], frozenset[str]]:
        done = self._done.get(name)
        if done is not None and done[0] is msg:
            return done[1], done[2]
        rds: set[str] = set()
        refs: set[str] = set()
        _listener_refs(msg, rds, refs)
        self._done[name] = (msg, frozenset(rds), frozenset(refs))
        return self._done[name][1], self._done[name][2]

    def forget(self, names: Iterable[str]) -> None:
        for n in names:
            self._done.pop(n, None)

    def keep(self, names: Iterable[str]) -> None:
        live = set(names)
        self._done = {n: d for n, d in self._done.items() if n in live}


class Checker:
    """``check`` for a publisher whose snapshots mostly repeat: a listener that is the same
    message object as last time is not parsed again (translation memos hand out the same
    objects for what did not change)."""

    def __init__(self) -> None:
        self._refs = _Refs()

    def check(self, resources: Mapping[str, Mapping[str, Message]]) -> Inconsistencies:
        found = check(resources, self._refs)
        self._refs.keep(resources.get(LISTENER, {}))
        return found

    def check_part(self, resources: Mapping[str, Mapping[str, Message]], clusters_changed: Mapping[str, Message],
                   listeners_gone: Iterable[str] | None) -> Inconsistencies:
        """``check`` of a change to a set that was consistent: ``resources`` holds the listeners it
        publishes and every cluster there will be; only ``clusters_changed`` are checked for their
        EDS assignment. ``listeners_gone``: the listeners it deletes (None: ``resources`` holds all)."""
        found = check(resources, self._refs, eds_of=clusters_changed)
        if listeners_gone is None:
            self._refs.keep(resources.get(LISTENER, {}))
        else:
            self._refs.forget(listeners_gone)
        return found


def _unpack(a: any_pb2.Any, cls: type[Message]) -> Message | None:
    if not a.Is(cls.DESCRIPTOR):
        return None
    msg = cls()
    return msg if a.Unpack(msg) else None


def _chains(listener: listener_pb2.Listener) -> Iterator[listener_components_pb2.FilterChain]:
    yield from listener.filter_chains
    if listener.HasField("default_filter_chain"):
        yield listener.default_filter_chain


def _listener_refs(listener: listener_pb2.Listener, rds: set[str], refs: set[str]) -> None:
    refs.update(_log_clusters(listener.access_log))
    for chain in _chains(listener):
        for f in chain.filters:
            hcm = _unpack(f.typed_config, hcm_pb2.HttpConnectionManager)
            if isinstance(hcm, hcm_pb2.HttpConnectionManager):
                if hcm.HasField("rds"):
                    rds.add(hcm.rds.route_config_name)
                if hcm.HasField("route_config"):
                    refs.update(_route_clusters(hcm.route_config))
                refs.update(_log_clusters(hcm.access_log))
                continue
            tcp = _unpack(f.typed_config, tcp_proxy_pb2.TcpProxy)
            if isinstance(tcp, tcp_proxy_pb2.TcpProxy):
                if tcp.cluster:
                    refs.add(tcp.cluster)
                refs.update(c.name for c in tcp.weighted_clusters.clusters)
                refs.update(_log_clusters(tcp.access_log))


def _route_clusters(config: route_pb2.RouteConfiguration) -> set[str]:
    out: set[str] = set()
    for vhost in config.virtual_hosts:
        for route in vhost.routes:
            if not route.HasField("route"):
                continue
            if route.route.cluster:
                out.add(route.route.cluster)
            out.update(c.name for c in route.route.weighted_clusters.clusters)
    return out


def _log_clusters(logs: Iterable[accesslog_pb2.AccessLog]) -> set[str]:
    out: set[str] = set()
    for log in logs:
        for cls in (als_pb2.HttpGrpcAccessLogConfig, als_pb2.TcpGrpcAccessLogConfig):
            cfg = _unpack(log.typed_config, cls)
            if isinstance(cfg, (als_pb2.HttpGrpcAccessLogConfig, als_pb2.TcpGrpcAccessLogConfig)):
                name = cfg.common_config.grpc_service.envoy_grpc.cluster_name
                if name:
                    out.add(name)
    return out

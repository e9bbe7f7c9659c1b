"""Snapshot consistency: dangling RDS names, cluster references and EDS assignments are reported."""

from __future__ import annotations

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from cilia.xds import Cache, TypeChange, check
from cilia.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE


def _any(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def listener(name: str, *filters: Message) -> listener_pb2.Listener:
    chain = listener_components_pb2.FilterChain(
        filters=[listener_components_pb2.Filter(name=f"f{i}", typed_config=_any(f)) for i, f in enumerate(filters)])
    return listener_pb2.Listener(name=name, filter_chains=[chain])


def routes_to(*clusters: str) -> route_pb2.RouteConfiguration:
    rs = [route_components_pb2.Route(route=route_components_pb2.RouteAction(cluster=c)) for c in clusters]
    return route_pb2.RouteConfiguration(virtual_hosts=[route_components_pb2.VirtualHost(name="v", routes=rs)])


def rds(name: str) -> hcm_pb2.HttpConnectionManager:
    return hcm_pb2.HttpConnectionManager(rds=hcm_pb2.Rds(route_config_name=name))


def eds(name: str, service: str = "") -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    c.eds_cluster_config.service_name = service
    return c


def static(name: str) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)


def test_consistent_set_reports_nothing() -> None:
    cfg = als_pb2.HttpGrpcAccessLogConfig()
    cfg.common_config.log_name = "l"
    cfg.common_config.grpc_service.envoy_grpc.cluster_name = "logs"
    log = accesslog_pb2.AccessLog(name="als", typed_config=_any(cfg))
    hcm = hcm_pb2.HttpConnectionManager(route_config=routes_to("web"), access_log=[log])
    res = {
        LISTENER: {"l1": listener("l1", hcm), "l2": listener("l2", rds("r")),
                   "l3": listener("l3", tcp_proxy_pb2.TcpProxy(cluster="db"))},
        ROUTE: {"r": routes_to("web")},
        CLUSTER: {"web": static("web"), "db": eds("db", "db-svc"), "logs": static("logs")},
        ENDPOINT: {"db-svc": endpoint_pb2.ClusterLoadAssignment(cluster_name="db-svc")},
    }
    result = check(res)
    assert not result and result.describe() == []
    del res[CLUSTER]["logs"]
    assert dict(check(res).missing_clusters) == {"l1": frozenset({"logs"})}


def test_dangling_references_are_reported_by_holder() -> None:
    cache = Cache()
    cache.update_many({
        LISTENER: TypeChange({
            "http": listener("http", rds("missing-routes")),
            "via-rds": listener("via-rds", rds("r")),
            "tcp": listener("tcp", tcp_proxy_pb2.TcpProxy(cluster="gone")),
            "inline": listener("inline", hcm_pb2.HttpConnectionManager(route_config=routes_to("web", "nope"))),
        }),
        ROUTE: TypeChange({"r": routes_to("also-gone")}),
        CLUSTER: TypeChange({"web": static("web"), "db": eds("db"), "svc": eds("svc", "svc-eds")}),
        ENDPOINT: TypeChange({"db": endpoint_pb2.ClusterLoadAssignment(cluster_name="db")}),
    })
    result = check(cache.snapshot())
    assert result
    assert dict(result.missing_routes) == {"http": frozenset({"missing-routes"})}
    assert dict(result.missing_clusters) == {
        "tcp": frozenset({"gone"}), "inline": frozenset({"nope"}), "via-rds": frozenset({"also-gone"})}
    assert dict(result.missing_endpoints) == {"svc": "svc-eds"}
    assert "listener tcp: cluster gone is missing" in result.describe()


def test_snapshot_follows_node_views() -> None:
    cache = Cache()
    cache.set(CLUSTER, {"a": static("a")})
    cache.set(LISTENER, {"l": listener("l", tcp_proxy_pb2.TcpProxy(cluster="a"))})
    assert not check(cache.snapshot("n1"))
    cache.set_node_view("n1", CLUSTER, [])
    assert dict(check(cache.snapshot("n1")).missing_clusters) == {"l": frozenset({"a"})}


def test_checker_reparses_only_listeners_that_are_new_objects() -> None:
    """The memo keys on the message object: a listener replaced under the same name is read anew."""
    from cilia.xds.consistency import Checker

    checker = Checker()
    a = listener("a", tcp_proxy_pb2.TcpProxy(cluster="one"))
    assert not checker.check({LISTENER: {"a": a}, CLUSTER: {"one": static("one")}})
    assert checker.check({LISTENER: {"a": a}, CLUSTER: {}}).missing_clusters == {"a": frozenset({"one"})}
    b = listener("a", tcp_proxy_pb2.TcpProxy(cluster="two"))  # same name, new object
    found = checker.check({LISTENER: {"a": b}, CLUSTER: {"one": static("one")}})
    assert found.missing_clusters == {"a": frozenset({"two"})} == check({LISTENER: {"a": b}}).missing_clusters

"""translate_node / translate_egress without Envoy: deterministic bytes, names, marks, matcher shape."""

from __future__ import annotations

import ipaddress
from typing import Any

from google.protobuf import json_format

from cilia.envoy.translate import (
    EGRESS_MARK,
    INGRESS_MARK,
    NO_DESTINATION_RULE,
    NO_ENDPOINT,
    NO_RULE,
    AccessLogTarget,
    NodeEndpoint,
    ProxyPort,
    ProxyResources,
    prefixes_by_identity,
    translate_egress,
    translate_node,
)
from cilia.policy import Endpoint, LabelSet, PolicyEngine, parse_text
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {role: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: /allowed}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db}
spec:
  endpointSelector: {matchLabels: {role: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {role: client}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client}
spec:
  endpointSelector: {matchLabels: {role: client}}
  egress:
  - toEndpoints: [{matchLabels: {role: web}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{path: /allowed}]
"""
# web1 and web2 share one policy; db is L3/L4 only; client has egress rules.
ENDPOINTS = [("web1", "role=web,n=1", "10.0.0.1"), ("web2", "role=web,n=2", "10.0.0.2"),
             ("db", "role=db", "10.0.0.3"), ("client", "role=client", "10.0.0.4")]
TARGET = AccessLogTarget("cilia-accesslog", "unix:/run/cilia/accesslog.sock")


def engine_for(order: list[int]) -> PolicyEngine:
    engine = PolicyEngine()
    for i in order:
        name, labels, address = ENDPOINTS[i]
        engine.upsert_endpoint(Endpoint(name, LabelSet.parse(labels), (ipaddress.ip_address(address),)))
    result = parse_text(POLICY, "node.yaml")
    assert result.ok, [str(p) for p in result.problems]
    engine.apply(result.policies)
    return engine


def node(order: list[int], access_log: AccessLogTarget | None = None, **marks: int) -> ProxyResources:
    engine = engine_for(order)
    endpoints = [NodeEndpoint(ENDPOINTS[i][0], (ipaddress.ip_network(ENDPOINTS[i][2]),),
                              engine.endpoint_policy(ENDPOINTS[i][0]).map_state.ingress,
                              engine.endpoint_policy(ENDPOINTS[i][0]).map_state.egress) for i in order]
    return translate_node("node1", endpoints, "0.0.0.0", prefixes_by_identity(engine.ipcache.items()),
                          ingress=[ProxyPort(80, 15001)], egress=[ProxyPort(80, 15002)],
                          access_log=access_log, **marks)


def serialized(res: ProxyResources) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in (*res.listeners, *res.clusters)]


def network_rbac(res: ProxyResources, listener: int, chain: int = -1) -> dict[str, Any]:
    rbac = net_rbac_pb2.RBAC()
    res.listeners[listener].filter_chains[chain].filters[0].typed_config.Unpack(rbac)
    out: dict[str, Any] = json_format.MessageToDict(rbac)
    return out


def tree(matcher: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(the input's extension name, the range matchers) of an IP range matcher tree."""
    t = matcher["matcherTree"]
    return t["input"]["name"], t["customMatch"]["typedConfig"]["rangeMatchers"]


def test_equal_input_gives_byte_equal_resources_whatever_the_order() -> None:
    first = node([0, 1, 2, 3])
    for order in ([3, 2, 1, 0], [2, 0, 3, 1]):
        assert serialized(node(order)) == serialized(first)
    assert serialized(node([1, 3, 0, 2], TARGET)) == serialized(node([0, 1, 2, 3], TARGET))
    assert first.notes == ()


def test_transparent_listeners_and_original_dst_clusters_with_marks() -> None:
    res = node([0, 1, 2, 3])
    assert [li.name for li in res.listeners] == ["node1-ingress-80", "node1-egress-80"]
    assert [c.name for c in res.clusters] == ["node1-ingress-80", "node1-egress-80"]
    for li, port in zip(res.listeners, (15001, 15002), strict=True):
        assert li.transparent.value is True
        assert (li.address.socket_address.address, li.address.socket_address.port_value) == ("0.0.0.0", port)
        assert [f.name for f in li.listener_filters] == ["envoy.filters.listener.original_dst"]
        assert list(li.access_log) == []
    for cluster, mark in zip(res.clusters, (INGRESS_MARK, EGRESS_MARK), strict=True):
        assert cluster.type == cluster.ORIGINAL_DST and cluster.lb_policy == cluster.CLUSTER_PROVIDED
        [option] = cluster.upstream_bind_config.socket_options
        assert (option.level, option.name, option.int_value, option.state) == (1, 36, mark, option.STATE_PREBIND)
    marked = node([0, 1, 2, 3], ingress_mark=0x1234, egress_mark=0x5678)
    assert [c.upstream_bind_config.socket_options[0].int_value for c in marked.clusters] == [0x1234, 0x5678]
    assert (INGRESS_MARK, EGRESS_MARK) == (0xA00, 0xB00)


def test_ingress_matches_the_destination_endpoint_then_the_source() -> None:
    res = node([0, 1, 2, 3])
    ingress = res.listeners[0]
    # db (L3/L4 rules) and client (no ingress rules) have no HTTP rules: their connections get a
    # plain TCP chain chosen by destination address.
    assert [(c.name, [f.name for f in c.filters]) for c in ingress.filter_chains] == [
        ("node1-ingress-80-tcp", ["envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"]),
        ("node1-ingress-80-http", ["envoy.filters.network.rbac", "envoy.filters.network.http_connection_manager"]),
    ]
    assert [(r.address_prefix, r.prefix_len.value) for r in ingress.filter_chains[0].filter_chain_match.prefix_ranges] \
        == [("10.0.0.3", 32), ("10.0.0.4", 32)]
    rbac = network_rbac(res, 0)
    name, by_endpoint = tree(rbac["matcher"])
    assert name == "envoy.matching.inputs.destination_ip"
    assert rbac["matcher"]["onNoMatch"]["action"]["typedConfig"]["name"] == NO_ENDPOINT
    # At L3/L4 web1, web2 and db allow the same peers, so they share one range; client allows
    # nobody: a range whose nested matcher denies everyone.
    addresses = sorted(sorted(r["addressPrefix"] for r in m["ranges"]) for m in by_endpoint)
    assert addresses == [["10.0.0.1", "10.0.0.2", "10.0.0.3"], ["10.0.0.4"]]
    for m in by_endpoint:
        nested = m["onMatch"]["matcher"]
        assert tree(nested)[0] == "envoy.matching.inputs.direct_source_ip"
        assert nested["onNoMatch"]["action"]["typedConfig"]["name"] == NO_RULE


def test_egress_matches_the_source_endpoint_then_the_destination() -> None:
    res = node([0, 1, 2, 3])
    egress = res.listeners[1]
    assert egress.filter_chains[0].filter_chain_match.direct_source_prefix_ranges  # the non-HTTP endpoints
    rbac = network_rbac(res, 1)
    name, by_endpoint = tree(rbac["matcher"])
    assert name == "envoy.matching.inputs.direct_source_ip"
    for m in by_endpoint:
        nested = m["onMatch"]["matcher"]
        assert tree(nested)[0] == "envoy.matching.inputs.destination_ip"
        assert nested["onNoMatch"]["action"]["typedConfig"]["name"] == NO_DESTINATION_RULE


def test_sidecar_egress_matches_only_the_destination() -> None:
    engine = engine_for([0, 1, 2, 3])
    res = translate_egress("client", engine.endpoint_policy("client").map_state.egress, [ProxyPort(80, 15002)],
                           "127.0.0.1", prefixes_by_identity(engine.ipcache.items()), TARGET, socket_mark=0x42)
    assert [li.name for li in res.listeners] == ["client-egress-80"]
    assert [c.name for c in res.clusters] == ["client-egress-80", "cilia-accesslog"]
    assert res.clusters[0].upstream_bind_config.socket_options[0].int_value == 0x42
    [chain] = res.listeners[0].filter_chains
    assert [f.name for f in chain.filters] == ["envoy.filters.network.rbac",
                                               "envoy.filters.network.http_connection_manager"]
    name, ranges = tree(network_rbac(res, 0)["matcher"])
    assert name == "envoy.matching.inputs.destination_ip"
    allowed = [r for r in ranges if "action" in r["onMatch"]
               and r["onMatch"]["action"]["typedConfig"].get("action", "ALLOW") == "ALLOW"]
    assert [sorted(c["addressPrefix"] for c in r["ranges"]) for r in allowed] == [["10.0.0.1", "10.0.0.2"]]


def test_access_log_target_logs_refused_connections_at_the_listener() -> None:
    res = node([0, 1, 2, 3], TARGET)
    assert [c.name for c in res.clusters][-1] == "cilia-accesslog"
    for i, li in enumerate(res.listeners):
        [log] = li.access_log
        assert log.name == "envoy.access_loggers.tcp_grpc"
        meta = log.filter.metadata_filter
        assert meta.matcher.filter == "envoy.filters.network.rbac"
        assert [p.key for p in meta.matcher.path] == ["shadow_engine_result"]
        assert meta.matcher.value.string_match.exact == "denied"
        assert meta.match_if_key_not_found.value is False
        # The shadow matcher mirrors the enforced one: it is what puts the verdict in metadata.
        rbac = network_rbac(res, i)
        assert rbac["shadowMatcher"] == rbac["matcher"]
    assert "shadowMatcher" not in network_rbac(node([0, 1, 2, 3]), 0)

"""translate_ingress without Envoy: deterministic bytes, full-match regexes, the shape of each port."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import re2
from google.protobuf import json_format

from cilia.envoy.translate import PortMapping, ProxyResources, prefixes_by_identity, translate_ingress
from cilia.policy import Endpoint, LabelSet, PolicyEngine, parse_text

POLICY = r"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {team: a}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}, {port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: '/v1/.*', host: 'api\.example\.com'}
        - {method: 'PUT|POST', path: /upload, headers: ["X-Token: abc", X-Trace]}
  - fromEndpoints: [{matchLabels: {team: b}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{path: /health}]
  - fromEntities: [world]
    toPorts: [{ports: [{port: "9000", protocol: TCP}]}]
"""
ENDPOINTS = [("api", "app=api", "10.0.0.1"), ("a1", "team=a,n=1", "10.0.0.2"), ("a2", "team=a,n=2", "10.0.0.3"),
             ("b1", "team=b", "10.0.1.0/24"), ("c1", "team=c", "10.0.0.9")]
PORTS = [PortMapping.same(80), PortMapping(8080, 18080, 8081), PortMapping.same(9000)]


def translate(order: list[int]) -> ProxyResources:
    """The api endpoint's resources, with endpoints added in ``order``."""
    engine = PolicyEngine()
    for i in order:
        name, labels, ip = ENDPOINTS[i]
        addr = ipaddress.ip_network(ip)
        engine.upsert_endpoint(Endpoint(name, LabelSet.parse(labels), (addr.network_address,)))
        if addr.prefixlen != 32:  # a CIDR-sized endpoint: give the whole prefix its identity
            engine.ipcache.upsert(addr, engine.identity_of(name).id)
    result = parse_text(POLICY, "api.yaml")
    assert result.ok, [str(p) for p in result.problems]
    engine.apply(result.policies)
    prefixes = prefixes_by_identity(reversed(engine.ipcache.items()) if order[0] else engine.ipcache.items())
    return translate_ingress("api", engine.endpoint_policy("api").map_state.ingress,
                             PORTS[::-1] if order[0] else PORTS, "10.0.0.1", "127.0.0.1", prefixes)


def serialized(res: ProxyResources) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in (*res.listeners, *res.clusters)]


def walk(node: Any, key: str) -> Iterator[Any]:
    """Every value stored under ``key`` anywhere in a JSON-like tree."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v, key)


def test_equal_policy_gives_byte_equal_resources_whatever_the_order() -> None:
    first = translate([0, 1, 2, 3, 4])
    assert serialized(first) == serialized(translate([0, 1, 2, 3, 4]))
    assert serialized(first) == serialized(translate([4, 3, 2, 1, 0]))
    assert serialized(first) == serialized(translate([2, 0, 4, 1, 3]))
    assert [li.name for li in first.listeners] == ["api-ingress-80", "api-ingress-8080", "api-ingress-9000"]
    assert first.notes == ()


def test_regexes_are_the_policy_patterns_as_re2_full_matches() -> None:
    res = translate([0, 1, 2, 3, 4])
    tree = [json_format.MessageToDict(li) for li in res.listeners]
    regexes = list(walk(tree, "safeRegex"))
    assert regexes, "the HTTP rules must become regex matchers"
    for matcher in regexes:
        # safe_regex in a string matcher is RE2::FullMatch: the pattern must cover the whole value.
        assert set(matcher) == {"googleRe2", "regex"}
    patterns = {m["regex"] for m in regexes}
    assert patterns == {"GET", "/v1/.*", r"api\.example\.com", "PUT|POST", "/upload", "/health", ".*"}
    # What full matching means for the policy: no prefix or substring matches.
    assert re2.fullmatch("/upload", "/upload") and not re2.fullmatch("/upload", "/upload/x")
    assert not re2.fullmatch("PUT|POST", "POSTX")
    # Every request matcher is a full regex or an exact header value, never a prefix or substring.
    values = list(walk(tree, "valueMatch"))
    assert values and all(set(v) in ({"safeRegex"}, {"exact"}) for v in values)
    assert {v["exact"] for v in values if "exact" in v} == {"abc"}


def test_plain_l4_ports_proxy_tcp_and_l7_ports_parse_http() -> None:
    res = translate([0, 1, 2, 3, 4])
    filters = {li.name: [f.name for f in li.filter_chains[0].filters] for li in res.listeners}
    assert filters == {
        "api-ingress-80": ["envoy.filters.network.rbac", "envoy.filters.network.http_connection_manager"],
        "api-ingress-8080": ["envoy.filters.network.rbac", "envoy.filters.network.http_connection_manager"],
        "api-ingress-9000": ["envoy.filters.network.rbac", "envoy.filters.network.tcp_proxy"],
    }
    by_name = {li.name: li for li in res.listeners}
    assert by_name["api-ingress-8080"].address.socket_address.port_value == 18080
    assert {c.name: c.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.port_value
            for c in res.clusters} == {"api-ingress-80": 80, "api-ingress-8080": 8081, "api-ingress-9000": 9000}

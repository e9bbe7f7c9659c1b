"""translate_ingress without Envoy: deterministic bytes, full-match regexes, the shape of each port."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
import re2
from envoy.config.rbac.v3 import rbac_pb2
from google.protobuf import json_format
from xds.type.matcher.v3 import ip_pb2, matcher_pb2

from cilia.envoy.rbac import SOURCE, TREE_MIN_RULES, HTTPPolicy, http_matcher, literal_prefix
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



@pytest.mark.parametrize(("pattern", "prefix"), [
    ("/v1/request-landing", "/v1/request-landing"),
    ("/api/r0999/[a-z]+", "/api/r0999/"),
    ("/v1/.*", "/v1/"),
    ("^/a/b", "/a/b"),
    ("/ab*", "/a"),        # b* may be absent
    ("/ab?", "/a"),
    ("/a{2}", "/"),
    ("/ab+c", "/ab"),       # b+ is there at least once
    (r"/a\.b", "/a.b"),     # escaped punctuation is itself
    (r"/x\d", "/x"),
    ("/a|/b", ""),          # an alternation can start anywhere
    ("(?i)/x", ""),
    (".*/b", ""),
])
def test_literal_prefix_is_what_every_full_match_starts_with(pattern: str, prefix: str) -> None:
    assert literal_prefix(pattern) == prefix


def _rule_names(m: matcher_pb2.Matcher) -> list[str]:
    out = []
    for fm in m.matcher_list.matchers:
        action = rbac_pb2.Action()
        fm.on_match.action.typed_config.Unpack(action)
        out.append(action.name)
    return out


def test_many_http_rules_get_a_path_prefix_map_whose_buckets_hold_every_candidate() -> None:
    """Rules named after their path; predicates are placeholders here, Envoy checks the semantics
    in tests/envoy/test_envoy_differential.py (policy many-paths)."""
    paths = ["/a", "/a/b", "/ab", "/x/.*", ".*", "/a/c", "/q", "/r", "/s"]
    assert len(paths) >= TREE_MIN_RULES
    policy = HTTPPolicy(None, tuple((b"", p, literal_prefix(p)) for p in paths), "deny")
    matcher = http_matcher({300: policy}, {300: (ipaddress.ip_network("10.0.0.1/32"),)}, SOURCE, "none")
    ipm = ip_pb2.IPMatcher()
    matcher.matcher_tree.custom_match.typed_config.Unpack(ipm)
    (nested,) = [r.on_match.matcher for r in ipm.range_matchers if r.on_match.HasField("matcher")]
    buckets = nested.matcher_tree.prefix_match_map.map
    assert sorted(buckets) == ["/a", "/a/b", "/a/c", "/ab", "/q", "/r", "/s", "/x/"]
    assert _rule_names(buckets["/a/b"].matcher) == ["/a", "/a/b", ".*"]  # own, shorter prefixes, unprefixed
    assert _rule_names(buckets["/ab"].matcher) == ["/a", "/ab", ".*"]
    assert _rule_names(buckets["/q"].matcher) == [".*", "/q"]  # in the rules' own order
    assert _rule_names(nested.on_no_match.matcher) == [".*"]  # paths no key starts with
    few = HTTPPolicy(None, tuple((b"", p, literal_prefix(p)) for p in paths[:TREE_MIN_RULES - 1]), "deny")
    matcher = http_matcher({300: few}, {300: (ipaddress.ip_network("10.0.0.1/32"),)}, SOURCE, "none")
    matcher.matcher_tree.custom_match.typed_config.Unpack(ipm)
    (nested,) = [r.on_match.matcher for r in ipm.range_matchers if r.on_match.HasField("matcher")]
    assert len(_rule_names(nested)) == TREE_MIN_RULES - 1  # a few rules stay a plain list

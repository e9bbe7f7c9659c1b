"""Node mode through a real Envoy with real redirection: iptables REDIRECT → transparent listener →
original_dst → RBAC by (endpoint, peer identity) → ORIGINAL_DST cluster → the original destination.

All in a private network namespace: endpoints ``server`` (10.200.0.10) and ``server2``
(10.200.0.13) with one HTTP backend on 0.0.0.0:80, clients ``client-a`` (.11) and ``client-b``
(.12). Clients dial the servers' real addresses; only iptables sends them to Envoy, and only the
socket mark keeps Envoy's own upstream connections from being redirected back to it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.envoy.envoy_node_support import Node, node_namespace
from tests.envoy.envoy_support import wait_records

from cilia.envoy.accesslog import Verdict, serve
from cilia.envoy.translate import (
    ACCESS_DENIED_BODY,
    EGRESS_MARK,
    INGRESS_MARK,
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

SERVER, CLIENT_A, CLIENT_B, SERVER2 = "10.200.0.10", "10.200.0.11", "10.200.0.12", "10.200.0.13"
INGRESS_PORT, EGRESS_PORT = 15001, 15002
ENDPOINTS = [("server", "app=server", SERVER), ("client-a", "app=client-a", CLIENT_A),
             ("client-b", "app=client-b", CLIENT_B), ("server2", "app=server2", SERVER2)]

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client-a}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: /allowed}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: server2}
spec:
  endpointSelector: {matchLabels: {app: server2}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client-b}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-a}
spec:
  endpointSelector: {matchLabels: {app: client-a}}
  egress:
  - toEndpoints: [{matchLabels: {app: server}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: /allowed}]
"""


def engine_with_policy() -> PolicyEngine:
    engine = PolicyEngine()
    for name, labels, address in ENDPOINTS:
        engine.upsert_endpoint(Endpoint(name, LabelSet.parse(labels), (ipaddress.ip_address(address),)))
    result = parse_text(POLICY, "node.yaml")
    assert result.ok, [str(p) for p in result.problems]
    engine.apply(result.policies)
    return engine


def node_resources(access_log: AccessLogTarget | None = None, ingress_mark: int = INGRESS_MARK) -> ProxyResources:
    engine = engine_with_policy()
    endpoints = [NodeEndpoint(name, (ipaddress.ip_network(f"{address}/32"),),
                              engine.endpoint_policy(name).map_state.ingress,
                              engine.endpoint_policy(name).map_state.egress)
                 for name, _, address in ENDPOINTS]
    res = translate_node("node", endpoints, "127.0.0.1", prefixes_by_identity(engine.ipcache.items()),
                         ingress=[ProxyPort(80, INGRESS_PORT)], egress=[ProxyPort(80, EGRESS_PORT)],
                         access_log=access_log, ingress_mark=ingress_mark)
    assert res.notes == ()
    return res


@pytest.fixture
def node() -> Iterator[Node]:
    """The namespace with the backend running and Envoy's own connections (either default mark)
    exempt from redirection; each test adds the redirections it needs."""
    with node_namespace([SERVER, CLIENT_A, CLIENT_B, SERVER2]) as node:
        node.call(op="backend", port=80)
        for mark in (INGRESS_MARK, EGRESS_MARK):
            node.iptables("-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-m", "mark", "--mark",
                          f"{mark:#x}/0xf00", "-j", "RETURN")
        yield node


def redirect_to_servers(node: Node) -> None:
    """Every connection to a server's port 80 goes to the ingress proxy."""
    for server in (SERVER, SERVER2):
        node.iptables("-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-d", server, "--dport", "80",
                      "-j", "REDIRECT", "--to-ports", str(INGRESS_PORT))


def test_ingress_is_decided_by_destination_endpoint_and_source_identity(node: Node, tmp_path: Path) -> None:
    redirect_to_servers(node)
    server, _ = serve(f"unix:{tmp_path}/als.sock")
    try:
        node.publish(node_resources(AccessLogTarget("cilia-accesslog", f"unix:{tmp_path}/als.sock")))
        # client-a → server: L7 rules; the backend answers from the original destination.
        assert node.http(CLIENT_A, SERVER, 80, "GET", "/allowed") == \
            {"status": 200, "body": f"{SERVER} GET /allowed"}
        assert node.http(CLIENT_A, SERVER, 80, "GET", "/other") == {"status": 403, "body": ACCESS_DENIED_BODY}
        # client-b → server: not allowed at L3/L4, accepted by Envoy, closed before any HTTP response.
        refused = node.http(CLIENT_B, SERVER, 80, "GET", "/allowed")
        assert "closed" in refused, refused
        # client-b → server2: an L3/L4 allow (a plain TCP filter chain on the same listener).
        assert node.http(CLIENT_B, SERVER2, 80, "GET", "/any") == {"status": 200, "body": f"{SERVER2} GET /any"}
        # client-a is nobody server2 allows.
        assert "closed" in node.http(CLIENT_A, SERVER2, 80, "GET", "/allowed")
        # Two refusals logged as TCP records, beside the two HTTP ones.
        records = wait_records(server.receiver, 4)
    finally:
        server.stop(0)
    tcp = sorted((r for r in records if r.kind == "tcp"), key=lambda r: r.source_address)
    assert [(r.verdict, r.source_address, r.destination_address, r.destination_port, r.log_name) for r in tcp] == [
        (Verdict.DENIED, CLIENT_A, SERVER2, 80, "node-ingress-80"),
        (Verdict.DENIED, CLIENT_B, SERVER, 80, "node-ingress-80"),
    ]
    # Envoy's termination details replace the name's spaces; cilia.envoy.accesslog may restore them.
    assert {r.rule for r in tcp} == {NO_RULE}
    http = sorted((r for r in records if r.kind == "http"), key=lambda r: r.path)
    assert [(r.path, r.status, r.verdict) for r in http] == \
        [("/allowed", 200, Verdict.FORWARDED), ("/other", 403, Verdict.DENIED)]


def test_without_a_known_mark_envoys_upstream_is_redirected_back(node: Node) -> None:
    """The mark is what lets Envoy's connection reach the backend: with one the datapath does not
    exempt, it comes back to Envoy from the server's own address, which nothing allows."""
    redirect_to_servers(node)
    node.publish(node_resources(ingress_mark=0x0C00))
    reply = node.http(CLIENT_A, SERVER, 80, "GET", "/allowed")
    assert reply.get("status") == 503, reply


def test_egress_http_rules_for_the_client(node: Node) -> None:
    # Only client-a's traffic is redirected, to the egress proxy.
    node.iptables("-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-s", CLIENT_A, "--dport", "80",
                  "-j", "REDIRECT", "--to-ports", str(EGRESS_PORT))
    node.publish(node_resources())
    assert node.http(CLIENT_A, SERVER, 80, "GET", "/allowed") == {"status": 200, "body": f"{SERVER} GET /allowed"}
    assert node.http(CLIENT_A, SERVER, 80, "POST", "/allowed") == {"status": 403, "body": ACCESS_DENIED_BODY}
    # server2 is no destination client-a may reach: closed before HTTP.
    assert "closed" in node.http(CLIENT_A, SERVER2, 80, "GET", "/allowed")
    # client-b is not redirected at all.
    assert node.http(CLIENT_B, SERVER2, 80, "GET", "/x")["status"] == 200


def test_sidecar_outbound_listener_for_one_endpoint(node: Node) -> None:
    """translate_egress: everything on the listener is client-a's; the destination decides."""
    node.iptables("-t", "nat", "-A", "OUTPUT", "-p", "tcp", "-s", CLIENT_A, "--dport", "80",
                  "-j", "REDIRECT", "--to-ports", str(EGRESS_PORT))
    engine = engine_with_policy()
    res = translate_egress("client-a", engine.endpoint_policy("client-a").map_state.egress,
                           [ProxyPort(80, EGRESS_PORT)], "127.0.0.1", prefixes_by_identity(engine.ipcache.items()))
    assert [li.name for li in res.listeners] == ["client-a-egress-80"] and res.notes == ()
    node.publish(res)
    assert node.http(CLIENT_A, SERVER, 80, "GET", "/allowed") == {"status": 200, "body": f"{SERVER} GET /allowed"}
    assert node.http(CLIENT_A, SERVER, 80, "GET", "/other") == {"status": 403, "body": ACCESS_DENIED_BODY}
    assert "closed" in node.http(CLIENT_A, SERVER2, 80, "GET", "/allowed")

"""L3/L4 enforcement in the kernel: real BPF programs on real veths, policy from real YAML.

Endpoints: client (app=client), other (app=other), server (app=server). Every test creates its
own namespaces and bpffs pins and removes them (see bpf_support.bpf_node).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.bpf.bpf_support import NODE_IP, BpfNode, bpf_node

SERVER_INGRESS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: server-ingress
spec:
  endpointSelector:
    matchLabels:
      app: server
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "8080"
        protocol: TCP
      - port: "9000"
        endPort: 9002
        protocol: TCP
      - port: "5353"
        protocol: UDP
"""


@pytest.fixture
def node() -> Iterator[BpfNode]:
    with bpf_node() as n:
        n.add_endpoint("client", "10.211.0.10", "app=client")
        n.add_endpoint("other", "10.211.0.11", "app=other")
        n.add_endpoint("server", "10.211.0.12", "app=server")
        n.serve_tcp("server", 8080, 8081, 9000, 9002, 9003)
        n.serve_udp_echo("server", 5353)
        n.sync()
        yield n


def test_no_policy_allows_everything(node: BpfNode) -> None:
    assert node.tcp("client", "server", 8080)
    assert node.tcp("other", "server", 8081)
    assert node.ping("client", "server")


def test_l3_identity_l4_ports_ranges_and_protocols(node: BpfNode) -> None:
    node.apply(SERVER_INGRESS)
    assert node.tcp("client", "server", 8080)
    assert not node.tcp("client", "server", 8081)  # port not listed
    assert node.tcp("client", "server", 9000) and node.tcp("client", "server", 9002)  # range
    assert not node.tcp("client", "server", 9003)  # just past endPort
    assert not node.tcp("other", "server", 8080)  # identity not selected
    assert node.udp("client", "server", 5353)
    assert not node.udp("other", "server", 5353)
    assert not node.ping("client", "server")  # ICMP not allowed by an L4 policy
    drops = node.wait_events(lambda e: e.verdict == "DROPPED" and e.destination_port == 8080
                             and e.source == "10.211.0.11")
    d = drops[0]
    assert d.reason == 133 and d.reason_text == "Policy denied" and d.direction == "ingress"
    assert d.source_identity == node.engine.identity_of("other").id
    assert d.destination_identity == node.engine.identity_of("server").id
    assert d.rule == "no rule allows it"
    allowed = node.wait_events(lambda e: e.verdict == "FORWARDED" and e.destination_port == 8080)
    assert "server-ingress" in allowed[0].rule and "policy.yaml:" in allowed[0].rule


def test_established_replies_and_policy_change_applies_to_new_connections(node: BpfNode) -> None:
    conn = node.open_tcp("client", "server", 8080)  # no policy yet: allowed
    try:
        node.apply(SERVER_INGRESS.replace('"8080"', '"7070"'))
        assert not node.tcp("client", "server", 8080)  # a new connection is judged: denied
        # The established one keeps working in both directions (conntrack).
        conn.sendall(b"x")
        assert not node.tcp("client", "server", 8081)
    finally:
        conn.close()
    ct = [e for e in node.datapath.conntrack() if e.dport == 8080 and e.daddr == "10.211.0.12"]
    assert ct and ct[0].packets >= 2


def test_deny_beats_allow_and_counts(node: BpfNode) -> None:
    node.apply(SERVER_INGRESS + """\
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: server-deny
spec:
  endpointSelector:
    matchLabels:
      app: server
  ingressDeny:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "9001"
        protocol: TCP
""")
    assert node.tcp("client", "server", 9000)
    assert not node.tcp("client", "server", 9001)  # inside the allowed range, but denied
    assert node.tcp("client", "server", 9002)
    d = node.wait_events(lambda e: e.verdict == "DROPPED" and e.destination_port == 9001)[0]
    assert d.reason == 181 and "server-deny" in d.rule
    rows = node.datapath.policy_rows(node.endpoints["server"].ep_id)
    deny = [r for r in rows if r["verdict"] == "deny"]
    assert deny and deny[0]["port"] == "9001/TCP" and deny[0]["direction"] == "ingress"
    allow = [r for r in rows if r["port"] == "8080/TCP"]
    assert allow[0]["identity"] == node.engine.identity_of("client").id


def test_icmp_by_type(node: BpfNode) -> None:
    node.apply("""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: icmp
spec:
  endpointSelector:
    matchLabels:
      app: server
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    icmps:
    - fields:
      - type: 8
        family: IPv4
""")
    assert node.ping("client", "server")  # echo request allowed, the reply is established
    assert not node.ping("other", "server")
    assert not node.tcp("client", "server", 8080)


def test_egress_policy_cidr_except_and_world(node: BpfNode) -> None:
    # Two hosts outside the cluster (namespaces joined to the node, no endpoint, no program).
    node.add_outside("ext1", "10.211.0.13")
    node.add_outside("ext2", "10.211.0.14")
    node.add_outside("far", "10.211.1.20")
    for name in ("ext1", "ext2", "far"):
        node.serve_tcp(name, 443, 8443)
    assert node.tcp("client", "ext2", 443) and node.tcp("client", "far", 443)
    node.apply("""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-egress
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
  - toCIDRSet:
    - cidr: 10.211.0.0/28
      except:
      - 10.211.0.14/32
  - toEntities:
    - world
    toPorts:
    - ports:
      - port: "443"
""")
    assert node.tcp("client", "ext1", 8443)  # in the CIDR: every port
    assert not node.tcp("client", "ext2", 8443)  # the except
    assert node.tcp("client", "ext2", 443)  # ... is still world, which is allowed on 443
    assert node.tcp("client", "far", 443) and not node.tcp("client", "far", 8443)
    # CIDR rules select addresses outside the cluster, not endpoints (Cilium's semantics):
    assert not node.tcp("client", "server", 8080)
    d = node.wait_events(lambda e: e.verdict == "DROPPED" and e.destination == "10.211.0.12")[0]
    assert d.direction == "egress" and d.endpoint_id == node.endpoints["client"].ep_id
    assert node.tcp("other", "server", 8080)  # other has no egress policy


def test_host_traffic_is_judged_as_reserved_host(node: BpfNode) -> None:
    node.apply(SERVER_INGRESS)
    assert not node.from_node_tcp("server", 8080)
    node.apply(SERVER_INGRESS + """\
  - fromEntities:
    - host
""")
    assert node.from_node_tcp("server", 8081)
    assert node.tcp("client", "server", 8080) and not node.tcp("other", "server", 8081)
    assert NODE_IP == "10.211.0.1"


def test_identity_change_of_an_endpoint(node: BpfNode) -> None:
    node.apply(SERVER_INGRESS)
    assert not node.tcp("other", "server", 8080)
    node.relabel("other", "app=client")  # now the same identity as client
    node.sync()
    assert node.tcp("other", "server", 8080)
    node.relabel("other", "app=other")
    node.sync()
    assert not node.tcp("other", "server", 8080)


def test_reload_keeps_pinned_state_and_enforcement(node: BpfNode) -> None:
    node.apply(SERVER_INGRESS)
    assert node.tcp("client", "server", 8080)
    rows_before = node.datapath.policy_rows(node.endpoints["server"].ep_id)
    node.datapath.stop_events()
    node.loader.close()  # the agent goes away: programs stay attached, maps stay pinned
    assert not node.tcp("other", "server", 8080)  # still enforced with no agent at all
    assert node.tcp("client", "server", 8080)
    node.loader.load()  # a new agent: reopens the pins, replaces the filters in place
    for ep in node.endpoints.values():
        node.loader.attach(ep.ns.host_if)
    node.datapath.start_events()
    node.sync()  # nothing changed: no entry rewritten, counters kept
    rows_after = node.datapath.policy_rows(node.endpoints["server"].ep_id)
    counted = {r["port"]: r["packets"] for r in rows_before if r["packets"]}
    assert counted and all(r["packets"] >= counted.get(r["port"], 0) for r in rows_after)
    assert node.tcp("client", "server", 8080) and not node.tcp("other", "server", 8080)
    assert node.loader.attached_filters(node.endpoints["server"].ns.host_if).count("cilia_from_endpoint") == 1


def test_audit_mode_lets_would_be_drops_through_and_reports_them(node: BpfNode) -> None:
    node.apply(SERVER_INGRESS)
    assert not node.tcp("other", "server", 8080)
    node.set_audit("server", ingress=True)
    assert node.tcp("other", "server", 8080)  # would be dropped: let through
    assert node.tcp("client", "server", 8080)  # allowed anyway: an ordinary verdict
    audit = node.wait_events(lambda e: e.verdict == "AUDIT" and e.source == "10.211.0.11")
    a = audit[0]
    assert a.reason == 133 and a.reason_text == "Policy denied" and a.direction == "ingress"
    assert a.destination_identity == node.engine.identity_of("server").id and a.rule == "no rule allows it"
    assert not node.wait_events(lambda e: e.verdict == "AUDIT" and e.source == "10.211.0.10", timeout=0.5)
    assert node.tcp("other", "server", 9003)  # another port the policy does not allow
    node.set_audit("server")
    assert not node.tcp("other", "server", 8080)  # enforcing again

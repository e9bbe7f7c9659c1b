"""Differential: for an L3/L4 corpus, what the kernel does equals what `cilia policy trace` says.

Each policy set goes into the node's engine and the kernel maps; every ordered pair of endpoints
then tries each port for real (TCP connect, UDP echo), and the outcome must equal
``cilia.policy.trace`` for the same labels, protocol and port.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from tests.bpf.bpf_support import BpfNode, bpf_node

from cilia.policy import LabelSet, parse_text
from cilia.policy.model import Protocol
from cilia.policy.trace import Peer, TraceRequest, trace

ENDPOINTS = {"web": "app=web,tier=front", "api": "app=api,tier=back", "db": "app=db,tier=back"}
PROBES = [(Protocol.TCP, 80), (Protocol.TCP, 5432), (Protocol.TCP, 9001), (Protocol.UDP, 53)]

CORPUS = {
    "tiers": """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api-from-front}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEndpoints: [{matchLabels: {tier: front}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: db-from-back}
spec:
  endpointSelector: {matchLabels: {app: db}}
  ingress:
  - fromEndpoints: [{matchLabels: {tier: back}}]
    toPorts: [{ports: [{port: "5432"}]}]
""",
    "egress-ranges-and-deny": """\
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: back-egress}
spec:
  endpointSelector: {matchLabels: {tier: back}}
  egress:
  - toEndpoints: [{}]
    toPorts: [{ports: [{port: "9000", endPort: 9010, protocol: TCP}, {port: "53", protocol: UDP}]}]
  egressDeny:
  - toEndpoints: [{matchLabels: {app: web}}]
    toPorts: [{ports: [{port: "9001", protocol: TCP}]}]
""",
    "expressions-and-any-protocol": """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: not-web}
spec:
  endpointSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}
  ingress:
  - fromEndpoints: [{matchExpressions: [{key: tier, operator: In, values: [front, back]}]}]
    toPorts: [{ports: [{port: "53"}, {port: "80", protocol: ANY}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: db}}]
""",
}


@pytest.fixture
def node() -> Iterator[BpfNode]:
    with bpf_node() as n:
        for i, (name, labels) in enumerate(ENDPOINTS.items()):
            n.add_endpoint(name, f"10.211.0.{20 + i}", labels)
            n.serve_tcp(name, *(port for proto, port in PROBES if proto is Protocol.TCP))
            n.serve_udp_echo(name, 53)
        n.sync()
        yield n


def _kernel(node: BpfNode, src: str, dst: str, proto: Protocol, port: int) -> bool:
    if proto is Protocol.TCP:
        return node.tcp(src, dst, port, timeout=0.3)
    return node.udp(src, dst, port, timeout=0.3)


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_kernel_verdicts_equal_trace(node: BpfNode, case: str) -> None:
    loaded = parse_text(CORPUS[case], f"{case}.yaml")
    assert loaded.ok, loaded.problems
    node.delete_all_policies()
    node.apply(CORPUS[case], f"{case}.yaml")
    mismatches = []
    allowed = denied = 0
    for src in ENDPOINTS:
        for dst in ENDPOINTS:
            if src == dst:
                continue
            for proto, port in PROBES:
                want = trace(loaded.policies, TraceRequest(Peer(LabelSet.parse(ENDPOINTS[src].split(","))),
                                                           Peer(LabelSet.parse(ENDPOINTS[dst].split(","))),
                                                           proto, port)).allowed
                got = _kernel(node, src, dst, proto, port)
                allowed += got
                denied += not got
                if got != want:
                    mismatches.append(f"{src} -> {dst} {port}/{proto.label}: kernel "
                                      f"{'allowed' if got else 'denied'}, trace {'allowed' if want else 'denied'}")
    assert not mismatches, "\n".join(mismatches)
    assert allowed and denied  # every case exercises both outcomes

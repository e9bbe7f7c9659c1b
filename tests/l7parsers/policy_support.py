"""Real policy for parser tests: a CiliumNetworkPolicy resolved by the policy engine into the
map-state entry for one peer on one port, turned into the parser's Check."""

from __future__ import annotations

import ipaddress

from cilia.l7parsers.base import Check
from cilia.l7parsers.policycheck import policy_check
from cilia.policy import Endpoint, LabelSet, PolicyEngine, Protocol, parse_text


def check_from_policy(yaml_text: str, client_labels: str, server_labels: str, port: int,
                      path: str = "policy.yaml") -> Check:
    """The server's ingress policy for the client on TCP ``port``, as a Check. Labels are
    ``k=v,k2=v2``. Raises AssertionError if the YAML is invalid or the port is not allowed."""
    loaded = parse_text(yaml_text, path)
    assert loaded.ok, [str(p) for p in loaded.problems]
    engine = PolicyEngine()
    engine.upsert_endpoint(Endpoint("client", LabelSet.parse(client_labels.split(",")),
                                    (ipaddress.ip_address("10.0.0.1"),)))
    engine.upsert_endpoint(Endpoint("server", LabelSet.parse(server_labels.split(",")),
                                    (ipaddress.ip_address("10.0.0.2"),)))
    engine.apply(loaded.policies)
    ingress = engine.endpoint_policy("server").map_state.ingress
    hit = ingress.lookup(engine.identity_of("client").id, Protocol.TCP, port)
    assert hit is not None, f"the policy does not allow the client on port {port} at all"
    return policy_check(hit[2])

"""toFQDNs in the policy engine: learned addresses get CIDR identities that exactly the matching
selectors select (matchName, matchPattern, ``*``), and go when the names go."""

from __future__ import annotations

import ipaddress

from cilia.policy import Endpoint, LabelSet, PolicyEngine, Protocol
from cilia.policy.identity import IdentityKind
from tests.policy.test_resolution import cnp

TCP, UDP = Protocol.TCP, Protocol.UDP

POLICY = """
endpointSelector: {matchLabels: {app: client}}
egress:
- toFQDNs: [{matchName: api.example.com}]
- toFQDNs: [{matchPattern: "*.cdn.example.com"}]
  toPorts: [{ports: [{port: "443", protocol: TCP}]}]
"""


def engine_with(policy: str = POLICY) -> PolicyEngine:
    engine = PolicyEngine()
    engine.upsert_endpoint(Endpoint("client", LabelSet.parse(["app=client"]), (ipaddress.ip_address("10.0.0.1"),)))
    engine.apply(cnp(policy))
    return engine


def identity_of(engine: PolicyEngine, ip: str) -> int:
    return engine.ipcache.lookup(ip)[1]


def egress_allows(engine: PolicyEngine, ip: str, port: int = 443, proto: Protocol = TCP) -> bool:
    hit = engine.endpoint_policy("client").map_state.egress.lookup(identity_of(engine, ip), proto, port)
    return hit is not None and hit[2].verdict.value != "deny"


def test_learned_name_selects_its_addresses_only() -> None:
    engine = engine_with()
    assert not egress_allows(engine, "192.0.2.10")  # nothing learned yet: world, denied
    change = engine.update_fqdn({"API.example.com.": ["192.0.2.10", "192.0.2.11"]})
    assert change.endpoints == {"client"}
    for ip in ("192.0.2.10", "192.0.2.11"):
        ident = engine.allocator.get(identity_of(engine, ip))
        assert ident is not None and ident.kind is IdentityKind.CIDR and str(ident.prefix) == f"{ip}/32"
        assert egress_allows(engine, ip, 80) and egress_allows(engine, ip, 53, UDP)  # matchName: all ports
    assert not egress_allows(engine, "192.0.2.12")


def test_pattern_and_ports() -> None:
    engine = engine_with()
    engine.update_fqdn({"img.cdn.example.com": ["198.51.100.1"], "cdn.example.com": ["198.51.100.2"],
                        "a.b.cdn.example.com": ["198.51.100.3"]})
    assert egress_allows(engine, "198.51.100.1", 443)
    assert not egress_allows(engine, "198.51.100.1", 80)  # toPorts limits it
    # `*` is one label: neither the bare domain nor two labels deep
    assert not egress_allows(engine, "198.51.100.2") and not egress_allows(engine, "198.51.100.3")
    # names no selector matches get no identity at all
    assert identity_of(engine, "198.51.100.2") == 9


def test_names_going_away_release_their_identities() -> None:
    engine = engine_with()
    engine.update_fqdn({"api.example.com": ["192.0.2.10", "192.0.2.11"]})
    ident = identity_of(engine, "192.0.2.11")
    change = engine.update_fqdn({"api.example.com": ["192.0.2.10"]})
    assert change.endpoints == {"client"}
    assert identity_of(engine, "192.0.2.11") == 9 and engine.allocator.get(ident) is None
    assert egress_allows(engine, "192.0.2.10")
    engine.update_fqdn({"api.example.com": []})
    assert not egress_allows(engine, "192.0.2.10") and engine.fqdn_names() == {}


def test_repeated_answer_changes_nothing() -> None:
    engine = engine_with()
    engine.update_fqdn({"api.example.com": ["192.0.2.10"]})
    assert engine.update_fqdn({"api.example.com": ["192.0.2.10"]}).endpoints == frozenset()


def test_address_shared_by_two_names_stays_while_one_holds_it() -> None:
    engine = engine_with()
    engine.update_fqdn({"api.example.com": ["192.0.2.10"], "x.cdn.example.com": ["192.0.2.10"]})
    assert egress_allows(engine, "192.0.2.10", 80)  # matchName: every port
    engine.update_fqdn({"api.example.com": []})
    assert egress_allows(engine, "192.0.2.10", 443) and not egress_allows(engine, "192.0.2.10", 80)


def test_policy_after_learning_selects_what_was_learned() -> None:
    engine = PolicyEngine()
    engine.upsert_endpoint(Endpoint("client", LabelSet.parse(["app=client"])))
    engine.update_fqdn({"api.example.com": ["192.0.2.10"]})
    assert identity_of(engine, "192.0.2.10") == 9  # no selector wants it: no identity
    change = engine.apply(cnp(POLICY))
    assert "client" in change.endpoints
    assert egress_allows(engine, "192.0.2.10", 80)
    engine.delete([p.key for p in engine.policies()])
    assert identity_of(engine, "192.0.2.10") == 9


def test_star_selects_every_name_and_cidr_policy_shares_the_identity() -> None:
    engine = engine_with("""
endpointSelector: {matchLabels: {app: client}}
egress:
- toFQDNs: [{matchPattern: "*"}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
- toCIDR: [192.0.2.10/32]
  toPorts: [{ports: [{port: "22", protocol: TCP}]}]
""")
    ident = identity_of(engine, "192.0.2.10")
    engine.update_fqdn({"anything.org": ["192.0.2.10"], "other.net": ["203.0.113.5"]})
    assert identity_of(engine, "192.0.2.10") == ident  # one identity per prefix
    assert egress_allows(engine, "192.0.2.10", 80) and egress_allows(engine, "192.0.2.10", 22)
    assert egress_allows(engine, "203.0.113.5", 80) and not egress_allows(engine, "203.0.113.5", 22)
    engine.update_fqdn({"anything.org": []})
    assert identity_of(engine, "192.0.2.10") == ident  # the CIDR rule still holds it
    assert not egress_allows(engine, "192.0.2.10", 80) and egress_allows(engine, "192.0.2.10", 22)


def test_second_endpoint_with_same_selector_sees_learned_addresses() -> None:
    engine = engine_with()
    engine.update_fqdn({"api.example.com": ["192.0.2.10"]})
    engine.upsert_endpoint(Endpoint("client2", LabelSet.parse(["app=client", "x=y"])))
    ms = engine.endpoint_policy("client2").map_state
    assert ms.egress.lookup(identity_of(engine, "192.0.2.10"), TCP, 80) is not None

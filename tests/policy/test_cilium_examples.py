"""Every Cilium example policy loads and validates unchanged, into the model it means.

The examples are kept unchanged in the repository (``examples/cilium``, or
``$CILIA_CILIUM_EXAMPLES``); these tests fail, not skip, when they are missing.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from cilia.policy import Policy, PolicyKind, Protocol, SourceRef, load_paths
from cilia.policy.model import CIDRRule, GenericL7Rule, HTTPRule, ICMPField, KafkaRule, PortProtocol
from cilia.policy.selectors import LabelSelector, Operator, Requirement
from tests.helpers import cilium_examples_dir

# file -> (kind, name, rules per policy); http-sw-app.yaml holds only the demo's workloads.
EXAMPLES: dict[str, tuple[PolicyKind, str, int] | None] = {
    "cass-sw-security-policy.yaml": (PolicyKind.CNP, "secure-empire-cassandra", 1),
    "cidr.yaml": (PolicyKind.CNP, "cidr-rule", 1),
    "clusterscope-policy.yaml": (PolicyKind.CCNP, "clusterwide-policy-example", 1),
    "dns.yaml": (PolicyKind.CNP, "tofqdn-dns-visibility", 1),
    "egress-deny.yaml": (PolicyKind.CNP, "deny-egress-example", 1),
    "entities-world.yaml": (PolicyKind.CNP, "from-world-to-role-public", 1),
    "fqdn.yaml": (PolicyKind.CNP, "to-fqdn", 1),
    "from_world_deny.yaml": (PolicyKind.CCNP, "external-lockdown", 1),
    "http-sw-app.yaml": None,
    "http.yaml": (PolicyKind.CNP, "l7-rule", 1),
    "icmp-numeric.yaml": (PolicyKind.CNP, "icmp-rule", 1),
    "icmp.yaml": (PolicyKind.CNP, "icmp-rule", 1),
    "kafka-apikey.yaml": (PolicyKind.CNP, "rule1", 1),
    "kafka-role.yaml": (PolicyKind.CNP, "rule1", 1),
    "kafka-sw-security-policy.yaml": (PolicyKind.CNP, "secure-empire-kafka", 3),
    "l3_l4_combined.yaml": (PolicyKind.CNP, "l4-rule", 1),
    "l4_port_range.yaml": (PolicyKind.CNP, "l4-port-range-rule", 1),
    "l7_multi.yaml": (PolicyKind.CNP, "fancyrule", 2),
    "memcd-sw-security-policy.yaml": (PolicyKind.CNP, "secure-fleet", 1),
    "service.yaml": (PolicyKind.CNP, "service-rule", 1),
    "sw_deny_policy.yaml": (PolicyKind.CNP, "empire-default-deny", 1),
    "sw_l3_l4_l7_policy.yaml": (PolicyKind.CNP, "rule1", 1),
    "sw_l3_l4_policy.yaml": (PolicyKind.CNP, "rule1", 1),
}


def path_of(name: str) -> Path:
    return cilium_examples_dir() / name


def load(name: str) -> Policy:
    result = load_paths([path_of(name)])
    assert result.ok, [str(p) for p in result.problems]
    (policy,) = result.policies
    return policy


def eq(key: str, value: str, source: str = "any") -> Requirement:
    return Requirement(source, key, Operator.IN, (value,))


def test_the_examples_directory_is_there_and_every_file_is_covered() -> None:
    directory = cilium_examples_dir()
    assert directory.is_dir(), f"Cilium examples not found at {directory} (set CILIA_CILIUM_EXAMPLES)"
    assert sorted(p.name for p in directory.glob("*.yaml")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_each_example_validates_unchanged(name: str) -> None:
    result = load_paths([path_of(name)])
    assert [str(p) for p in result.problems] == []
    expected = EXAMPLES[name]
    if expected is None:
        assert result.policies == []
        assert [kind for _, kind in result.skipped] == ["Service", "Deployment", "Pod", "Pod"]
        return
    kind, policy_name, rules = expected
    (policy,) = result.policies
    assert (policy.kind, policy.name, len(policy.rules)) == (kind, policy_name, rules)
    assert policy.namespace == ("default" if kind is PolicyKind.CNP else None)
    assert result.skipped == []


def test_all_examples_load_together() -> None:
    result = load_paths(sorted(cilium_examples_dir().glob("*.yaml")))
    assert result.ok
    assert len(result.policies) == sum(1 for e in EXAMPLES.values() if e is not None)


def test_star_wars_l7_policy() -> None:
    policy = load("sw_l3_l4_l7_policy.yaml")
    (rule,) = policy.rules
    assert rule.description == "L7 policy to restrict access to specific HTTP call"
    assert rule.endpoint_selector == LabelSelector(tuple(sorted((eq("org", "empire"), eq("class", "deathstar")))))
    (ingress,) = rule.ingress
    assert ingress.endpoints == (LabelSelector((eq("org", "empire"),)),)
    assert ingress.to_ports is not None
    (port_rule,) = ingress.to_ports
    file = str(path_of("sw_l3_l4_l7_policy.yaml"))
    assert port_rule.ports == (PortProtocol(80, None, None, Protocol.TCP, SourceRef(file, 17)),)
    assert port_rule.rules is not None and port_rule.rules.protocol == "http"
    assert port_rule.rules.rules == (HTTPRule("POST", "/v1/request-landing", None, (), (), SourceRef(file, 21)),)
    assert rule.egress == rule.ingress_deny == rule.egress_deny == ()


def test_star_wars_deny_policy_is_one_empty_ingress_item() -> None:
    (rule,) = load("sw_deny_policy.yaml").rules
    (item,) = rule.ingress
    assert not item.has_l3() and not item.has_l4()


def test_kafka_security_policy_has_three_specs() -> None:
    policy = load("kafka-sw-security-policy.yaml")
    assert [r.path for r in policy.rules] == ["specs[0]", "specs[1]", "specs[2]"]
    assert all(r.endpoint_selector == LabelSelector((eq("app", "kafka"),)) for r in policy.rules)
    hq, broker = policy.rules[0].ingress
    assert hq.to_ports is not None and hq.to_ports[0].rules is not None
    rules = hq.to_ports[0].rules.rules
    assert all(isinstance(r, KafkaRule) and r.role == "produce" and r.api_keys == {0, 3, 18} for r in rules)
    assert [r.topic for r in rules if isinstance(r, KafkaRule)] == ["deathstar-plans", "empire-announce"]
    assert broker.endpoints == (LabelSelector((eq("app", "kafka"),)),) and broker.to_ports is None
    assert broker.path == "specs[0].ingress[1]"


def test_kafka_api_key_example() -> None:
    (rule,) = load("kafka-apikey.yaml").rules
    assert rule.ingress[0].to_ports is not None
    l7 = rule.ingress[0].to_ports[0].rules
    assert l7 is not None
    assert [(r.api_key, r.topic) for r in l7.rules if isinstance(r, KafkaRule)] == [
        ("apiversions", None), ("metadata", None), ("produce", "deathstar-plans"), ("produce", "empire-announce")]


def test_cidr_example_with_except() -> None:
    (rule,) = load("cidr.yaml").rules
    file = str(path_of("cidr.yaml"))
    to_cidr, to_cidr_set = rule.egress
    assert to_cidr.cidrs == (CIDRRule(ipaddress.ip_network("20.1.1.1/32"), (), SourceRef(file, 11)),)
    assert to_cidr_set.cidrs == (
        CIDRRule(ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.96.0.0/12"),), SourceRef(file, 13)),)


@pytest.mark.parametrize("name", ["icmp.yaml", "icmp-numeric.yaml"])
def test_icmp_examples_name_echo_request_for_both_families(name: str) -> None:
    (rule,) = load(name).rules
    file = str(path_of(name))
    assert rule.egress[0].icmps == (
        ICMPField("IPv4", 8, SourceRef(file, 12)), ICMPField("IPv6", 128, SourceRef(file, 14)))


def test_port_range_example() -> None:
    (rule,) = load("l4_port_range.yaml").rules
    assert rule.egress[0].to_ports is not None
    (port,) = rule.egress[0].to_ports[0].ports
    assert (port.port, port.end_port, port.protocol, str(port)) == (80, 444, Protocol.TCP, "80-444/TCP")


def test_from_world_deny_is_a_clusterwide_deny() -> None:
    policy = load("from_world_deny.yaml")
    assert (policy.kind, policy.namespace) == (PolicyKind.CCNP, None)
    (rule,) = policy.rules
    assert rule.endpoint_selector == LabelSelector()
    (deny,) = rule.ingress_deny
    assert (deny.deny, deny.entities) == (True, ("world",))
    (allow,) = rule.ingress
    assert (allow.deny, allow.entities) == (False, ("all",))


def test_dns_example_with_fqdns() -> None:
    (rule,) = load("dns.yaml").rules
    assert rule.endpoint_selector == LabelSelector((eq("org", "alliance"),))
    dns, fqdn = rule.egress
    assert dns.endpoints == (LabelSelector(tuple(sorted((
        eq("io.kubernetes.pod.namespace", "kube-system", "k8s"), eq("k8s-app", "kube-dns", "k8s"))))),)
    assert dns.to_ports is not None and dns.to_ports[0].ports[0].protocol is Protocol.ANY
    assert fqdn.fqdns is not None
    assert [f.match_name or f.match_pattern for f in fqdn.fqdns] == [
        "cilium.io", "sub.cilium.io", "service1.api.cilium.io", "special*service.api.cilium.io"]


def l7_protocols(policy: Policy) -> list[tuple[str, int]]:
    """(protocol, number of rules) of each L7 port rule of a policy."""
    out = []
    for rule in policy.rules:
        for item in rule.ingress:
            for port_rule in item.to_ports or ():
                if port_rule.rules is not None:
                    out.append((port_rule.rules.protocol, len(port_rule.rules.rules)))
    return out


def test_l7proto_examples() -> None:
    assert l7_protocols(load("cass-sw-security-policy.yaml")) == [("cassandra", 3), ("cassandra", 1)]
    (cass,) = load("cass-sw-security-policy.yaml").rules
    hq_ports = cass.ingress[1].to_ports
    assert hq_ports is not None and hq_ports[0].rules is not None
    assert [r.as_dict() for r in hq_ports[0].rules.rules if isinstance(r, GenericL7Rule)] == [{}]  # `l7: [{}]`
    assert l7_protocols(load("memcd-sw-security-policy.yaml")) == [("memcache", 2)] * 3

"""Cilium's resolution semantics, seen the way a user sees them:
policies as YAML, endpoints as label sets, verdicts from ``trace``."""

from __future__ import annotations

import textwrap

import pytest

from cilia.policy import (
    DNSRequest,
    Endpoint,
    GenericL7Request,
    HTTPRequest,
    KafkaRequest,
    L7ConflictError,
    L7Request,
    LabelSet,
    Policy,
    PolicyEngine,
    Protocol,
    TraceRequest,
    parse_text,
    trace,
)
from tests.helpers import cilium_examples_dir, peer, run

TCP, UDP, SCTP, ICMP, ICMPV6 = Protocol.TCP, Protocol.UDP, Protocol.SCTP, Protocol.ICMP, Protocol.ICMPV6
NS = "k8s:io.kubernetes.pod.namespace"


def example(name: str) -> list[Policy]:
    result = parse_text((cilium_examples_dir() / name).read_text(encoding="utf-8"), name)
    assert result.ok, [str(p) for p in result.problems]
    return result.policies


def cnp(spec: str, name: str = "p", namespace: str | None = None,
        kind: str = "CiliumNetworkPolicy", filename: str = "test.yaml") -> list[Policy]:
    """One policy document around ``spec`` (YAML of the rule)."""
    meta = f"{{name: {name}, namespace: {namespace}}}" if namespace else f"{{name: {name}}}"
    text = (f"apiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {meta}\nspec:\n"
            + textwrap.indent(textwrap.dedent(spec).strip() + "\n", "  "))
    result = parse_text(text, filename)
    assert result.ok, [str(p) for p in result.problems]
    return result.policies


def ccnp(spec: str, name: str = "p", filename: str = "test.yaml") -> list[Policy]:
    return cnp(spec, name, kind="CiliumClusterwideNetworkPolicy", filename=filename)




def allowed(policies: list[Policy], src: str, dst: str, protocol: Protocol = TCP, dport: int | None = 80,
            l7: L7Request | None = None) -> bool:
    return run(policies, src, dst, protocol, dport, l7).allowed


def get(path: str) -> HTTPRequest:
    return HTTPRequest("GET", path)


def in_ns(ns: str, labels: str) -> str:
    return f"{labels},{NS}={ns}"


# --- default deny per direction --------------------------------------------------

INGRESS_ONLY = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEndpoints: [{matchLabels: {app: web}}]
"""


def test_an_ingress_rule_puts_only_ingress_into_default_deny() -> None:
    policies = cnp(INGRESS_ONLY)
    assert allowed(policies, "app=web", "app=db")
    assert not allowed(policies, "app=other", "app=db")
    assert not allowed(policies, "8.8.8.8", "app=db")
    # the db's egress is not enforced: it may reach anything
    result = run(policies, "app=db", "app=other", dport=9999)
    assert result.allowed
    assert not result.egress.enforced
    assert run(policies, "app=other", "app=db").ingress.enforced


def test_an_egress_rule_puts_only_egress_into_default_deny() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toEntities: [world]
    """)
    assert allowed(policies, "app=web", "8.8.8.8")
    assert not allowed(policies, "app=web", "app=db")
    assert not allowed(policies, "app=web", "reserved:host")
    # the web's ingress is not enforced
    assert allowed(policies, "app=db", "app=web")
    assert allowed(policies, "8.8.8.8", "app=web")


def test_an_egress_allow_to_endpoints_allows_them() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toEndpoints: [{matchLabels: {app: db}}]
    """)
    assert allowed(policies, "app=web", "app=db")
    assert not allowed(policies, "app=web", "app=other")


def test_endpoints_no_rule_selects_are_default_allow() -> None:
    policies = cnp(INGRESS_ONLY)
    result = run(policies, "app=a", "app=b", dport=1234)
    assert result.allowed
    assert not result.ingress.enforced and not result.egress.enforced


def test_ingress_empty_item_denies_everything() -> None:
    policies = example("sw_deny_policy.yaml")
    for src in ("org=empire,class=tiefighter", "org=alliance", "8.8.8.8", "reserved:host"):
        result = run(policies, src, "org=empire,class=deathstar")
        assert not result.allowed, src
        assert result.ingress.enforced
        assert result.ingress.reason.startswith("no rule allows this flow")
    # egress of the empire stays open; the alliance is not selected at all
    assert allowed(policies, "org=empire,class=tiefighter", "org=alliance")
    assert allowed(policies, "org=empire", "org=alliance", UDP, 53)
    assert allowed(policies, "org=empire", "org=alliance", ICMP, 8)


def test_a_deny_section_alone_also_enables_default_deny() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: db}}
        ingressDeny:
        - fromEntities: [world]
    """)
    assert not allowed(policies, "8.8.8.8", "app=db")
    assert not allowed(policies, "app=web", "app=db")


def test_enable_default_deny_false_keeps_the_direction_open() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: db}}
        enableDefaultDeny: {ingress: false}
        ingress:
        - fromEndpoints: [{matchLabels: {app: web}}]
    """)
    assert allowed(policies, "app=web", "app=db")
    assert allowed(policies, "app=other", "app=db")
    assert not run(policies, "app=other", "app=db").ingress.enforced


# --- deny beats allow ----------------------------------------------------------------


def test_egress_deny_beats_allow_all() -> None:
    policies = example("egress-deny.yaml")
    result = run(policies, "role=frontend", "role=backend")
    assert not result.allowed
    assert [(d["file"], d["line"]) for d in result.egress.deciding] == [("egress-deny.yaml", 13)]
    assert allowed(policies, "role=frontend", "role=other")
    assert allowed(policies, "role=frontend", "8.8.8.8")
    assert allowed(policies, "role=frontend", "reserved:host", UDP, 53)


def test_world_denied_cluster_allowed() -> None:
    policies = example("from_world_deny.yaml")
    for src in ("8.8.8.8", "2001:db8::1"):
        result = run(policies, src, "app=anything")
        assert not result.allowed, src
        assert result.ingress.deciding[0]["path"] == "ingressDeny[0]"
        assert result.ingress.deciding[0]["line"] == 8
    for src in ("app=client", "reserved:host", "reserved:remote-node", in_ns("other", "app=x")):
        assert allowed(policies, src, "app=anything"), src


def test_deny_beats_a_more_specific_allow() -> None:
    deny_all_ports = cnp("""
        endpointSelector: {matchLabels: {app: svc}}
        ingressDeny:
        - fromEndpoints: [{matchLabels: {app: bad}}]
    """, name="deny")
    allow_l7 = cnp("""
        endpointSelector: {matchLabels: {app: svc}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: bad}}]
          toPorts:
          - ports: [{port: "80", protocol: TCP}]
            rules: {http: [{method: GET, path: /}]}
    """, name="allow")
    policies = deny_all_ports + allow_l7
    assert not allowed(policies, "app=bad", "app=svc", l7=get("/"))
    assert not allowed(policies, "app=bad", "app=svc", dport=None)


def test_a_port_deny_for_every_peer_beats_an_l3_allow() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: svc}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: a}}]
        ingressDeny:
        - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    """)
    assert not allowed(policies, "app=a", "app=svc", TCP, 80)
    assert allowed(policies, "app=a", "app=svc", TCP, 81)
    assert allowed(policies, "app=a", "app=svc", UDP, 80)


def test_deny_in_a_clusterwide_policy_beats_allow_in_a_namespaced_one() -> None:
    policies = ccnp("""
        endpointSelector: {}
        ingressDeny:
        - fromEndpoints: [{matchLabels: {app: bad}}]
    """, name="deny") + cnp("""
        endpointSelector: {matchLabels: {app: svc}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: bad}}]
        - fromEndpoints: [{matchLabels: {app: good}}]
    """, name="allow")
    assert not allowed(policies, "app=bad", "app=svc")
    assert allowed(policies, "app=good", "app=svc")


# --- fromRequires ----------------------------------------------------------------------

REQUIRES = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromRequires: [{matchLabels: {env: prod}}]
"""
ALLOW_WEB = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEndpoints: [{matchLabels: {app: web}}]
"""


def test_from_requires_alone_grants_nothing() -> None:
    policies = cnp(REQUIRES)
    assert not allowed(policies, "app=web,env=prod", "app=db")
    assert not allowed(policies, "app=db,env=prod", "app=db")


def test_from_requires_is_anded_onto_other_policies_peers() -> None:
    policies = cnp(REQUIRES, name="requires") + cnp(ALLOW_WEB, name="allow")
    assert allowed(policies, "app=web,env=prod", "app=db")
    assert not allowed(policies, "app=web,env=dev", "app=db")
    assert not allowed(policies, "app=web", "app=db")
    # without the requirement, dev may come in
    assert allowed(cnp(ALLOW_WEB), "app=web,env=dev", "app=db")


def test_from_requires_in_the_same_rule() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: db}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: web}}]
          fromRequires: [{matchLabels: {env: prod}}]
        - fromEndpoints: [{matchLabels: {app: batch}}]
    """)
    assert allowed(policies, "app=web,env=prod", "app=db")
    assert not allowed(policies, "app=web,env=dev", "app=db")
    # the requirement applies to every allow of the endpoint, not just its own item
    assert not allowed(policies, "app=batch,env=dev", "app=db")
    assert allowed(policies, "app=batch,env=prod", "app=db")


def test_from_requires_restricts_port_only_and_entity_allows() -> None:
    ports_only = cnp("""
        endpointSelector: {matchLabels: {app: db}}
        ingress:
        - toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
    """, name="ports")
    everyone = cnp("""
        endpointSelector: {matchLabels: {app: db}}
        ingress:
        - fromEntities: [all]
    """, name="all")
    requires = cnp(REQUIRES, name="requires")
    for policies in (requires + ports_only, requires + everyone):
        assert allowed(policies, "app=x,env=prod", "app=db", TCP, 5432)
        assert not allowed(policies, "app=x,env=dev", "app=db", TCP, 5432)
        assert not allowed(policies, "8.8.8.8", "app=db", TCP, 5432)


def test_from_requires_does_not_narrow_a_deny() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: db}}
        ingress:
        - fromRequires: [{matchLabels: {env: prod}}]
        - fromEntities: [cluster]
        ingressDeny:
        - fromEndpoints: [{matchLabels: {app: bad}}]
    """)
    result = run(policies, "app=bad,env=dev", "app=db")
    assert not result.allowed
    assert [d["path"] for d in result.ingress.deciding] == ["ingressDeny[0]"]
    assert not allowed(policies, "app=bad,env=prod", "app=db")
    assert allowed(policies, "app=good,env=prod", "app=db")


def test_from_requires_of_another_endpoint_does_not_apply() -> None:
    policies = cnp(ALLOW_WEB, name="allow") + cnp("""
        endpointSelector: {matchLabels: {app: other}}
        ingress:
        - fromRequires: [{matchLabels: {env: prod}}]
    """, name="requires")
    assert allowed(policies, "app=web,env=dev", "app=db")


def test_to_requires_is_anded_onto_egress_peers() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toRequires: [{matchLabels: {env: prod}}]
        - toEntities: [cluster]
    """)
    assert allowed(policies, "app=web", "app=db,env=prod")
    assert not allowed(policies, "app=web", "app=db,env=dev")
    assert not allowed(policies, "app=web", "8.8.8.8")


# --- entities --------------------------------------------------------------------------

SOURCES = {
    "endpoint": "app=client",
    "other-namespace endpoint": in_ns("kube-system", "app=client"),
    "host": "reserved:host",
    "remote-node": "reserved:remote-node",
    "kube-apiserver": "reserved:kube-apiserver",
    "health": "reserved:health",
    "world-ipv4": "8.8.8.8",
    "world-ipv6": "2001:db8::1",
}
CLUSTER = {"endpoint", "other-namespace endpoint", "host", "remote-node", "kube-apiserver", "health"}


@pytest.mark.parametrize(("entity", "expected"), [
    ("all", set(SOURCES)),
    ("world", {"world-ipv4", "world-ipv6"}),
    ("world-ipv4", {"world-ipv4"}),
    ("world-ipv6", {"world-ipv6"}),
    ("cluster", CLUSTER),
    ("host", {"host"}),
    ("remote-node", {"remote-node"}),
    ("kube-apiserver", {"kube-apiserver"}),
    ("none", set()),
])
def test_from_entities(entity: str, expected: set[str]) -> None:
    policies = cnp(f"""
        endpointSelector: {{matchLabels: {{app: db}}}}
        ingress:
        - fromEntities: [{entity}]
    """)
    got = {name for name, src in SOURCES.items() if allowed(policies, src, "app=db")}
    assert got == expected


def test_to_entities_world_covers_outside_addresses_and_cidr_identities() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toEntities: [world]
    """, name="world") + cnp("""
        endpointSelector: {matchLabels: {app: other}}
        egress:
        - toCIDR: [10.0.0.0/8]
    """, name="cidr")
    # 10.1.1.1 resolves to the CIDR identity of 10.0.0.0/8, which is still world
    for dst in ("8.8.8.8", "10.1.1.1", "2001:db8::1"):
        assert allowed(policies, "app=web", dst), dst
    assert not allowed(policies, "app=web", "app=other")


def test_to_entities_cluster_reaches_endpoints_and_host_but_not_world() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toEntities: [cluster]
    """)
    assert allowed(policies, "app=web", "app=db")
    assert allowed(policies, "app=web", "reserved:host")
    assert not allowed(policies, "app=web", "8.8.8.8")


def test_from_endpoints_never_selects_outside_addresses() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: db}}
        ingress:
        - fromEndpoints: [{}]
    """)
    assert allowed(policies, "app=anything", "app=db")
    assert not allowed(policies, "8.8.8.8", "app=db")


# --- CIDR ------------------------------------------------------------------------------


@pytest.mark.parametrize(("dst", "expected"), [
    ("20.1.1.1", True),
    ("20.1.1.2", False),
    ("10.1.1.1", True),
    ("10.95.255.255", True),
    ("10.96.0.1", False),
    ("10.111.255.255", False),
    ("10.112.0.0", True),
    ("8.8.8.8", False),
    ("2001:db8::1", False),
])
def test_cidr_example(dst: str, expected: bool) -> None:
    assert allowed(example("cidr.yaml"), "app=myService", dst) is expected


def test_cidr_rules_do_not_select_cluster_endpoints() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toCIDR: [0.0.0.0/0]
    """)
    assert allowed(policies, "app=web", "8.8.8.8")
    assert not allowed(policies, "app=web", "app=db")
    assert not allowed(policies, "app=web", "2001:db8::1")


def test_an_address_in_one_rules_cidr_and_another_rules_except() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toCIDRSet:
          - cidr: 10.0.0.0/8
            except: [10.96.0.0/12]
    """, name="wide") + cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toCIDR: [10.96.0.0/16]
    """, name="narrow")
    assert allowed(policies, "app=web", "10.1.1.1")
    assert allowed(policies, "app=web", "10.96.0.1")  # the narrow rule's cidr
    assert not allowed(policies, "app=web", "10.97.0.1")  # only in the except
    assert not allowed(policies, "app=web", "11.0.0.1")


def test_an_except_inside_an_except() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        ingress:
        - fromCIDRSet:
          - cidr: 10.0.0.0/8
            except: [10.96.0.0/12]
          - cidr: 10.96.0.0/12
            except: [10.96.1.0/24]
    """)
    assert allowed(policies, "10.1.1.1", "app=web")
    assert allowed(policies, "10.96.2.1", "app=web")
    assert not allowed(policies, "10.96.1.5", "app=web")


def test_deny_cidr_with_except() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toEntities: [world]
        egressDeny:
        - toCIDRSet:
          - cidr: 10.0.0.0/8
            except: [10.1.0.0/16]
    """)
    assert not allowed(policies, "app=web", "10.2.0.1")
    assert allowed(policies, "app=web", "10.1.2.3")
    assert allowed(policies, "app=web", "8.8.8.8")


def test_ipv6_cidr() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        ingress:
        - fromCIDR: [2001:db8::/32]
    """)
    assert allowed(policies, "2001:db8::1", "app=web")
    assert not allowed(policies, "2001:db9::1", "app=web")
    assert not allowed(policies, "8.8.8.8", "app=web")


# --- ports, protocols, ICMP --------------------------------------------------------------


@pytest.mark.parametrize(("protocol", "port", "expected"), [
    (TCP, 79, False), (TCP, 80, True), (TCP, 300, True), (TCP, 444, True), (TCP, 445, False),
    (UDP, 80, False),
])
def test_port_range(protocol: Protocol, port: int, expected: bool) -> None:
    assert allowed(example("l4_port_range.yaml"), "app=myService", "8.8.8.8", protocol, port) is expected


def test_protocol_any_means_tcp_udp_and_sctp() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        ingress:
        - toPorts: [{ports: [{port: "53", protocol: ANY}]}]
        - toPorts: [{ports: [{port: "54"}]}]
    """)
    for port in (53, 54):
        for protocol in (TCP, UDP, SCTP):
            assert allowed(policies, "app=a", "app=web", protocol, port), (protocol, port)
        assert not allowed(policies, "app=a", "app=web", TCP, port + 2)
    assert not allowed(policies, "app=a", "app=web", ICMP, 8)
    assert not allowed(policies, "app=a", "app=web", ICMPV6, 128)


def test_protocol_any_with_l7_rules() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        ingress:
        - toPorts: [{ports: [{port: "80", protocol: ANY}], rules: {http: [{}]}}]
        - toPorts: [{ports: [{port: "53", protocol: ANY}], rules: {dns: [{matchPattern: "*"}]}}]
    """)
    assert allowed(policies, "app=a", "app=web", TCP, 80)
    assert not allowed(policies, "app=a", "app=web", UDP, 80)
    assert not allowed(policies, "app=a", "app=web", SCTP, 80)
    assert allowed(policies, "app=a", "app=web", TCP, 53)
    assert allowed(policies, "app=a", "app=web", UDP, 53)
    assert not allowed(policies, "app=a", "app=web", SCTP, 53)


def test_peers_without_ports_allow_every_protocol_including_icmp() -> None:
    policies = cnp(INGRESS_ONLY)
    for protocol, port in ((TCP, 1), (UDP, 65535), (SCTP, 9), (ICMP, 8), (ICMPV6, 128)):
        assert allowed(policies, "app=web", "app=db", protocol, port), protocol


@pytest.mark.parametrize("name", ["icmp.yaml", "icmp-numeric.yaml"])
def test_icmp_types(name: str) -> None:
    policies = example(name)
    src = "app=myService"
    assert allowed(policies, src, "8.8.8.8", ICMP, 8)
    assert not allowed(policies, src, "8.8.8.8", ICMP, 0)
    assert not allowed(policies, src, "8.8.8.8", ICMP, 128)  # the IPv6 type is not an IPv4 one
    assert allowed(policies, src, "2001:db8::1", ICMPV6, 128)
    assert not allowed(policies, src, "2001:db8::1", ICMPV6, 129)
    assert not allowed(policies, src, "2001:db8::1", ICMPV6, 8)
    assert not allowed(policies, src, "8.8.8.8", TCP, 8)


# --- Kafka -----------------------------------------------------------------------------

PRODUCE = {0, 3, 18}
CONSUME = {1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}


def kafka_keys(policies: list[Policy], src: str, *topics: str) -> set[int]:
    """The Kafka API keys (0-33) ``src`` may send to the broker for ``topics``."""
    return {key for key in range(34)
            if allowed(policies, src, "app=kafka", TCP, 9092, KafkaRequest(key, 1, "client", topics))}


def test_kafka_role_produce() -> None:
    policies = example("kafka-role.yaml")
    assert kafka_keys(policies, "app=empire-hq", "deathstar-plans") == PRODUCE
    assert kafka_keys(policies, "app=empire-hq", "empire-announce") == PRODUCE
    assert kafka_keys(policies, "app=empire-hq", "secret") == set()
    # every topic of a request must be allowed
    assert kafka_keys(policies, "app=empire-hq", "deathstar-plans", "secret") == set()
    assert kafka_keys(policies, "app=empire-outpost", "deathstar-plans") == set()


def test_kafka_sw_security_policy() -> None:
    policies = example("kafka-sw-security-policy.yaml")
    assert kafka_keys(policies, "app=empire-hq", "deathstar-plans") == PRODUCE
    assert kafka_keys(policies, "app=empire-outpost", "empire-announce") == CONSUME
    assert kafka_keys(policies, "app=empire-outpost", "deathstar-plans") == set()
    assert kafka_keys(policies, "app=empire-backup", "deathstar-plans") == CONSUME
    assert kafka_keys(policies, "app=empire-backup", "empire-announce") == set()
    # the broker-to-broker rule is L3-only: all of Kafka is allowed for that peer
    assert kafka_keys(policies, "app=kafka", "anything") == set(range(34))
    assert allowed(policies, "app=kafka", "app=kafka", TCP, 9093)
    assert not allowed(policies, "app=empire-hq", "app=kafka", TCP, 9093)


# --- L7 merge rules --------------------------------------------------------------------

L7_BASE = """
endpointSelector: {matchLabels: {app: svc}}
ingress:
- fromEndpoints: [{matchLabels: {app: a}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET, path: /a}]}}]
- fromEndpoints: [{matchLabels: {app: b}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET, path: /b}]}}]
"""


def http_matrix(policies: list[Policy]) -> dict[str, set[str]]:
    """Which paths each client may GET on svc:80."""
    return {client: {path for path in ("/a", "/b", "/x")
                     if allowed(policies, f"app={client}", "app=svc", TCP, 80, get(path))}
            for client in ("a", "b", "c")}


def test_l7_rules_restrict_each_selector() -> None:
    assert http_matrix(cnp(L7_BASE)) == {"a": {"/a"}, "b": {"/b"}, "c": set()}


@pytest.mark.parametrize("extra", [
    pytest.param("- fromEndpoints: [{matchLabels: {app: a}}]", id="L3-only"),
    pytest.param("- fromEndpoints: [{matchLabels: {app: a}}]\n"
                 "  toPorts: [{ports: [{port: '80', protocol: TCP}]}]", id="L3/L4"),
    pytest.param("- fromEndpoints: [{matchLabels: {app: a}}]\n"
                 "  toPorts: [{ports: [{port: '1', endPort: 1000, protocol: ANY}]}]", id="port-range"),
])
def test_a_plain_rule_for_a_selector_allows_all_l7_for_that_selector_only(extra: str) -> None:
    plain = cnp("endpointSelector: {matchLabels: {app: svc}}\ningress:\n" + extra, name="plain")
    assert http_matrix(cnp(L7_BASE, name="l7") + plain) == {
        "a": {"/a", "/b", "/x"}, "b": {"/b"}, "c": set(),
    }
    # the same inside one policy
    assert http_matrix(cnp(L7_BASE + extra)) == {"a": {"/a", "/b", "/x"}, "b": {"/b"}, "c": set()}


def test_a_plain_rule_on_another_port_leaves_l7_alone() -> None:
    other_port = cnp("""
        endpointSelector: {matchLabels: {app: svc}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: a}}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
    """, name="other")
    policies = cnp(L7_BASE, name="l7") + other_port
    assert http_matrix(policies) == {"a": {"/a"}, "b": {"/b"}, "c": set()}
    assert allowed(policies, "app=a", "app=svc", TCP, 8080)


def test_a_port_rule_for_every_peer_opens_l7_for_everyone() -> None:
    wildcard = cnp("""
        endpointSelector: {matchLabels: {app: svc}}
        ingress:
        - toPorts: [{ports: [{port: "80", protocol: TCP}]}]
    """, name="wild")
    assert http_matrix(cnp(L7_BASE, name="l7") + wildcard) == {
        "a": {"/a", "/b", "/x"}, "b": {"/a", "/b", "/x"}, "c": {"/a", "/b", "/x"},
    }


def test_same_type_l7_rules_are_ored_across_policies() -> None:
    more = cnp("""
        endpointSelector: {matchLabels: {app: svc}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: a}}]
          toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET, path: /x}]}}]
    """, name="more", filename="more.yaml")
    policies = cnp(L7_BASE, name="l7") + more
    assert http_matrix(policies) == {"a": {"/a", "/x"}, "b": {"/b"}, "c": set()}
    result = run(policies, "app=a", "app=svc", TCP, 80, get("/x"))
    l7_rules = [d for d in result.ingress.deciding if "l7" in d]
    assert [(d["file"], d["line"]) for d in l7_rules] == [("more.yaml", 8)]


def test_an_empty_l7_rule_allows_every_request() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: svc}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: a}}]
          toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{}]}}]
    """)
    assert allowed(policies, "app=a", "app=svc", TCP, 80, HTTPRequest("DELETE", "/anything"))
    assert not allowed(policies, "app=b", "app=svc", TCP, 80, get("/"))


KAFKA_ON_80 = """
endpointSelector: {matchLabels: {app: svc}}
ingress:
- fromEndpoints: [{matchLabels: {app: c}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {kafka: [{role: produce}]}}]
"""


def test_two_l7_types_on_one_port_are_rejected_and_change_nothing() -> None:
    engine = PolicyEngine()
    engine.apply(cnp(L7_BASE, name="l7", filename="l7.yaml"))
    for name, labels in (("svc", "app=svc"), ("a", "app=a"), ("c", "app=c")):
        engine.upsert_endpoint(Endpoint(name, LabelSet.parse(labels)))
    before = {ep.name: engine.endpoint_policy(ep.name).map_state for ep in engine.endpoints()}
    revision = engine.revision
    with pytest.raises(L7ConflictError) as info:
        engine.apply(cnp(KAFKA_ON_80, name="kafka", filename="kafka.yaml"))
    assert "l7.yaml:" in str(info.value) and "kafka.yaml:" in str(info.value)
    assert {s.file for s in info.value.sources} == {"l7.yaml", "kafka.yaml"}
    assert [p.name for p in engine.policies()] == ["l7"]
    assert engine.revision == revision
    assert {ep.name: engine.endpoint_policy(ep.name).map_state for ep in engine.endpoints()} == before
    # and a trace of the same policies says why it cannot answer
    with pytest.raises(L7ConflictError):
        run(cnp(L7_BASE, name="l7") + cnp(KAFKA_ON_80, name="kafka"), "app=a", "app=svc")


def test_two_l7_types_on_different_ports_or_endpoints_are_fine() -> None:
    other_port = KAFKA_ON_80.replace('"80"', '"9092"')
    other_endpoint = KAFKA_ON_80.replace("app: svc}", "app: broker}")
    for extra in (other_port, other_endpoint):
        policies = cnp(L7_BASE, name="l7") + cnp(extra, name="kafka")
        assert allowed(policies, "app=a", "app=svc", TCP, 80, get("/a"))


# --- namespaces ------------------------------------------------------------------------

PROD = """
endpointSelector: {matchLabels: {app: web}}
ingress:
- fromEndpoints: [{matchLabels: {app: client}}]
- fromEndpoints: [{matchLabels: {app: client, "k8s:io.kubernetes.pod.namespace": dev}}]
  toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


def test_a_namespaced_policy_selects_only_endpoints_of_its_namespace() -> None:
    policies = cnp(PROD, namespace="prod")
    assert run(policies, "app=x", in_ns("prod", "app=web")).ingress.enforced
    dev = run(policies, "app=x", in_ns("dev", "app=web"))
    assert dev.allowed and not dev.ingress.enforced
    assert run(policies, "app=x", "app=web").allowed  # default namespace


def test_a_namespaced_policy_peers_are_in_its_namespace_unless_named() -> None:
    policies = cnp(PROD, namespace="prod")
    web = in_ns("prod", "app=web")
    assert allowed(policies, in_ns("prod", "app=client"), web)
    assert not allowed(policies, in_ns("dev", "app=client"), web)
    assert not allowed(policies, "app=client", web)
    # the second item names the dev namespace
    assert allowed(policies, in_ns("dev", "app=client"), web, TCP, 8080)
    assert not allowed(policies, "app=client", web, TCP, 8080)


def test_a_policy_without_namespace_lives_in_default() -> None:
    policies = cnp(ALLOW_WEB)
    assert allowed(policies, "app=web", "app=db")
    assert allowed(policies, in_ns("default", "app=web"), "app=db")
    assert not allowed(policies, in_ns("prod", "app=web"), "app=db")
    assert not run(policies, "app=x", in_ns("prod", "app=db")).ingress.enforced


def test_a_namespace_expression_replaces_the_implicit_namespace() -> None:
    policies = cnp("""
        endpointSelector: {}
        ingress:
        - fromEndpoints:
          - matchExpressions: [{key: "k8s:io.kubernetes.pod.namespace", operator: In, values: [dev, qa]}]
    """, namespace="prod")
    assert allowed(policies, in_ns("dev", "app=x"), in_ns("prod", "app=y"))
    assert allowed(policies, in_ns("qa", "app=x"), in_ns("prod", "app=y"))
    assert not allowed(policies, in_ns("prod", "app=x"), in_ns("prod", "app=y"))


def test_a_namespaced_policy_cannot_select_endpoints_of_another_namespace() -> None:
    policies = cnp("""
        endpointSelector:
          matchLabels: {app: web, "k8s:io.kubernetes.pod.namespace": dev}
        ingress: [{}]
    """, namespace="prod")
    # Naming another namespace in endpointSelector selects nothing: dev/web stays open.
    assert allowed(policies, in_ns("dev", "app=x"), in_ns("dev", "app=web"))
    assert not run(policies, in_ns("dev", "app=x"), in_ns("dev", "app=web")).ingress.selecting


def test_a_clusterwide_policy_is_not_limited_to_a_namespace() -> None:
    policies = ccnp("""
        endpointSelector: {matchLabels: {app: web}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
    """)
    for ns in ("prod", "dev", "default"):
        assert run(policies, "app=x", in_ns(ns, "app=web")).ingress.enforced
        assert allowed(policies, in_ns("kube-system", "app=client"), in_ns(ns, "app=web"))
        assert not allowed(policies, in_ns(ns, "app=other"), in_ns(ns, "app=web"))


def test_clusterscope_example() -> None:
    policies = example("clusterscope-policy.yaml")
    assert allowed(policies, in_ns("a", "name=luke"), in_ns("b", "name=leia"))
    assert not allowed(policies, in_ns("a", "name=vader"), in_ns("b", "name=leia"))


# --- named ports -----------------------------------------------------------------------


def named_port_engine() -> PolicyEngine:
    engine = PolicyEngine()
    engine.apply(cnp("""
        endpointSelector: {matchLabels: {app: web}}
        ingress:
        - toPorts: [{ports: [{port: http}]}]
    """, filename="named.yaml"))
    engine.upsert_endpoint(Endpoint("w1", LabelSet.parse("app=web"), named_ports=(("http", 8080, TCP),)))
    engine.upsert_endpoint(Endpoint("w2", LabelSet.parse("app=web"), named_ports=(("http", 9090, TCP),)))
    engine.upsert_endpoint(Endpoint("w3", LabelSet.parse("app=web")))
    return engine


def ingress_ports(engine: PolicyEngine, name: str) -> set[str]:
    return {str(key) for _, key, _ in engine.endpoint_policy(name).map_state.ingress.entries()}


def test_ingress_named_ports_resolve_from_each_endpoints_own_ports() -> None:
    engine = named_port_engine()
    assert ingress_ports(engine, "w1") == {"8080/TCP"}
    assert ingress_ports(engine, "w2") == {"9090/TCP"}
    assert ingress_ports(engine, "w3") == set()
    assert engine.endpoint_policy("w3").map_state.ingress.enforced


def test_an_undefined_named_port_is_noted() -> None:
    engine = named_port_engine()
    notes = [str(n) for n in engine.endpoint_policy("w3").notes]
    assert any("named port 'http' is not defined" in n and n.startswith("named.yaml:") for n in notes)
    for name in ("w1", "w2"):
        assert not any("is not defined" in str(n) for n in engine.endpoint_policy(name).notes), name


# --- l7proto: cassandra and memcache ------------------------------------------------------


@pytest.mark.parametrize(("src", "action", "table", "expected"), [
    ("app=empire-outpost", "select", "system.local", True),
    ("app=empire-outpost", "select", "system_schema.tables", True),
    ("app=empire-outpost", "select", "deathstar.plans", False),
    ("app=empire-outpost", "insert", "attendance.daily_records", True),
    ("app=empire-outpost", "delete", "attendance.daily_records", False),
    ("app=empire-hq", "drop-table", "deathstar.plans", True),  # l7: [{}] allows all
    ("app=rebel", "select", "system.local", False),
])
def test_cassandra(src: str, action: str, table: str, expected: bool) -> None:
    request = GenericL7Request.of("cassandra", {"query_action": action, "query_table": table})
    policies = example("cass-sw-security-policy.yaml")
    assert allowed(policies, src, "app=cass-server", TCP, 9042, request) is expected


@pytest.mark.parametrize(("src", "command", "key", "expected"), [
    ("app=a-wing", "get", "awing-coord", True),
    ("app=a-wing", "set", "awing-coord", True),
    ("app=a-wing", "get", "xwing-coord", False),
    ("app=x-wing", "set", "xwing-coord", True),
    ("app=x-wing", "delete", "xwing-coord", False),
    ("name=fleet-tracker", "get", "awing-coord", True),
    ("name=fleet-tracker", "get", "xwing-coord", True),
    ("name=fleet-tracker", "set", "xwing-coord", False),
    ("app=tie", "get", "awing-coord", False),
])
def test_memcache(src: str, command: str, key: str, expected: bool) -> None:
    request = GenericL7Request.of("memcache", {"command": command, "key": key})
    policies = example("memcd-sw-security-policy.yaml")
    assert allowed(policies, src, "app=memcd-server", TCP, 11211, request) is expected


# --- features not enforced yet -------------------------------------------------------------


def test_to_fqdns_selects_only_learned_addresses() -> None:
    policies = example("fqdn.yaml")
    result = run(policies, "app=test-app", "8.8.8.8", TCP, 80)
    assert not result.allowed
    assert not any("toFQDNs" in n for n in result.notes)
    learned = {"my-remote-service.com.": ["8.8.8.8"]}
    src, dst = peer("app=test-app"), peer("8.8.8.8")
    assert trace(policies, TraceRequest(src, dst, TCP, 80), fqdn=learned).allowed
    assert not trace(policies, TraceRequest(src, peer("8.8.4.4"), TCP, 80), fqdn=learned).allowed
    # the DNS rule of the same policy still works
    dns = f"{NS}=kube-system,k8s:k8s-app=kube-dns"
    assert allowed(policies, "app=test-app", dns, UDP, 53, DNSRequest("my-remote-service.com"))


def test_to_services_without_services_is_noted_and_grants_nothing() -> None:
    policies = example("service.yaml")
    for dst in ("8.8.8.8", "app=myservice", "k8s:io.kubernetes.service.name=myservice"):
        result = run(policies, "id=app2", dst)
        assert not result.allowed, dst
        assert any(n.startswith("service.yaml:10:") and "toServices is resolved against the agent's services" in n
                   for n in result.notes)


def test_an_unresolved_deny_denies_every_peer_on_its_ports() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toEntities: [all]
        egressDeny:
        - toServices: [{k8sService: {serviceName: db, namespace: default}}]
          toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
    """)
    result = run(policies, "app=web", "8.8.8.8", TCP, 5432)
    assert not result.allowed
    assert any("toServices is resolved against the agent's services" in n for n in result.notes)
    assert allowed(policies, "app=web", "8.8.8.8", TCP, 80)

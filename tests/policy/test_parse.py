"""Valid policies parse into the model: every element of the rule schema
(CiliumNetworkPolicy's, as Cilium documents it), with the file and line each part came from."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from cilia.policy import Direction, Policy, PolicyKind, Protocol, SourceRef, parse_text
from cilia.policy.model import (
    CIDRRule,
    DefaultDeny,
    DNSRule,
    FQDNSelector,
    GenericL7Rule,
    HeaderMatch,
    HTTPRule,
    ICMPField,
    KafkaRule,
    PeerRule,
    PortProtocol,
    Rule,
    ServiceSelector,
    TLSContext,
)
from cilia.policy.selectors import LabelSelector, Operator, Requirement

F = "policy.yaml"


def at(line: int) -> SourceRef:
    return SourceRef(F, line)


def parse(text: str) -> list[Policy]:
    result = parse_text(textwrap.dedent(text), F)
    assert result.ok, [str(p) for p in result.problems]
    return result.policies


def rule_of(body: str, kind: str = "CiliumNetworkPolicy") -> Rule:
    """The one rule of a policy whose spec is ``body`` (its first line is line 5)."""
    text = f"apiVersion: cilium.io/v2\nkind: {kind}\nmetadata: {{name: p}}\nspec:\n" + textwrap.indent(
        textwrap.dedent(body), "  ")
    (policy,) = parse(text)
    (rule,) = policy.rules
    return rule


def eq(key: str, value: str, source: str = "any") -> Requirement:
    return Requirement(source, key, Operator.IN, (value,))


def sel(*reqs: Requirement) -> LabelSelector:
    return LabelSelector(tuple(sorted(reqs)))


# --- documents ------------------------------------------------------------------------------


def test_a_namespaced_policy() -> None:
    (policy,) = parse("""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: web
          namespace: prod
          labels: {team: a}
          annotations: {note: x}
        spec:
          endpointSelector: {matchLabels: {app: web}}
        """)
    assert (policy.kind, policy.name, policy.namespace, policy.source) == (PolicyKind.CNP, "web", "prod", at(1))
    assert policy.key == ("CiliumNetworkPolicy", "prod", "web")
    assert policy.display_name == "prod/web"
    (rule,) = policy.rules
    assert rule.endpoint_selector == sel(eq("app", "web"))
    assert (rule.path, rule.source) == ("", at(8))


def test_a_policy_without_namespace_is_in_default() -> None:
    (policy,) = parse("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n"
                      "spec: {endpointSelector: {}}\n")
    assert policy.namespace == "default"


def test_a_clusterwide_policy_has_no_namespace() -> None:
    (policy,) = parse("""\
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: everywhere}
        spec:
          nodeSelector: {matchLabels: {role: worker}}
          ingress: [{fromEntities: [cluster]}]
        """)
    assert (policy.kind, policy.namespace, policy.display_name) == (PolicyKind.CCNP, None, "everywhere")
    (rule,) = policy.rules
    assert rule.endpoint_selector is None
    assert rule.node_selector == sel(eq("role", "worker"))


def test_spec_and_specs_together() -> None:
    (policy,) = parse("""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: p}
        spec:
          endpointSelector: {matchLabels: {app: a}}
        specs:
        - endpointSelector: {matchLabels: {app: b}}
        - endpointSelector: {matchLabels: {app: c}}
          egress: [{toEntities: [world]}]
        """)
    assert [(r.path, r.source.line, str(r.endpoint_selector)) for r in policy.rules] == [
        ("", 4, "{app=a}"), ("specs[0]", 7, "{app=b}"), ("specs[1]", 8, "{app=c}")]
    assert policy.rules[2].egress[0].path == "specs[1].egress[0]"


def test_several_documents_in_one_file_with_other_kinds_skipped() -> None:
    result = parse_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Service
        metadata: {name: svc}
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: one}
        spec: {endpointSelector: {}}
        ---
        # a comment before the document
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: two}
        spec: {endpointSelector: {}}
        ---
        """), F)
    assert result.ok
    assert [(p.name, p.kind, p.source) for p in result.policies] == [
        ("one", PolicyKind.CNP, at(5)), ("two", PolicyKind.CCNP, at(11))]
    assert result.skipped == [(at(1), "Service")]


def test_an_empty_file_holds_nothing() -> None:
    result = parse_text("# nothing here\n", F)
    assert result.ok and result.policies == [] and result.skipped == []


def test_rule_metadata_and_default_deny() -> None:
    rule = rule_of("""\
        endpointSelector: {}
        description: allow the frontend
        labels:
        - {key: owner, value: alice, source: k8s}
        - {key: tier}
        - "plain=label"
        - "k8s:app=web"
        enableDefaultDeny: {ingress: false, egress: true}
        ingress: [{fromEntities: [world]}]
        """)
    assert rule.description == "allow the frontend"
    assert rule.labels == ("k8s:owner=alice", "unspec:tier", "unspec:plain=label", "k8s:app=web")
    assert rule.default_deny == DefaultDeny(ingress=False, egress=True)
    assert not rule.enables_default_deny(Direction.INGRESS)


def test_default_deny_is_unset_by_default() -> None:
    assert rule_of("endpointSelector: {}\n").default_deny == DefaultDeny(None, None)


# --- selectors ------------------------------------------------------------------------------


def test_selectors_with_sources_and_expressions() -> None:
    rule = rule_of("""\
        endpointSelector:
          matchLabels:
            app: web
            "k8s:tier": front
            "any:org": empire
            "reserved:host": ""
          matchExpressions:
          - {key: env, operator: In, values: [stage, prod]}
          - {key: "k8s:team", operator: NotIn, values: [x]}
          - {key: canary, operator: Exists}
          - {key: legacy, operator: DoesNotExist}
        """)
    assert rule.endpoint_selector == sel(
        eq("app", "web"), eq("tier", "front", "k8s"), eq("org", "empire"), eq("host", "", "reserved"),
        Requirement("any", "env", Operator.IN, ("prod", "stage")),
        Requirement("k8s", "team", Operator.NOT_IN, ("x",)),
        Requirement("any", "canary", Operator.EXISTS),
        Requirement("any", "legacy", Operator.DOES_NOT_EXIST),
    )


def test_an_empty_selector_selects_everything() -> None:
    assert rule_of("endpointSelector: {}\n").endpoint_selector == LabelSelector()
    assert rule_of("endpointSelector: {matchLabels: {}}\n").endpoint_selector == LabelSelector()


def test_label_values_may_be_yaml_numbers() -> None:
    rule = rule_of("endpointSelector: {matchLabels: {version: 2}}\n")
    assert rule.endpoint_selector == sel(eq("version", "2"))


# --- L3 peers -------------------------------------------------------------------------------


def test_endpoint_peers_and_requires() -> None:
    rule = rule_of("""\
        endpointSelector: {}
        ingress:
        - fromEndpoints:
          - matchLabels: {app: a}
          - {}
          fromRequires:
          - matchLabels: {env: prod}
        egress:
        - toEndpoints: [{matchLabels: {app: db}}]
          toRequires: [{matchLabels: {env: prod}}]
        """)
    (ingress,) = rule.ingress
    assert ingress == PeerRule(
        Direction.INGRESS, False, (sel(eq("app", "a")), LabelSelector()), (sel(eq("env", "prod")),),
        None, None, None, None, (), None, None, None, "ingress[0]", at(7))
    assert ingress.has_l3() and not ingress.has_l4()
    (egress,) = rule.egress
    assert egress.endpoints == (sel(eq("app", "db")),)
    assert egress.requires == (sel(eq("env", "prod")),)
    assert egress.section == "egress"


def test_cidr_peers() -> None:
    rule = rule_of("""\
        endpointSelector: {}
        egress:
        - toCIDR:
          - 20.1.1.1/32
          - 192.168.1.1
          - "2001:db8::/32"
        - toCIDRSet:
          - cidr: 10.0.0.0/8
            except: [10.96.0.0/12, 10.1.2.3/32]
          - cidr: "2001:db8::/32"
        """)
    assert rule.egress[0].cidrs == (
        CIDRRule(ipaddress.ip_network("20.1.1.1/32"), (), at(8)),
        CIDRRule(ipaddress.ip_network("192.168.1.1/32"), (), at(9)),
        CIDRRule(ipaddress.ip_network("2001:db8::/32"), (), at(10)),
    )
    assert rule.egress[1].cidrs == (
        CIDRRule(ipaddress.ip_network("10.0.0.0/8"),
                 (ipaddress.ip_network("10.96.0.0/12"), ipaddress.ip_network("10.1.2.3/32")), at(12)),
        CIDRRule(ipaddress.ip_network("2001:db8::/32"), (), at(14)),
    )


def test_entities() -> None:
    rule = rule_of("""\
        endpointSelector: {}
        ingress: [{fromEntities: [world, cluster, host, remote-node, kube-apiserver, init, health,
                                  unmanaged, ingress, world-ipv4, world-ipv6, none, all]}]
        """)
    assert rule.ingress[0].entities == (
        "world", "cluster", "host", "remote-node", "kube-apiserver", "init", "health", "unmanaged",
        "ingress", "world-ipv4", "world-ipv6", "none", "all")


def test_services_and_fqdns() -> None:
    rule = rule_of("""\
        endpointSelector: {}
        egress:
        - toServices:
          - k8sService: {serviceName: db, namespace: prod}
          - k8sServiceSelector:
              selector: {matchLabels: {app: cache}}
              namespace: prod
          - k8sService: {serviceName: local}
        - toFQDNs:
          - matchName: cilium.io
          - matchPattern: "*.cilium.io"
          toPorts: [{ports: [{port: "443", protocol: TCP}]}]
        """)
    assert rule.egress[0].services == (
        ServiceSelector("db", None, "prod", at(8)),
        ServiceSelector(None, sel(eq("app", "cache")), "prod", at(9)),
        ServiceSelector("local", None, None, at(12)),
    )
    assert rule.egress[1].fqdns == (
        FQDNSelector("cilium.io", None, at(14)), FQDNSelector(None, "*.cilium.io", at(15)))
    assert rule.egress[1].to_ports is not None and rule.egress[1].to_ports[0].ports[0].port == 443


def test_groups_nodes_and_cidr_groups_are_kept_as_unenforced_peers() -> None:
    rule = rule_of("""\
        endpointSelector: {}
        ingress:
        - fromNodes: [{matchLabels: {role: control-plane}}]
        - fromGroups:
          - aws: {securityGroupsIds: [sg-1], securityGroupsNames: [web], labels: {a: b}, region: eu-west-1}
        - fromCIDRSet:
          - cidrGroupRef: office
          - cidrGroupSelector: {matchLabels: {site: hq}}
        egress:
        - toNodes: [{}]
        - toGroups: [{aws: {securityGroupsIds: [sg-2]}}]
        """)
    assert [r.unenforced_peers for r in rule.ingress] == [
        ("fromNodes",), ("fromGroups",), ("cidrGroupRef", "cidrGroupSelector")]
    assert [r.unenforced_peers for r in rule.egress] == [("toNodes",), ("toGroups",)]
    assert rule.ingress[2].cidrs == ()
    assert all(r.has_l3() for r in (*rule.ingress, *rule.egress))


def test_authentication() -> None:
    rule = rule_of("endpointSelector: {}\ningress: [{fromEntities: [cluster], authentication: {mode: required}}]\n")
    assert rule.ingress[0].authentication == "required"


def test_deny_sections() -> None:
    rule = rule_of("""\
        endpointSelector: {}
        ingressDeny:
        - fromEntities: [world]
          toPorts: [{ports: [{port: "22", protocol: TCP}]}]
        egressDeny:
        - toCIDRSet: [{cidr: 10.0.0.0/8}]
          icmps: [{fields: [{type: 8}]}]
        """)
    (ingress_deny,) = rule.ingress_deny
    assert (ingress_deny.deny, ingress_deny.direction, ingress_deny.section, ingress_deny.path) == (
        True, Direction.INGRESS, "ingressDeny", "ingressDeny[0]")
    assert ingress_deny.to_ports is not None and ingress_deny.to_ports[0].ports == (
        PortProtocol(22, None, None, Protocol.TCP, at(8)),)
    (egress_deny,) = rule.egress_deny
    assert egress_deny.section == "egressDeny"
    assert egress_deny.icmps == (ICMPField("IPv4", 8, at(11)),)
    assert rule.ingress == () and rule.egress == ()
    assert rule.enables_default_deny(Direction.INGRESS) and rule.enables_default_deny(Direction.EGRESS)


def test_an_empty_item_and_null_fields() -> None:
    rule = rule_of("""\
        endpointSelector: {}
        ingress:
        - {}
        - fromEndpoints:
          toPorts: [{ports: [{port: "80"}]}]
        - fromEndpoints: []
          toPorts: [{ports: [{port: "80"}]}]
        - fromEndpoints: [{}]
          toPorts: []
        egress:
        """)
    empty, null_peers, no_peers, no_ports = rule.ingress
    assert not empty.has_l3() and not empty.has_l4()
    # `fromEndpoints:` with nothing below it is null, i.e. absent (Kubernetes drops nulls) ...
    assert null_peers.endpoints is None and not null_peers.has_l3()
    # ... while an explicit empty list selects no peer (Cilium >= 1.15).
    assert no_peers.endpoints == () and no_peers.has_l3()
    # Cilium tests len(toPorts): an empty list restricts no port.
    assert no_ports.to_ports is None and not no_ports.has_l4()
    assert rule.egress == ()


# --- L4 -------------------------------------------------------------------------------------


def ports_of(ports_yaml: str) -> tuple[PortProtocol, ...]:
    rule = rule_of(f"endpointSelector: {{}}\ningress:\n- toPorts:\n  - ports:\n{textwrap.indent(ports_yaml, '    ')}")
    (item,) = rule.ingress
    assert item.to_ports is not None
    (port_rule,) = item.to_ports
    return port_rule.ports


def test_ports_protocols_and_ranges() -> None:
    ports = ports_of("""\
- port: "80"
  protocol: TCP
- {port: 53, protocol: UDP}
- {port: "2905", protocol: SCTP}
- {port: "8080", endPort: 8090, protocol: ANY}
- {port: "443", endPort: 443}
- {port: http-alt, protocol: TCP}
- {port: DNS-TCP}
- {protocol: UDP}
- {port: "0"}
""")
    assert ports == (
        PortProtocol(80, None, None, Protocol.TCP, at(9)),
        PortProtocol(53, None, None, Protocol.UDP, at(11)),
        PortProtocol(2905, None, None, Protocol.SCTP, at(12)),
        PortProtocol(8080, None, 8090, Protocol.ANY, at(13)),
        PortProtocol(443, None, None, Protocol.ANY, at(14)),     # endPort == port is one port
        PortProtocol(None, "http-alt", None, Protocol.TCP, at(15)),
        PortProtocol(None, "dns-tcp", None, Protocol.ANY, at(16)),  # names compare lowercase
        PortProtocol(0, None, None, Protocol.UDP, at(17)),        # no port: all ports
        PortProtocol(0, None, None, Protocol.ANY, at(18)),
    )
    assert [str(p) for p in ports] == [
        "80/TCP", "53/UDP", "2905/SCTP", "8080-8090/ANY", "443/ANY", "http-alt/TCP", "dns-tcp/ANY", "0/UDP", "0/ANY"]


def test_icmps_by_number_name_and_family() -> None:
    rule = rule_of("""\
        endpointSelector: {}
        egress:
        - icmps:
          - fields:
            - {type: 8, family: IPv4}
            - {type: EchoRequest, family: IPv6}
            - {type: 128, family: IPv6}
            - type: DestinationUnreachable
            - {type: "0"}
        """)
    icmps = rule.egress[0].icmps
    assert icmps == (
        ICMPField("IPv4", 8, at(9)), ICMPField("IPv6", 128, at(10)), ICMPField("IPv6", 128, at(11)),
        ICMPField("IPv4", 3, at(12)), ICMPField("IPv4", 0, at(13)))
    assert icmps is not None
    assert [f.protocol.label for f in icmps] == ["ICMP", "ICMPv6", "ICMPv6", "ICMP", "ICMP"]


def test_tls_server_names_and_listener() -> None:
    rule = rule_of("""\
        endpointSelector: {}
        egress:
        - toPorts:
          - ports: [{port: "443", protocol: TCP}]
            terminatingTLS:
              secret: {namespace: ns, name: server-cert}
            originatingTLS:
              secret: {name: ca}
              trustedCA: ca.crt
              certificate: tls.crt
              privateKey: tls.key
            serverNames: [api.example.com, "*.example.com"]
          - ports: [{port: "8443", protocol: TCP}]
            listener:
              envoyConfig: {kind: CiliumClusterwideEnvoyConfig, name: cec}
              name: l7lb
              priority: 10
        """)
    to_ports = rule.egress[0].to_ports
    assert to_ports is not None
    tls, lb = to_ports
    assert tls.terminating_tls == TLSContext("ns", "server-cert", None, None, None, at(9))
    assert tls.originating_tls == TLSContext(None, "ca", "ca.crt", "tls.crt", "tls.key", at(11))
    assert tls.server_names == ("api.example.com", "*.example.com")
    assert (tls.listener, tls.rules, tls.source) == (None, None, at(8))
    assert lb.listener == {"envoyConfig": {"kind": "CiliumClusterwideEnvoyConfig", "name": "cec"},
                           "name": "l7lb", "priority": 10}
    assert type(lb.listener["envoyConfig"]) is dict  # plain values, no YAML library types


# --- L7 -------------------------------------------------------------------------------------


def l7_of(rules_yaml: str, port: str = '{port: "80", protocol: TCP}') -> tuple[str, tuple[object, ...], SourceRef]:
    rule = rule_of(f"endpointSelector: {{}}\ningress:\n- toPorts:\n  - ports: [{port}]\n    rules:\n"
                   + textwrap.indent(rules_yaml, "      "))
    to_ports = rule.ingress[0].to_ports
    assert to_ports is not None and to_ports[0].rules is not None
    rules = to_ports[0].rules
    return rules.protocol, rules.rules, rules.source


def test_http_rules() -> None:
    protocol, rules, source = l7_of("""\
http:
- method: POST
  path: "/v1/request-landing"
- method: "GET|HEAD"
  path: "/api/.*"
  host: "^api\\\\.example\\\\.com$"
  headers:
  - "X-My-Header: true"
  - X-Present
  headerMatches:
  - {name: X-Token, secret: {namespace: ns, name: token}, mismatch: REPLACE}
  - {name: X-Mode, value: fast}
- {}
""")
    assert (protocol, source) == ("http", at(9))
    assert rules == (
        HTTPRule("POST", "/v1/request-landing", None, (), (), at(11)),
        HTTPRule("GET|HEAD", "/api/.*", "^api\\.example\\.com$", (("X-My-Header", "true"), ("X-Present", None)),
                 (HeaderMatch("X-Token", None, ("ns", "token"), "REPLACE", at(20)),
                  HeaderMatch("X-Mode", "fast", None, None, at(21))), at(13)),
        HTTPRule(None, None, None, (), (), at(22)),
    )


def test_kafka_rules() -> None:
    protocol, rules, _ = l7_of("""\
kafka:
- {role: produce, topic: deathstar-plans}
- {role: consume, topic: empire-announce, clientID: outpost}
- {apiKey: fetch, apiVersion: "2", topic: t}
- {apiKey: 3}
""", '{port: "9092", protocol: TCP}')
    assert protocol == "kafka"
    assert rules == (
        KafkaRule("produce", None, frozenset({0, 3, 18}), None, None, "deathstar-plans", at(11)),
        KafkaRule("consume", None, frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}), None, "outpost",
                  "empire-announce", at(12)),
        KafkaRule(None, "fetch", frozenset({1}), 2, None, "t", at(13)),
        KafkaRule(None, "metadata", frozenset({3}), None, None, None, at(14)),
    )


def test_dns_rules() -> None:
    protocol, rules, _ = l7_of("""\
dns:
- matchName: cilium.io
- matchPattern: "*.cilium.io"
""", '{port: "53", protocol: ANY}')
    assert protocol == "dns"
    assert rules == (DNSRule("cilium.io", None, at(11)), DNSRule(None, "*.cilium.io", at(12)))


@pytest.mark.parametrize(("proto", "port", "l7", "fields"), [
    ("cassandra", "9042", '[{query_action: select, query_table: "ks\\\\..*"}, {}]',
     ((("query_action", "select"), ("query_table", "ks\\..*")), ())),
    ("memcache", "11211", "[{command: get, keyExact: awing-coord}, {command: set, keyPrefix: a}]",
     ((("command", "get"), ("keyExact", "awing-coord")), (("command", "set"), ("keyPrefix", "a")))),
])
def test_l7proto_rules(proto: str, port: str, l7: str, fields: tuple[tuple[tuple[str, str], ...], ...]) -> None:
    protocol, rules, _ = l7_of(f"l7proto: {proto}\nl7: {l7}\n", f'{{port: "{port}", protocol: TCP}}')
    assert protocol == proto
    assert rules == tuple(GenericL7Rule(f, at(11)) for f in fields)


def test_empty_l7_lists_allow_every_request_of_the_protocol() -> None:
    assert l7_of("http: []\n")[:2] == ("http", ())
    assert l7_of("l7proto: memcache\n", '{port: "11211", protocol: TCP}')[:2] == ("memcache", ())


def test_empty_rules_restrict_nothing() -> None:
    rule = rule_of('endpointSelector: {}\ningress:\n- toPorts:\n  - ports: [{port: "80"}]\n    rules: {}\n')
    to_ports = rule.ingress[0].to_ports
    assert to_ports is not None and to_ports[0].rules is None

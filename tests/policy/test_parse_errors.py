"""Invalid policies: every problem is reported as ``file:line: field.path: message``,
and a file with any problem yields no policy at all."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from cilia.policy import ValidationError, load_files, load_paths, parse_text
from cilia.policy.parse import check_unique

HEAD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: p
spec:
  endpointSelector: {}
"""  # the rule body given to spec_problems starts at line 7


def problems(text: str, filename: str = "policy.yaml") -> list[str]:
    """The problems of one file, which must then yield no policy."""
    result = parse_text(textwrap.dedent(text), filename)
    assert result.policies == []
    assert not result.ok
    return [str(p) for p in sorted(result.problems, key=lambda p: (p.source.line, p.path))]


def spec_problems(body: str) -> list[str]:
    """Problems of a CNP whose spec is ``endpointSelector: {}`` plus ``body``."""
    return problems(HEAD + textwrap.indent(textwrap.dedent(body), "  "))


def test_the_issue_example_names_file_line_and_field() -> None:
    text = """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: web
          namespace: prod
        spec:
          endpointSelector:
            matchLabels:
              app: web
          ingress:
          - fromEndpoints:
            - matchLabels: {app: client}
            toPorts:
            - ports:
              - port: "http!"
                protocol: TCP
        """
    assert problems(text) == [
        'policy.yaml:15: ingress[0].toPorts[0].ports[0].port: "http!" is not a port number or name']


# --- YAML -----------------------------------------------------------------------------


def test_a_yaml_syntax_error_names_its_line() -> None:
    text = """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          name: p
        spec:
          endpointSelector: {}
          ingress:
          - toPorts:
            - ports:
              - port: "80"
               protocol: TCP
        """
    assert problems(text) == [
        "policy.yaml:11: YAML syntax error: while parsing a block mapping: "
        "expected <block end>, but found '<block mapping start>'"]


def test_an_unterminated_string_is_a_syntax_error() -> None:
    assert problems(HEAD + '  description: "open\n') == [
        "policy.yaml:8: YAML syntax error: while scanning a quoted scalar: found unexpected end of stream"]


def test_a_tab_indent_is_a_syntax_error() -> None:
    assert problems(HEAD + "\tingress: []\n") == [
        "policy.yaml:7: YAML syntax error: while scanning for the next token: "
        "found character '\\t' that cannot start any token"]


def test_duplicate_keys_are_an_error() -> None:
    assert spec_problems("endpointSelector: {matchLabels: {app: web}}\n") == [
        'policy.yaml:7: YAML syntax error: duplicate key "endpointSelector"']
    assert spec_problems("ingress:\n- fromEntities: [world]\n  fromEntities: [cluster]\n") == [
        'policy.yaml:9: YAML syntax error: duplicate key "fromEntities"']


def test_a_syntax_error_in_a_later_document_discards_the_whole_file() -> None:
    assert problems(HEAD + "---\nkind: [\n") == [
        "policy.yaml:9: YAML syntax error: while parsing a flow node: expected the node content, "
        "but found '<stream end>'"]


@pytest.mark.parametrize("body", [
    "? {a: 1}\n: x\n",            # a mapping as a key
    "ingress: !!set {a}\n",
    "description: !!omap x\n",
])
def test_yaml_that_cannot_be_loaded_is_a_problem_not_a_crash(body: str) -> None:
    found = spec_problems(body)
    assert len(found) == 1 and found[0].startswith("policy.yaml:")


def test_a_redefined_anchor_is_fine() -> None:
    text = HEAD + "  description: &d one\n  labels: [&d two, *d]\n"
    result = parse_text(text, "policy.yaml")
    assert result.ok and result.policies[0].rules[0].labels == ("unspec:two", "unspec:two")


def test_a_document_that_is_not_a_mapping() -> None:
    assert problems("- a\n- b\n") == ["policy.yaml:1: expected a Kubernetes object (mapping), got list"]


# --- document, metadata -------------------------------------------------------------------


def test_unknown_top_level_and_metadata_fields() -> None:
    text = """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metdata: {}
        metadata:
          name: p
          nmespace: prod
        spec: {endpointSelector: {}}
        """
    assert problems(text) == [
        "policy.yaml:3: metdata: unknown field 'metdata' (did you mean 'metadata'?)",
        "policy.yaml:6: metadata.nmespace: unknown field 'nmespace' (did you mean 'namespace'?)",
    ]


def test_missing_metadata_name() -> None:
    text = """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata:
          namespace: prod
        spec: {endpointSelector: {}}
        """
    assert problems(text) == ["policy.yaml:3: metadata: missing required field 'name'"]


def test_invalid_metadata_name() -> None:
    text = HEAD.replace("name: p", "name: My_Policy")
    assert problems(text) == [
        "policy.yaml:4: metadata.name: 'My_Policy' is not a valid name (lowercase letters, digits, '-' and '.')"]


def test_wrong_api_version() -> None:
    assert problems(HEAD.replace("cilium.io/v2", "cilium.io/v1")) == [
        "policy.yaml:1: apiVersion: unsupported apiVersion 'cilium.io/v1' (expected 'cilium.io/v2')"]


def test_an_unknown_kind_under_cilium_io_is_an_error() -> None:
    assert problems(HEAD.replace("kind: CiliumNetworkPolicy", "kind: CiliumNetworkPolicies")) == [
        "policy.yaml:2: kind: kind 'CiliumNetworkPolicies' is not a policy kind "
        "(expected one of CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)"]


def test_kind_must_be_a_string_and_present() -> None:
    assert problems(HEAD.replace("kind: CiliumNetworkPolicy", "kind: [CiliumNetworkPolicy]")) == [
        "policy.yaml:2: kind: expected a string, got list"]
    assert problems(HEAD.replace("kind: CiliumNetworkPolicy\n", "")) == [
        "policy.yaml:1: missing required field 'kind'"]


def test_missing_spec() -> None:
    assert problems("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\n") == [
        "policy.yaml:1: missing 'spec' or 'specs'"]


def test_a_clusterwide_policy_takes_no_namespace() -> None:
    text = """\
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata:
          name: p
          namespace: prod
        spec: {endpointSelector: {}}
        """
    assert problems(text) == [
        "policy.yaml:5: metadata.namespace: CiliumClusterwideNetworkPolicy is cluster-scoped and takes no namespace"]


# --- rule -----------------------------------------------------------------------------------


def test_unknown_rule_field() -> None:
    assert spec_problems("ingres: []\n") == ["policy.yaml:7: ingres: unknown field 'ingres' (did you mean 'ingress'?)"]


def test_node_selector_is_only_for_clusterwide_policies() -> None:
    text = HEAD.replace("endpointSelector: {}", "nodeSelector: {}")
    assert problems(text) == [
        "policy.yaml:6: nodeSelector: nodeSelector (host policy) is only allowed in CiliumClusterwideNetworkPolicy"]


def test_exactly_one_of_endpoint_selector_and_node_selector() -> None:
    ccnp = HEAD.replace("kind: CiliumNetworkPolicy", "kind: CiliumClusterwideNetworkPolicy")
    assert problems(ccnp + "  nodeSelector: {}\n") == [
        "policy.yaml:7: nodeSelector: endpointSelector and nodeSelector are mutually exclusive"]
    assert problems(ccnp.replace("  endpointSelector: {}\n", "  ingress: [{}]\n")) == [
        "policy.yaml:5: exactly one of endpointSelector or nodeSelector is required"]


def test_wrong_types_in_a_rule() -> None:
    assert spec_problems("ingress: {fromEntities: [world]}\n") == [
        "policy.yaml:7: ingress: expected a list, got mapping"]
    assert spec_problems("enableDefaultDeny: {ingress: 'no'}\n") == [
        "policy.yaml:7: enableDefaultDeny.ingress: expected true or false, got string"]
    assert spec_problems("description: [a]\n") == ["policy.yaml:7: description: expected a string, got list"]


def test_errors_in_specs_name_the_spec() -> None:
    text = """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: p}
        specs:
        - endpointSelector: {}
        - endpointSelector: {matchLabels: {app: web}}
          ingress:
          - toPorts:
            - ports:
              - port: "http!"
          egress:
          - toCIDR: [10.0.0.1/8]
        """
    assert problems(text) == [
        'policy.yaml:10: specs[1].ingress[0].toPorts[0].ports[0].port: "http!" is not a port number or name',
        "policy.yaml:12: specs[1].egress[0].toCIDR[0]: '10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)",
    ]


# --- selectors ------------------------------------------------------------------------------


def test_unknown_selector_field() -> None:
    assert spec_problems("ingress:\n- fromEndpoints: [{matchLabel: {app: web}}]\n") == [
        "policy.yaml:8: ingress[0].fromEndpoints[0].matchLabel: unknown field 'matchLabel' "
        "(did you mean 'matchLabels'?)"]


def test_the_wrongly_indented_l3_l4_combined_example() -> None:
    # An older revision of Cilium's l3_l4_combined.yaml: `role: frontend` sits beside
    # matchLabels instead of under it, so matchLabels is null and `role` a selector field.
    text = """\
        apiVersion: "cilium.io/v2"
        kind: CiliumNetworkPolicy
        metadata:
          name: "l4-rule"
        spec:
          endpointSelector:
            matchLabels:
              role: backend
          ingress:
          - fromEndpoints:
            - matchLabels:
              role: frontend
            toPorts:
            - ports:
              - port: "80"
                protocol: TCP
        """
    assert problems(text) == [
        "policy.yaml:11: ingress[0].fromEndpoints[0].matchLabels: matchLabels is null: check the indentation "
        "of the labels below it (an empty selector {} selects everything)",
        "policy.yaml:12: ingress[0].fromEndpoints[0].role: unknown field 'role'",
    ]


def test_match_labels_null_is_an_error() -> None:
    assert problems(HEAD.replace("endpointSelector: {}", "endpointSelector:\n    matchLabels:")) == [
        "policy.yaml:7: endpointSelector.matchLabels: matchLabels is null: check the indentation of the "
        "labels below it (an empty selector {} selects everything)"]


def test_match_labels_must_map_strings() -> None:
    assert spec_problems("ingress:\n- fromEndpoints: [{matchLabels: 'app=web'}]\n") == [
        "policy.yaml:8: ingress[0].fromEndpoints[0].matchLabels: expected a mapping, got string"]
    assert spec_problems("ingress:\n- fromEndpoints: [{matchLabels: {app: [web]}}]\n") == [
        "policy.yaml:8: ingress[0].fromEndpoints[0].matchLabels.app: expected a string, got list"]
    assert spec_problems("ingress:\n- fromEndpoints: [{matchLabels: {app: 'a b'}}]\n") == [
        "policy.yaml:8: ingress[0].fromEndpoints[0].matchLabels.app: 'a b' is not a valid label value"]


def test_match_expressions_errors() -> None:
    body = """\
        ingress:
        - fromEndpoints:
          - matchExpressions:
            - {key: env, operator: Equals, values: [prod]}
            - {key: env, operator: In}
            - {key: env, operator: Exists, values: [prod]}
            - {key: env, values: [prod]}
            - {key: env, operator: In, value: [prod]}
        """
    assert spec_problems(body) == [
        "policy.yaml:10: ingress[0].fromEndpoints[0].matchExpressions[0].operator: unknown operator 'Equals' "
        "(expected In, NotIn, Exists or DoesNotExist)",
        "policy.yaml:11: ingress[0].fromEndpoints[0].matchExpressions[1]: operator In needs a non-empty "
        "'values' list",
        "policy.yaml:12: ingress[0].fromEndpoints[0].matchExpressions[2].values: operator Exists takes no values",
        "policy.yaml:13: ingress[0].fromEndpoints[0].matchExpressions[3]: missing required field 'operator'",
        "policy.yaml:14: ingress[0].fromEndpoints[0].matchExpressions[4]: operator In needs a non-empty "
        "'values' list",
        "policy.yaml:14: ingress[0].fromEndpoints[0].matchExpressions[4].value: unknown field 'value' "
        "(did you mean 'values'?)",
    ]


# --- peers ----------------------------------------------------------------------------------


def test_unknown_ingress_item_field() -> None:
    assert spec_problems("ingress:\n- fromEndpoint: [{}]\n") == [
        "policy.yaml:8: ingress[0].fromEndpoint: unknown field 'fromEndpoint' (did you mean 'fromEndpoints'?)"]


def test_a_field_of_the_other_direction() -> None:
    assert spec_problems("ingress:\n- toEndpoints: [{}]\n") == [
        "policy.yaml:8: ingress[0].toEndpoints: toEndpoints is not allowed in ingress rules"]
    assert spec_problems("egress:\n- fromEntities: [world]\n") == [
        "policy.yaml:8: egress[0].fromEntities: fromEntities is not allowed in egress rules"]


@pytest.mark.parametrize(("item", "message"), [
    ("{fromCIDR: [10.0.0.0/8], fromEndpoints: [{}]}", "ingress[0].fromCIDR: fromEndpoints and fromCIDR"),
    ("{fromEntities: [world], fromCIDRSet: [{cidr: 10.0.0.0/8}]}",
     "ingress[0].fromEntities: fromCIDRSet and fromEntities"),
    ("{fromCIDR: [10.0.0.0/8], fromCIDRSet: [{cidr: 10.0.0.0/8}]}", "ingress[0].fromCIDRSet: fromCIDR and fromCIDRSet"),
])
def test_peer_kinds_cannot_be_combined_in_one_item(item: str, message: str) -> None:
    assert spec_problems(f"ingress:\n- {item}\n") == [
        f"policy.yaml:8: {message} cannot be combined in one rule; write separate rules"]


def test_icmps_cannot_be_combined_with_to_ports() -> None:
    body = "ingress:\n- icmps: [{fields: [{type: 8}]}]\n  toPorts: [{ports: [{port: '80'}]}]\n"
    assert spec_problems(body) == [
        "policy.yaml:8: ingress[0].icmps: icmps cannot be combined with toPorts in one rule; write separate rules"]


def test_bad_cidrs() -> None:
    body = """\
        egress:
        - toCIDR: [10.0.0.300/8, 10.0.0.1/8, not-a-cidr, "2001:db8::1/32"]
        - toCIDRSet:
          - cidr: 10.0.0.0/8
            except: [11.0.0.0/16, 10.1.0.0/16, "2001:db8::/64", 10.2.0.1/16]
          - except: [10.0.0.0/16]
        """
    assert spec_problems(body) == [
        "policy.yaml:8: egress[0].toCIDR[0]: '10.0.0.300/8' is not a valid CIDR",
        "policy.yaml:8: egress[0].toCIDR[1]: '10.0.0.1/8' has host bits set (did you mean '10.0.0.0/8'?)",
        "policy.yaml:8: egress[0].toCIDR[2]: 'not-a-cidr' is not a valid CIDR",
        "policy.yaml:8: egress[0].toCIDR[3]: '2001:db8::1/32' has host bits set (did you mean '2001:db8::/32'?)",
        "policy.yaml:11: egress[1].toCIDRSet[0].except[0]: except '11.0.0.0/16' is not inside '10.0.0.0/8'",
        "policy.yaml:11: egress[1].toCIDRSet[0].except[2]: except '2001:db8::/64' is not inside '10.0.0.0/8'",
        "policy.yaml:11: egress[1].toCIDRSet[0].except[3]: '10.2.0.1/16' has host bits set "
        "(did you mean '10.2.0.0/16'?)",
        "policy.yaml:12: egress[1].toCIDRSet[1]: exactly one of cidr, cidrGroupRef or cidrGroupSelector is required",
    ]


def test_unknown_entity() -> None:
    assert spec_problems("ingress:\n- fromEntities: [wrold]\n") == [
        "policy.yaml:8: ingress[0].fromEntities[0]: unknown entity 'wrold' (expected one of all, world, "
        "world-ipv4, world-ipv6, cluster, host, remote-node, kube-apiserver, init, ingress, unmanaged, "
        "health, none)"]


def test_bad_fqdn_and_service_selectors() -> None:
    body = """\
        egress:
        - toFQDNs:
          - matchName: "bad name.com"
          - {matchName: a.com, matchPattern: "*.a.com"}
        - toServices:
          - k8sService: {namespace: prod}
          - k8sServiceSelector: {selector: {matchLabels: {a: b}}}
            k8sService: {serviceName: db}
        """
    assert spec_problems(body) == [
        "policy.yaml:9: egress[0].toFQDNs[0].matchName: 'bad name.com' is not a valid DNS name: use labels of "
        "letters, digits, '-', '_' separated by single dots",
        "policy.yaml:10: egress[0].toFQDNs[1]: exactly one of matchName or matchPattern is required",
        "policy.yaml:12: egress[1].toServices[0].k8sService: missing required field 'serviceName'",
        "policy.yaml:13: egress[1].toServices[1]: exactly one of k8sService or k8sServiceSelector is required",
    ]


def test_to_fqdns_names_and_patterns() -> None:
    body = """\
        egress:
        - toFQDNs:
          - matchPattern: "*.exa$mple.com"
          - matchName: "a..b.com"
          - matchName: ""
          - matchName: "*.a.com"
          - matchPattern: "*"
          - matchName: "API.Example.com."
        """
    assert spec_problems(body) == [
        "policy.yaml:9: egress[0].toFQDNs[0].matchPattern: '*.exa$mple.com' is not a valid DNS pattern: use labels "
        "of letters, digits, '-', '_', '*' separated by single dots",
        "policy.yaml:10: egress[0].toFQDNs[1].matchName: 'a..b.com' is not a valid DNS name: use labels of "
        "letters, digits, '-', '_' separated by single dots",
        "policy.yaml:11: egress[0].toFQDNs[2].matchName: '' is not a valid DNS name: use labels of letters, "
        "digits, '-', '_' separated by single dots",
        "policy.yaml:12: egress[0].toFQDNs[3].matchName: '*.a.com' is not a valid DNS name: use labels of "
        "letters, digits, '-', '_' separated by single dots",
    ]


def test_to_fqdns_is_not_allowed_in_ingress() -> None:
    assert spec_problems("ingress:\n- toFQDNs: [{matchName: a.com}]\n") == [
        "policy.yaml:8: ingress[0].toFQDNs: toFQDNs is not allowed in ingress rules"]


def test_to_fqdns_is_not_allowed_in_egress_deny() -> None:
    assert spec_problems("egressDeny:\n- toFQDNs: [{matchName: a.com}]\n") == [
        "policy.yaml:8: egressDeny[0].toFQDNs: toFQDNs is not supported in egressDeny rules"]


def test_authentication_mode() -> None:
    assert spec_problems("ingress:\n- fromEntities: [cluster]\n  authentication: {mode: mutual}\n") == [
        "policy.yaml:9: ingress[0].authentication.mode: unknown mode 'mutual' (expected required or disabled)"]
    assert spec_problems("ingressDeny:\n- fromEntities: [cluster]\n  authentication: {mode: required}\n") == [
        "policy.yaml:9: ingressDeny[0].authentication: authentication is not supported in ingressDeny rules"]


# --- L4 -------------------------------------------------------------------------------------


def port_problems(port_item: str, rules: str = "") -> list[str]:
    """Problems of one ``ports`` item (at line 10) under ingress[0].toPorts[0]."""
    body = f"ingress:\n- toPorts:\n  - ports:\n    - {port_item}\n"
    if rules:
        body += f"    rules: {rules}\n"
    return spec_problems(body)


P = "policy.yaml:10: ingress[0].toPorts[0].ports[0]"


@pytest.mark.parametrize(("item", "expected"), [
    ('{port: "http!"}', f'{P}.port: "http!" is not a port number or name'),
    ('{port: "70000"}', f'{P}.port: "70000" is not a port number or name (ports are 0-65535)'),
    ("{port: 70000}", f'{P}.port: "70000" is not a port number or name (ports are 0-65535)'),
    ('{port: "-1"}', f'{P}.port: "-1" is not a port number or name'),
    ('{port: "a--b"}', f'{P}.port: "a--b" is not a port number or name'),
    ('{port: "sixteen-chars-xx"}', f'{P}.port: "sixteen-chars-xx" is not a port number or name'),
    ('{port: "٨٠"}', f'{P}.port: "٨٠" is not a port number or name'),
    ("{port: [80]}", f"{P}.port: expected a port number or name, got list"),
    ('{port: "80", endPort: "90"}', f"{P}.endPort: expected an integer, got string"),
    ('{port: "80", endPort: 79}', f"{P}.endPort: endPort 79 is below port 80"),
    ('{port: "80", endPort: 65536}', f"{P}.endPort: 65536 is out of range [0, 65535]"),
    ('{port: "http", endPort: 90}', f"{P}.endPort: endPort cannot be used with a named port"),
    ('{port: "0", endPort: 90}', f"{P}.endPort: endPort needs a non-zero port"),
    ('{port: "80", protocol: ICMP}', f"{P}.protocol: unknown protocol 'ICMP' (expected TCP, UDP, SCTP or ANY)"),
    ('{port: "80", protocol: tcp}', f"{P}.protocol: unknown protocol 'tcp' (expected TCP, UDP, SCTP or ANY)"),
    ('{port: "80", proto: TCP}', f"{P}.proto: unknown field 'proto'"),
])
def test_bad_ports(item: str, expected: str) -> None:
    assert port_problems(item) == [expected]


def test_unknown_to_ports_field() -> None:
    assert spec_problems("ingress:\n- toPorts:\n  - port: [{port: '80'}]\n") == [
        "policy.yaml:9: ingress[0].toPorts[0].port: unknown field 'port' (did you mean 'ports'?)"]


def test_to_ports_wrong_types() -> None:
    assert spec_problems("ingress:\n- toPorts: {ports: [{port: '80'}]}\n") == [
        "policy.yaml:8: ingress[0].toPorts: expected a list, got mapping"]
    assert spec_problems("ingress:\n- toPorts:\n  - ports: 80\n") == [
        "policy.yaml:9: ingress[0].toPorts[0].ports: expected a list, got integer"]


def test_bad_icmps() -> None:
    body = """\
        ingress:
        - icmps:
          - fields:
            - {type: 256}
            - {type: EchoRequest, family: IPv5}
            - {type: PacketTooBig}
            - {family: IPv6}
            - {type: [8]}
          - field: []
        """
    assert spec_problems(body) == [
        "policy.yaml:10: ingress[0].icmps[0].fields[0].type: 256 is not an IPv4 ICMP type number (0-255) or name",
        "policy.yaml:11: ingress[0].icmps[0].fields[1].family: unknown family 'IPv5' (expected IPv4 or IPv6)",
        "policy.yaml:12: ingress[0].icmps[0].fields[2].type: 'PacketTooBig' is not an IPv4 ICMP type "
        "number (0-255) or name",
        "policy.yaml:13: ingress[0].icmps[0].fields[3]: missing required field 'type'",
        "policy.yaml:14: ingress[0].icmps[0].fields[4].type: expected an ICMP type number or name, got list",
        "policy.yaml:15: ingress[0].icmps[1]: missing required field 'fields'",
        "policy.yaml:15: ingress[0].icmps[1].field: unknown field 'field' (did you mean 'fields'?)",
    ]


def test_deny_port_rules_take_only_ports() -> None:
    body = """\
        ingressDeny:
        - toPorts:
          - ports: [{port: "80", protocol: TCP}]
            rules: {http: [{}]}
            serverNames: [a.com]
        """
    assert spec_problems(body) == [
        "policy.yaml:10: ingressDeny[0].toPorts[0].rules: L7 rules are not supported in deny rules",
        "policy.yaml:11: ingressDeny[0].toPorts[0].serverNames: serverNames is not supported in deny rules",
    ]


def test_bad_tls_and_listener() -> None:
    body = """\
        egress:
        - toPorts:
          - ports: [{port: "443", protocol: TCP}]
            terminatingTLS: {secret: {namespace: ns}, trustCA: x}
            listener: {envoyConfig: {kind: EnvoyConfig, name: cec}, name: l, priority: 0}
        """
    assert spec_problems(body) == [
        "policy.yaml:10: egress[0].toPorts[0].terminatingTLS.secret: missing required field 'name'",
        "policy.yaml:10: egress[0].toPorts[0].terminatingTLS.trustCA: unknown field 'trustCA' "
        "(did you mean 'trustedCA'?)",
        "policy.yaml:11: egress[0].toPorts[0].listener.envoyConfig.kind: unknown kind 'EnvoyConfig' "
        "(expected CiliumEnvoyConfig or CiliumClusterwideEnvoyConfig)",
        "policy.yaml:11: egress[0].toPorts[0].listener.priority: 0 is out of range [1, 100]",
    ]


# --- L7 -------------------------------------------------------------------------------------

R = "policy.yaml:11: ingress[0].toPorts[0].rules"


@pytest.mark.parametrize(("port", "rules", "expected"), [
    # unknown fields
    ('{port: "80", protocol: TCP}', "{HTTP: [{}]}", f"{R}.HTTP: unknown field 'HTTP' (did you mean 'http'?)"),
    ('{port: "80", protocol: TCP}', "{http: [{methods: GET}]}",
     f"{R}.http[0].methods: unknown field 'methods' (did you mean 'method'?)"),
    ('{port: "80", protocol: TCP}', "{http: {method: GET}}", f"{R}.http: expected a list, got mapping"),
    # regexes are RE2, as Envoy compiles them
    ('{port: "80", protocol: TCP}', '{http: [{path: "/(?=admin)"}]}',
     f"{R}.http[0].path: invalid RE2 regex '/(?=admin)': invalid perl operator: (?="),
    ('{port: "80", protocol: TCP}', '{http: [{path: "/(a)\\\\1"}]}',
     f"{R}.http[0].path: invalid RE2 regex '/(a)\\\\1': invalid escape sequence: \\1"),
    ('{port: "80", protocol: TCP}', '{http: [{method: "GET|PUT[" }]}',
     f"{R}.http[0].method: invalid RE2 regex 'GET|PUT[': missing ]: ["),
    ('{port: "80", protocol: TCP}', '{http: [{host: "(a|b|c|d){50}"}]}',
     f"{R}.http[0].host: regex '(a|b|c|d){{50}}' is too complex for Envoy (RE2 program size 154 > 100)"),
    # Kafka
    ('{port: "9092", protocol: TCP}', "{kafka: [{role: produce, apiKey: produce}]}",
     f"{R}.kafka[0].apiKey: cannot be combined with role (a role already stands for a set of API keys)"),
    # one L7 type per port rule
    ('{port: "80", protocol: TCP}', "{http: [{}], kafka: [{}]}",
     f"{R}.kafka: http and kafka rules cannot be mixed on one port rule"),
    ('{port: "80", protocol: TCP}', "{dns: [{matchName: a.com}], l7proto: memcache}",
     f"{R}.l7proto: dns and l7proto rules cannot be mixed on one port rule"),
    ('{port: "80", protocol: TCP}', "{l7: [{command: get}]}", f"{R}.l7: l7 rules need l7proto to name the parser"),
    ('{port: "80", protocol: TCP}', "{l7proto: redis, l7: [{}]}",
     f"{R}.l7proto: unknown L7 protocol 'redis' (registered parsers: cassandra, memcache, r2d2)"),  # r2d2: examples/
    # ports L7 rules can apply to
    ('{port: "80", protocol: UDP}', "{http: [{}]}", f"{R}: http rules need TCP, not UDP (port 80/UDP)"),
    ('{port: "80", protocol: SCTP}', "{kafka: [{}]}", f"{R}: kafka rules need TCP, not SCTP (port 80/SCTP)"),
    ('{port: "53", endPort: 60, protocol: UDP}', "{dns: [{matchName: a.com}]}",
     f"{R}: dns rules cannot apply to a port range (port 53-60/UDP)"),
    ('{port: "53", protocol: SCTP}', "{dns: [{matchName: a.com}]}",
     f"{R}: dns rules apply to UDP or TCP, not SCTP (port 53/SCTP)"),
    ('{port: "0", protocol: TCP}', "{http: [{}]}",
     f"{R}: http rules cannot apply to all ports (port 0/TCP); name a port"),
    ('{protocol: TCP}', "{l7proto: memcache, l7: [{command: get}]}",
     f"{R}: memcache rules cannot apply to all ports (port 0/TCP); name a port"),
])
def test_bad_l7_rules(port: str, rules: str, expected: str) -> None:
    assert port_problems(port, rules) == [expected]


def test_l7_rules_need_ports() -> None:
    body = "ingress:\n- toPorts:\n  - rules: {http: [{}]}\n"
    assert spec_problems(body) == ["policy.yaml:9: ingress[0].toPorts[0].rules: http rules need explicit ports"]


# --- files ----------------------------------------------------------------------------------

VALID = HEAD + "  ingress:\n  - fromEntities: [world]\n"


def test_a_file_with_one_error_yields_no_policy_and_other_files_still_load(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID.replace("name: p", "name: good"))
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("name: p", "name: ok") + "---\n" + VALID.replace("[world]", "[wrold]"))
    result = load_paths([bad, good])
    assert [p.name for p in result.policies] == ["good"]
    assert [str(p) for p in result.problems] == [
        f"{bad}:17: ingress[0].fromEntities[0]: unknown entity 'wrold' (expected one of all, world, world-ipv4, "
        "world-ipv6, cluster, host, remote-node, kube-apiserver, init, ingress, unmanaged, health, none)"]
    assert not result.ok


def test_load_files_raises_with_every_problem_sorted_by_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text(HEAD + "  ingress:\n  - fromEntities: [wrold]\n  egres: []\n")
    (tmp_path / "a.yaml").write_text(HEAD + "  egress:\n  - toCIDR: [1.2.3.4/8]\n")
    (tmp_path / "c.yaml").write_text(VALID)
    with pytest.raises(ValidationError) as info:
        load_files([tmp_path / "c.yaml", tmp_path / "b.yaml", tmp_path / "a.yaml"])
    lines = str(info.value).splitlines()
    assert [line.removeprefix(f"{tmp_path}/") for line in lines] == [
        "a.yaml:8: egress[0].toCIDR[0]: '1.2.3.4/8' has host bits set (did you mean '1.0.0.0/8'?)",
        "b.yaml:8: ingress[0].fromEntities[0]: unknown entity 'wrold' (expected one of all, world, world-ipv4, "
        "world-ipv6, cluster, host, remote-node, kube-apiserver, init, ingress, unmanaged, health, none)",
        "b.yaml:9: egres: unknown field 'egres' (did you mean 'egress'?)",
    ]
    assert len(info.value.problems) == 3
    assert [p.name for p in load_files([tmp_path / "c.yaml"])] == ["p"]


def test_an_unreadable_file_is_a_problem(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    result = load_paths([missing])
    assert len(result.problems) == 1
    assert str(result.problems[0]).startswith(f"{missing}: cannot read file: ")


def test_check_unique_rejects_a_name_defined_twice(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(VALID)
    (tmp_path / "b.yaml").write_text(VALID)
    (tmp_path / "c.yaml").write_text(VALID.replace("name: p", "name: p\n  namespace: prod"))
    (tmp_path / "d.yaml").write_text(VALID.replace("kind: CiliumNetworkPolicy", "kind: CiliumClusterwideNetworkPolicy"))
    policies = load_files(sorted(tmp_path.iterdir()))
    assert len(policies) == 4
    with pytest.raises(ValidationError) as info:
        check_unique(policies)
    assert str(info.value) == (
        f"{tmp_path}/b.yaml:1: metadata.name: CiliumNetworkPolicy 'default/p' is defined twice "
        f"(first at {tmp_path}/a.yaml:1)")
    check_unique([p for p in policies if not p.source.file.endswith("b.yaml")])


@pytest.mark.parametrize(("body", "expected"), [
    ("egress:\n- toCIDRSet: [{cidr: 10.0.0.0/8, except: 10.1.0.0/16}]\n",
     "policy.yaml:8: egress[0].toCIDRSet[0].except: expected a list, got string"),
    ("egress:\n- toPorts: [{ports: [{port: '443'}], serverNames: a.com}]\n",
     "policy.yaml:8: egress[0].toPorts[0].serverNames: expected a list, got string"),
    ("egress:\n- toGroups: [{aws: {securityGroupsIds: sg-1}}]\n",
     "policy.yaml:8: egress[0].toGroups[0].aws.securityGroupsIds: expected a list, got string"),
    ("ingress:\n- toPorts: [{ports: [{port: '11211'}], rules: {l7proto: memcache, l7: {command: get}}}]\n",
     "policy.yaml:8: ingress[0].toPorts[0].rules.l7: expected a list, got mapping"),
    ("ingress:\n- icmps: [{fields: [{type: '٨'}]}]\n",
     "policy.yaml:8: ingress[0].icmps[0].fields[0].type: '٨' is not an IPv4 ICMP type number (0-255) or name"),
])
def test_a_scalar_where_a_list_belongs(body: str, expected: str) -> None:
    assert spec_problems(body) == [expected]


RICH_POLICY = {
    "apiVersion": "cilium.io/v2",
    "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "p", "namespace": "prod", "labels": {"a": "b"}},
    "spec": {
        "endpointSelector": {"matchLabels": {"app": "web"},
                             "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
        "labels": [{"key": "k", "value": "v", "source": "k8s"}, "x=y"],
        "enableDefaultDeny": {"ingress": True},
        "ingress": [
            {"fromEndpoints": [{"matchLabels": {"app": "client"}}], "fromRequires": [{}],
             "toPorts": [{"ports": [{"port": "80", "endPort": 90, "protocol": "TCP"}],
                          "rules": {"http": [{"method": "GET", "path": "/", "headers": ["X-A: 1"],
                                              "headerMatches": [{"name": "X-B", "value": "2"}]}]}}]},
            {"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}],
             "icmps": [{"fields": [{"type": 8, "family": "IPv4"}]}]},
            {"toPorts": [{"ports": [{"port": "9092", "protocol": "TCP"}],
                          "rules": {"kafka": [{"role": "produce", "topic": "t"}]}},
                         {"ports": [{"port": "9042", "protocol": "TCP"}],
                          "rules": {"l7proto": "cassandra", "l7": [{"query_action": "select"}]}}]},
        ],
        "ingressDeny": [{"fromEntities": ["world"], "toPorts": [{"ports": [{"port": "22"}]}]}],
        "egress": [
            {"toFQDNs": [{"matchName": "a.com"}]},
            {"toServices": [{"k8sService": {"serviceName": "db"}}]},
            {"toEndpoints": [{}], "toPorts": [{"ports": [{"port": "53", "protocol": "ANY"}],
                                               "rules": {"dns": [{"matchPattern": "*.a.com"}]}}]},
            {"toPorts": [{"ports": [{"port": "443"}], "serverNames": ["a.com"],
                          "terminatingTLS": {"secret": {"name": "s"}},
                          "listener": {"envoyConfig": {"name": "c"}, "name": "l"}}]},
            {"toGroups": [{"aws": {"securityGroupsIds": ["sg"]}}]},
        ],
    },
}
WRONG_VALUES: list[object] = [None, 70000, {"a": [1]}]  # null, a scalar, a mapping


def _paths(value: object, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, child in value.items():
            out.extend(_paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            out.extend(_paths(child, (*prefix, i)))
    return out


def _replaced(doc: object, path: tuple[str | int, ...], new: object) -> object:
    if not path:
        return new
    if isinstance(doc, dict):
        return {k: _replaced(v, path[1:], new) if k == path[0] else v for k, v in doc.items()}
    assert isinstance(doc, list)
    return [_replaced(v, path[1:], new) if i == path[0] else v for i, v in enumerate(doc)]


def test_a_wrong_value_anywhere_is_a_problem_never_a_crash() -> None:
    assert parse_text(json.dumps(RICH_POLICY), "p.json").ok
    for path in _paths(RICH_POLICY):
        for value in WRONG_VALUES:
            text = json.dumps(_replaced(RICH_POLICY, path, value))  # JSON is YAML
            result = parse_text(text, "p.json")  # must not raise
            assert not (result.policies and result.problems), (path, value)

"""``trace``: the JSON contract, the text report, and what a flow without a port means."""

from __future__ import annotations

import json
import textwrap

from cilia.policy import HTTPRequest, Policy, Protocol, parse_text
from tests.helpers import cilium_examples_dir, run

TCP, UDP, SCTP, ICMP = Protocol.TCP, Protocol.UDP, Protocol.SCTP, Protocol.ICMP
TIEFIGHTER = "org=empire,class=tiefighter"
XWING = "org=alliance,class=xwing"
DEATHSTAR = "org=empire,class=deathstar"


def example(name: str) -> list[Policy]:
    result = parse_text((cilium_examples_dir() / name).read_text(encoding="utf-8"), name)
    assert result.ok, [str(p) for p in result.problems]
    return result.policies


def cnp(spec: str, filename: str = "test.yaml") -> list[Policy]:
    text = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n"
            + textwrap.indent(textwrap.dedent(spec).strip() + "\n", "  "))
    result = parse_text(text, filename)
    assert result.ok, [str(p) for p in result.problems]
    return result.policies




def where(rules: list[dict[str, object]]) -> list[str]:
    return [f"{r['file']}:{r['line']}" for r in rules]


# --- JSON ------------------------------------------------------------------------------


def test_json_of_an_allowed_l7_request() -> None:
    result = run(example("sw_l3_l4_l7_policy.yaml"), TIEFIGHTER, DEATHSTAR,
                 l7=HTTPRequest("POST", "/v1/request-landing"))
    out = json.loads(json.dumps(result.to_json()))  # plain JSON, nothing exotic
    assert out["verdict"] == "allowed"
    assert (out["egress"]["verdict"], out["ingress"]["verdict"]) == ("allowed", "allowed")
    assert out["ingress"]["enforced"] is True and out["egress"]["enforced"] is False
    assert out["ingress"]["l7_protocol"] == "http" and out["ingress"]["l7_verdict"] == "allowed"
    # the L4 entry's rule and the HTTP rule that matched, each with its line
    assert where(out["ingress"]["deciding_rules"]) == ["sw_l3_l4_l7_policy.yaml:16",
                                                       "sw_l3_l4_l7_policy.yaml:21"]
    l7_rule = out["ingress"]["deciding_rules"][1]
    assert l7_rule["policy"] == "default/rule1" and "POST" in l7_rule["l7"]
    assert where(out["ingress"]["selecting_rules"]) == ["sw_l3_l4_l7_policy.yaml:5"]
    for rule in out["ingress"]["deciding_rules"]:
        assert rule in out["deciding_rules"]
    assert out["source"]["identity"] != out["destination"]["identity"]
    assert out["protocol"] == "TCP" and out["dport"] == 80
    assert out["notes"] == []


def test_json_of_a_denied_l7_request() -> None:
    out = run(example("sw_l3_l4_l7_policy.yaml"), TIEFIGHTER, DEATHSTAR,
              l7=HTTPRequest("PUT", "/v1/exhaust-port")).to_json()
    assert out["verdict"] == "denied"
    assert out["ingress"]["verdict"] == "denied" and out["ingress"]["l7_verdict"] == "denied"
    assert out["egress"]["verdict"] == "allowed"
    assert "sw_l3_l4_l7_policy.yaml:16" in where(out["ingress"]["deciding_rules"])


def test_json_of_default_deny_names_the_rule_that_selected_the_endpoint() -> None:
    out = run(example("sw_l3_l4_l7_policy.yaml"), XWING, DEATHSTAR).to_json()
    assert out["verdict"] == "denied"
    assert out["ingress"]["verdict"] == "denied"
    assert out["ingress"]["entry"] is None
    assert where(out["ingress"]["deciding_rules"]) == ["sw_l3_l4_l7_policy.yaml:5"]


def test_json_of_a_deny_rule() -> None:
    out = run(example("from_world_deny.yaml"), "8.8.8.8", "app=web").to_json()
    assert out["verdict"] == "denied"
    assert out["source"]["cidr"] == "8.8.8.8" and out["source"]["identity"] == 9
    assert out["egress"]["evaluated"] is False  # outside the cluster: no policy of ours
    assert out["ingress"]["entry"]["verdict"] == "deny"
    assert where(out["ingress"]["deciding_rules"]) == ["from_world_deny.yaml:8"]
    assert out["ingress"]["deciding_rules"][0]["path"] == "ingressDeny[0]"


def test_json_notes() -> None:
    out = run(example("service.yaml"), "id=app2", "8.8.8.8").to_json()
    assert out["verdict"] == "denied"
    assert len(out["notes"]) == 1 and out["notes"][0].startswith("service.yaml:10: toServices")


def test_json_per_direction_when_egress_denies() -> None:
    out = run(example("l4_port_range.yaml"), "app=myService", "app=db", TCP, 8080).to_json()
    assert (out["verdict"], out["egress"]["verdict"], out["ingress"]["verdict"]) == (
        "denied", "denied", "allowed")


# --- text --------------------------------------------------------------------------------


def test_text_of_an_allowed_flow() -> None:
    text = run(example("sw_l3_l4_l7_policy.yaml"), TIEFIGHTER, DEATHSTAR,
               l7=HTTPRequest("POST", "/v1/request-landing")).render()
    assert text.rstrip().endswith("Final verdict: ALLOWED")
    assert "default/rule1 spec (sw_l3_l4_l7_policy.yaml:5): selected" in text
    assert "(sw_l3_l4_l7_policy.yaml:16)" in text
    assert "(sw_l3_l4_l7_policy.yaml:21)" in text
    assert "80/TCP" in text


def test_text_of_a_denied_flow() -> None:
    text = run(example("sw_l3_l4_l7_policy.yaml"), XWING, DEATHSTAR).render()
    assert text.rstrip().endswith("Final verdict: DENIED")
    assert "sw_l3_l4_l7_policy.yaml:5" in text
    assert "Ingress verdict: denied" in text


def test_text_lists_notes() -> None:
    text = run(_authenticated(), "app=test-app", "8.8.8.8").render()
    assert "auth.yaml:7: authentication not enforced yet" in text
    assert "Final verdict: DENIED" in text


# --- no --dport: every port must be allowed ------------------------------------------------


def test_without_a_port_every_port_must_be_allowed() -> None:
    policies = example("sw_l3_l4_policy.yaml")
    result = run(policies, TIEFIGHTER, DEATHSTAR, TCP, None)
    assert not result.allowed
    assert result.ingress.partial_ports == ["80/TCP"]
    assert result.to_json()["ingress"]["allowed_ports"] == ["80/TCP"]
    assert "80/TCP" in result.render()
    # with the port it is allowed
    assert run(policies, TIEFIGHTER, DEATHSTAR, TCP, 80).allowed


def test_without_a_port_ranges_are_listed_merged() -> None:
    result = run(example("l4_port_range.yaml"), "app=myService", "8.8.8.8", TCP, None)
    assert not result.allowed
    assert result.egress.partial_ports == ["80-444/TCP"]


def test_without_a_port_a_port_free_allow_is_allowed() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: db}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: web}}]
    """)
    for protocol in (TCP, UDP, SCTP, ICMP):
        assert run(policies, "app=web", "app=db", protocol, None).allowed, protocol
    assert not run(policies, "app=x", "app=db", TCP, None).allowed


def test_without_a_port_one_denied_port_denies() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: db}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: web}}]
        ingressDeny:
        - toPorts: [{ports: [{port: "22", protocol: TCP}]}]
    """)
    result = run(policies, "app=web", "app=db", TCP, None)
    assert not result.allowed
    assert result.ingress.partial_ports == ["0-21/TCP", "23-65535/TCP"]
    assert run(policies, "app=web", "app=db", UDP, None).allowed


def test_without_a_type_every_icmp_type_must_be_allowed() -> None:
    result = run(example("icmp.yaml"), "app=myService", "8.8.8.8", ICMP, None)
    assert not result.allowed
    assert result.egress.partial_ports == ["8/ICMP"]


# --- protocol any ---------------------------------------------------------------------------


def test_protocol_any_evaluates_tcp_udp_and_sctp() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: dns}}
        ingress:
        - toPorts: [{ports: [{port: "53", protocol: TCP}, {port: "53", protocol: UDP}]}]
    """)
    result = run(policies, "app=client", "app=dns", Protocol.ANY, 53)
    assert [r.request.protocol for r in result.per_protocol] == [TCP, UDP, SCTP]
    assert [r.verdict for r in result.per_protocol] == ["allowed", "allowed", "denied"]
    assert not result.allowed
    out = result.to_json()
    assert out["verdict"] == "denied"
    assert [(p["protocol"], p["verdict"]) for p in out["per_protocol"]] == [
        ("TCP", "allowed"), ("UDP", "allowed"), ("SCTP", "denied")]
    assert out["ingress"]["verdict"] == "denied"  # the top level shows a denied protocol
    assert "Final verdict: DENIED" in result.render()


def test_protocol_any_is_allowed_when_all_three_are() -> None:
    policies = cnp("""
        endpointSelector: {matchLabels: {app: dns}}
        ingress:
        - toPorts: [{ports: [{port: "53", protocol: ANY}]}]
    """)
    result = run(policies, "app=client", "app=dns", Protocol.ANY, 53)
    assert result.allowed
    assert [r.verdict for r in result.per_protocol] == ["allowed"] * 3
    assert result.to_json()["verdict"] == "allowed"
    assert not run(policies, "app=client", "app=dns", Protocol.ANY, 54).allowed


def _authenticated() -> list[Policy]:
    text = textwrap.dedent("""\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {name: auth}
        spec:
          endpointSelector: {matchLabels: {app: test-app}}
          egress:
          - toCIDR: [8.8.8.8/32]
            authentication: {mode: required}
        """)
    result = parse_text(text, "auth.yaml")
    assert result.ok, [str(p) for p in result.problems]
    return result.policies

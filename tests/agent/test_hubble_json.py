"""Flows in Hubble's JSON form, built from each source the agent records (Envoy's access log, the
kernel's events, the L7 parsers), held against Hubble's field list; Hubble-named filters; the
Cassandra version fallback recorded as a negotiation (TRACED), not a policy drop."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from tests.agent.hubble_fields import EXPORT_LINE, check

from cilia.agent.api import flow_filter
from cilia.agent.daemon import AgentError
from cilia.agent.daemon import Agent, AgentConfig
from cilia.agent.hubble import export_line
from cilia.agent.flows import Verdict, Who, from_access, from_datapath, from_l7
from cilia.agent.hubble import policy_match_type
from cilia.agent.metrics import Metrics
from cilia.bpf.datapath import DatapathEvent
from cilia.envoy.accesslog import AccessRecord
from cilia.envoy.accesslog import Verdict as EnvoyVerdict
from cilia.envoy.l7service import ConnectionInfo
from cilia.l7parsers.base import Decision, Record
from cilia.policy import Direction, DirectionMapState
from cilia.policy.labels import LabelSet
from cilia.policy.mapstate import L4Key, PolicyEntry
from cilia.policy.mapstate import Verdict as MapVerdict
from cilia.policy.model import Protocol
from cilia.specs import EndpointSpec, PortSpec

NOW = time.time()
WHO = Who({"tiefighter.default": (("10.0.0.11",), 300), "deathstar.default": (("10.0.0.10",), 301)},
          {300: LabelSet.parse(["k8s:org=empire", "k8s:io.kubernetes.pod.namespace=default"]),
           301: LabelSet.parse(["k8s:class=deathstar", "k8s:io.kubernetes.pod.namespace=default"])}, ())


def _http(denied: bool) -> AccessRecord:
    return AccessRecord(1, datetime.fromtimestamp(NOW, UTC), "http",
                        EnvoyVerdict.DENIED if denied else EnvoyVerdict.FORWARDED, "10.0.0.11", 40000,
                        "10.0.0.10", 80, "PUT", "/v1/exhaust-port", "deathstar", "HTTP/1.1", 403 if denied else 200,
                        log_name="deathstar-ingress-80", node_id="node1", rule="rule (p.yaml:16)")


def _kernel_drop() -> DatapathEvent:
    return DatapathEvent(NOW, "drop", "DROPPED", 133, "Policy denied", "ingress", "TCP", "10.0.0.11", 40001,
                         "10.0.0.10", 80, 300, 301, 7, 0, "default deny", 3, 74)


def _l7(protocol: str, summary: dict[str, str], decision: Decision, handshake: bool = False) -> Record:
    return Record(summary, decision, handshake)


INFO = ConnectionInfo("deathstar-ingress-9092", "ingress", 9092, "kafka", "deathstar.default", 300,
                      "10.0.0.11:51000", "10.0.0.10:9092")


def test_every_source_renders_as_hubble_flow_json() -> None:
    flows = [from_access(_http(True), WHO), from_access(_http(False), WHO), from_datapath(_kernel_drop(), WHO, "n1"),
             from_l7(NOW, INFO, _l7("kafka", {"api_key": "produce", "api_version": "5", "topic": "deathstar-plans",
                                              "correlation_id": "7", "client_id": "c"},
                                     Decision(False, "", "no rule")), WHO, "n1")]
    lines = [export_line(f, i) for i, f in enumerate(flows, 1)]
    for line in lines:
        assert check(line, EXPORT_LINE) == [], line
    denied = lines[0]["flow"]
    assert denied["verdict"] == "DROPPED" and denied["Type"] == "L7" and denied["traffic_direction"] == "INGRESS"
    assert denied["l7"]["http"] == {"code": 403, "method": "PUT", "url": "http://deathstar/v1/exhaust-port",
                                    "protocol": "HTTP/1.1"}
    assert denied["source"] == {"identity": 300, "namespace": "default", "pod_name": "tiefighter",
                                "labels": ["k8s:io.kubernetes.pod.namespace=default", "k8s:org=empire"]}
    assert denied["IP"] == {"ipVersion": "IPv4", "source": "10.0.0.11", "destination": "10.0.0.10"}
    assert denied["l4"] == {"TCP": {"source_port": 40000, "destination_port": 80}}
    assert denied["Summary"] == "HTTP/1.1 PUT http://deathstar/v1/exhaust-port => 403"
    assert lines[0]["cilia"]["rule"] == "rule (p.yaml:16)"  # what Hubble has no field for
    kernel = lines[2]["flow"]
    assert (kernel["drop_reason"], kernel["drop_reason_desc"], kernel["Type"]) == (133, "POLICY_DENIED", "L3_L4")
    assert kernel["event_type"] == {"type": 1, "sub_type": 133}
    kafka = lines[3]["flow"]
    assert kafka["l7"]["kafka"] == {"api_key": "produce", "api_version": 5, "topic": "deathstar-plans",
                                    "correlation_id": 7, "error_code": 29}
    # the L7 service's connection addresses: no more empty source and port 0
    assert kafka["IP"]["source"] == "10.0.0.11" and kafka["l4"]["TCP"] == {"source_port": 51000,
                                                                           "destination_port": 9092}


def test_cassandra_version_fallback_is_a_negotiation_not_a_drop() -> None:
    info = ConnectionInfo("db-ingress-9042", "ingress", 9042, "cassandra", "deathstar.default", 300,
                          "10.0.0.11:52000", "10.0.0.10:9042")
    record = Record({"opcode": "OPTIONS", "query_action": "", "query_table": "", "stream": "0"},
                    Decision(False, "", "protocol version 5 is refused so that the client falls back"), True)
    flow = from_l7(NOW, info, record, WHO, "n1")
    assert flow.verdict is Verdict.TRACED and flow.drop_reason == ""
    line = export_line(flow, 1)
    assert check(line, EXPORT_LINE) == [] and line["flow"]["verdict"] == "TRACED"
    assert "protocol version 5" in line["cilia"]["l7"]["negotiation"]


def test_hubble_named_filters() -> None:
    denied, kernel = from_access(_http(True), WHO), from_datapath(_kernel_drop(), WHO, "n1")
    cases = [({"pod": ["default/tiefighter"]}, True, True), ({"to_pod": ["default/tiefighter"]}, False, False),
             ({"from_pod": ["tie"]}, True, True), ({"namespace": ["prod"]}, False, False),
             ({"label": ["org=empire"]}, True, True), ({"from_label": ["class in (deathstar)"]}, False, False),
             ({"to_label": ["k8s:class=deathstar,!org"]}, True, True), ({"ip": ["10.0.0.10"]}, True, True),
             ({"port": ["40001"]}, False, True), ({"identity": ["301"]}, True, True),
             ({"type": ["l7"]}, True, False), ({"type": ["drop"]}, False, True),
             ({"http_status": ["4+"]}, True, False), ({"http_status": ["200"]}, False, False),
             ({"http_method": ["put"]}, True, False), ({"http_path": ["^/v1/ex"]}, True, False),
             ({"verdict": ["DROPPED"], "protocol": ["tcp"]}, True, True),
             ({"until_time": [str(NOW - 60)]}, False, False)]
    for query, want_http, want_kernel in cases:
        ff = flow_filter(query)
        assert (ff.matches(denied), ff.matches(kernel)) == (want_http, want_kernel), query


@pytest.mark.parametrize("query", [{"label": ["app in (a"]}, {"from_label": ["=x"]}, {"http_status": ["abc"]},
                                   {"http_path": ["("]}, {"port": ["70000"]}, {"since_time": ["yesterday"]}])
def test_bad_filters_are_400(query: dict[str, list[str]]) -> None:
    with pytest.raises(AgentError) as e:
        flow_filter(query)
    assert e.value.status == 400


def test_flow_metrics_count_hubbles_way() -> None:
    m = Metrics()
    negotiation = Record({"opcode": "OPTIONS"}, Decision(False, "", "protocol version 5 is refused"), True)
    flows = [from_access(_http(True), WHO), from_access(_http(False), WHO), from_datapath(_kernel_drop(), WHO, "n1"),
             from_l7(NOW, INFO, negotiation, WHO, "n1")]
    for f in flows:
        m.flow(f)
    m.datapath(_kernel_drop())

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    assert value("cilia_hubble_flows_processed_total", type="L7", subtype="http", verdict="DROPPED") == 1
    assert value("cilia_hubble_flows_processed_total", type="L3_L4", subtype="drop", verdict="DROPPED") == 1
    assert value("cilia_hubble_flows_processed_total", type="L7", subtype="kafka", verdict="TRACED") == 1
    assert value("cilia_hubble_drop_total", reason="POLICY_DENIED", protocol="TCP") == 2  # not the negotiation
    assert value("cilia_hubble_http_requests_total", method="PUT", protocol="HTTP/1.1", status="403",
                 reporter="server") == 1
    assert value("cilia_drop_count_total", reason="Policy denied", direction="ingress") == 1
    assert value("cilia_drop_bytes_total", reason="Policy denied", direction="ingress") == 74
    assert value("process_cpu_seconds_total") is not None  # the process collector


MATCH_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deathstar, namespace: default}
spec:
  endpointSelector: {matchLabels: {class: deathstar}}
  ingress:
  - fromEndpoints: [{matchLabels: {class: xwing}}]
  - fromEndpoints: [{matchLabels: {class: tiefighter}}]
    toPorts: [{ports: [{port: "80", protocol: TCP}]}]
  - toPorts: [{ports: [{port: "9000", protocol: TCP}]}]
"""


def _connection(source: str, destination: str, port: int, log_name: str) -> AccessRecord:
    return AccessRecord(1, datetime.fromtimestamp(NOW, UTC), "tcp", EnvoyVerdict.FORWARDED, source, 40000,
                        destination, port, log_name=log_name, node_id="node1")


def test_policy_match_type_names_the_deciding_entry(tmp_path: Path) -> None:
    """Hubble's policy_match_type from the entry that decided: identity and port (L3-L4), identity
    and any port (L3-Only), any identity on a port (L4-Only), a direction no policy restricts
    (all); no entry (the default deny) leaves it out, and L7 flows do not have it."""
    agent = Agent(AgentConfig(tmp_path, envoy="external"))
    for name, labels, ip in (("deathstar", "class=deathstar", "10.0.0.10"), ("xwing", "class=xwing", "10.0.0.12"),
                             ("tiefighter", "class=tiefighter", "10.0.0.11"), ("probe", "class=probe", "10.0.0.13")):
        agent.add_endpoint(EndpointSpec(name, (labels,), (ip,), (PortSpec.parse("80:8080"),)))
    agent.import_policies([("match.yaml", MATCH_POLICY)])
    who = agent.observer.who
    cases = [("10.0.0.11", "10.0.0.10", 80, "deathstar-ingress-80", 2),  # tiefighter on 80: L3-L4
             ("10.0.0.12", "10.0.0.10", 80, "deathstar-ingress-80", 1),  # xwing, any port: L3-Only
             ("10.0.0.13", "10.0.0.10", 9000, "deathstar-ingress-9000", 3),  # anyone on 9000: L4-Only
             ("10.0.0.10", "10.0.0.13", 80, "probe-ingress-80", 4),  # no policy selects the probe: all
             ("10.0.0.13", "10.0.0.10", 80, "deathstar-ingress-80", 0)]  # nothing allows it: none
    for source, destination, port, log_name, expected in cases:
        line = export_line(from_access(_connection(source, destination, port, log_name), who), 1)
        assert check(line, EXPORT_LINE) == [], line
        assert line["flow"].get("policy_match_type", 0) == expected, (source, destination, port)
    assert "policy_match_type" not in export_line(from_access(_http(True), who), 1)["flow"]  # L7: no L3/L4 verdict


def test_policy_match_type_of_protocol_entries() -> None:
    """Entries of a protocol on any port: L3-Proto for an identity, Proto-Only for any."""
    entry = PolicyEntry(MapVerdict.ALLOW, None, ())
    tcp_any_port = L4Key(Protocol.TCP)
    state = DirectionMapState(Direction.INGRESS, True, {tcp_any_port: entry}, {300: {tcp_any_port: entry}})
    assert policy_match_type(state, 300, "TCP", 80) == 5
    assert policy_match_type(state, 301, "TCP", 80) == 6
    assert policy_match_type(state, 301, "UDP", 53) == 0

"""Hubble's ``flow.Flow`` as proto JSON, written down from Hubble's API documentation (the flow
and observer protocol references on docs.cilium.io): each message's fields with the JSON type
their proto type maps to, and the enums' value names. ``check`` says what in a JSON object does
not fit, so our export lines can be held against it.

JSON mapping used (proto3's): 32-bit numbers are JSON numbers, 64-bit ones strings, enums their
value names, Timestamps RFC 3339 strings, repeated fields lists, BoolValue a bool.
"""

from __future__ import annotations

from typing import Any

NUMBER, STRING, BOOL, U64 = "number", "string", "bool", "uint64"

VERDICTS = {"VERDICT_UNKNOWN", "FORWARDED", "DROPPED", "ERROR", "AUDIT", "REDIRECTED", "TRACED", "TRANSLATED"}
FLOW_TYPES = {"UNKNOWN_TYPE", "L3_L4", "L7", "SOCK"}
L7_TYPES = {"UNKNOWN_L7_TYPE", "REQUEST", "RESPONSE", "SAMPLE"}
DIRECTIONS = {"TRAFFIC_DIRECTION_UNKNOWN", "INGRESS", "EGRESS"}
IP_VERSIONS = {"IP_NOT_USED", "IPv4", "IPv6"}
# the drop reasons cilia can produce (Hubble's DropReason has many more)
DROP_REASONS = {"DROP_REASON_UNKNOWN", "INVALID_SOURCE_IP", "POLICY_DENIED", "POLICY_DENY"}

# Cilium's monitor API match types (a uint32 in the flow): none, L3-Only, L3-L4, L4-Only, all,
# L3-Proto, Proto-Only
POLICY_MATCH_TYPES = set(range(7))
PORTS = {"source_port": NUMBER, "destination_port": NUMBER}
ICMP = {"type": NUMBER, "code": NUMBER}
TCP = {**PORTS, "flags": {"FIN": BOOL, "SYN": BOOL, "RST": BOOL, "PSH": BOOL, "ACK": BOOL, "URG": BOOL,
                          "ECE": BOOL, "CWR": BOOL, "NS": BOOL}}
ENDPOINT = {"ID": NUMBER, "identity": NUMBER, "cluster_name": STRING, "namespace": STRING, "labels": [STRING],
            "pod_name": STRING, "workloads": [{"name": STRING, "kind": STRING}]}
POLICY = {"name": STRING, "namespace": STRING, "labels": [STRING], "revision": U64, "kind": STRING}
LAYER7 = {
    "type": L7_TYPES, "latency_ns": U64,
    "dns": {"query": STRING, "ips": [STRING], "ttl": NUMBER, "cnames": [STRING], "observation_source": STRING,
            "rcode": NUMBER, "qtypes": [STRING], "rrtypes": [STRING]},
    "http": {"code": NUMBER, "method": STRING, "url": STRING, "protocol": STRING,
             "headers": [{"key": STRING, "value": STRING}]},
    "kafka": {"error_code": NUMBER, "api_version": NUMBER, "api_key": STRING, "correlation_id": NUMBER,
              "topic": STRING},
}
FLOW: dict[str, Any] = {
    "time": STRING, "uuid": STRING, "verdict": VERDICTS, "drop_reason": NUMBER, "auth_type": STRING,
    "ethernet": {"source": STRING, "destination": STRING},
    "IP": {"source": STRING, "source_xlated": STRING, "destination": STRING, "ipVersion": IP_VERSIONS,
           "encrypted": BOOL},
    "l4": {"TCP": TCP, "UDP": PORTS, "SCTP": PORTS, "ICMPv4": ICMP, "ICMPv6": ICMP},
    "source": ENDPOINT, "destination": ENDPOINT, "Type": FLOW_TYPES, "node_name": STRING, "node_labels": [STRING],
    "source_names": [STRING], "destination_names": [STRING], "l7": LAYER7, "reply": BOOL,
    "event_type": {"type": NUMBER, "sub_type": NUMBER},
    "source_service": {"name": STRING, "namespace": STRING},
    "destination_service": {"name": STRING, "namespace": STRING},
    "traffic_direction": DIRECTIONS, "policy_match_type": POLICY_MATCH_TYPES, "trace_observation_point": STRING,
    "trace_reason": STRING, "drop_reason_desc": DROP_REASONS, "is_reply": BOOL,
    "debug_capture_point": STRING, "interface": {"index": NUMBER, "name": STRING}, "proxy_port": NUMBER,
    "sock_xlate_point": STRING, "socket_cookie": U64, "cgroup_id": U64, "Summary": STRING,
    "egress_allowed_by": [POLICY], "ingress_allowed_by": [POLICY], "egress_denied_by": [POLICY],
    "ingress_denied_by": [POLICY],
}
# observer.GetFlowsResponse / ExportEvent, as `hubble observe -o json` and Hubble's exporter write
# each line; "cilia" is our own sibling object for what Hubble has no field for
EXPORT_LINE: dict[str, Any] = {"flow": FLOW, "node_name": STRING, "time": STRING, "cilia": "object"}


def check(value: Any, spec: Any, path: str = "") -> list[str]:
    """What in ``value`` does not fit ``spec`` (empty: it fits)."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {value!r}"]
        problems = []
        for key, v in value.items():
            if key not in spec:
                problems.append(f"{path}.{key}: not a Hubble field")
            else:
                problems += check(v, spec[key], f"{path}.{key}")
        return problems
    if isinstance(spec, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {value!r}"]
        return [p for i, v in enumerate(value) for p in check(v, spec[0], f"{path}[{i}]")]
    if isinstance(spec, set):
        return [] if value in spec else [f"{path}: {value!r} is not one of {sorted(spec)}"]
    ok = {NUMBER: isinstance(value, int) and not isinstance(value, bool), STRING: isinstance(value, str),
          BOOL: isinstance(value, bool), U64: isinstance(value, str) and value.isdigit(),
          "object": isinstance(value, dict)}[spec]
    return [] if ok else [f"{path}: expected {spec}, got {value!r}"]

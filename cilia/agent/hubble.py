"""Flows in Hubble's JSON form, so tools that read Hubble's exports read ours.

Each line is what ``hubble observe -o json`` prints and Hubble's exporter writes: ``{"flow":
FLOW, "node_name": ..., "time": ...}``, FLOW being the JSON mapping of Hubble's ``flow.Flow`` with
its proto field names (``drop_reason_desc``, ``IP``, ``l4``, ``Type``, ``Summary``...) and, as
proto JSON does, fields without a value left out. What Hubble has no field for (the deciding rule
with file:line, our protocol summaries for Cassandra or Memcached, the listener) is in a sibling
object ``cilia``, outside the flow, so the flow itself holds only Hubble's fields.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..policy.mapstate import ANY_IDENTITY, MAX_PORT, DirectionMapState
from ..policy.model import Protocol

if TYPE_CHECKING:
    from .flow import Flow, Peer

# Our drop reasons (the datapath's texts, Envoy's refusals) as Hubble's DropReason: (code, name).
DROP_REASONS = {
    "Policy denied": (133, "POLICY_DENIED"),
    "Policy denied by denylist": (181, "POLICY_DENY"),
    "Invalid source ip": (132, "INVALID_SOURCE_IP"),
}
# Hubble's event types (Cilium's monitor message types) and L7 record type.
EVENT_DROP, EVENT_POLICY_VERDICT, EVENT_L7 = 1, 5, 129
NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace="
_L4 = {"TCP": "TCP", "UDP": "UDP", "SCTP": "SCTP", "ICMP": "ICMPv4", "ICMPV4": "ICMPv4", "ICMPV6": "ICMPv6"}


# Hubble's policy_match_type (Cilium's monitor API match types): how the entry that decided a
# connection's L3/L4 verdict is keyed; 0 (none: no entry, the default deny) is left out.
MATCH_NONE, MATCH_L3_ONLY, MATCH_L3_L4, MATCH_L4_ONLY, MATCH_ALL, MATCH_L3_PROTO, MATCH_PROTO_ONLY = range(7)
_PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP, "ICMP": Protocol.ICMP,
              "ICMPV4": Protocol.ICMP, "ICMPV6": Protocol.ICMPV6}


def policy_match_type(state: DirectionMapState, identity: int, protocol: str, port: int) -> int:
    """The match type of the entry of ``state`` deciding a connection from (ingress) or to (egress)
    ``identity`` on ``protocol``/``port``: a specific identity or any (the wildcard), a port
    range, a protocol with any port, or any protocol. A direction no policy enforces allows all."""
    if not state.enforced:
        return MATCH_ALL
    proto = _PROTOCOLS.get(protocol.upper())
    hit = state.lookup(identity, proto, port) if proto is not None else None
    if hit is None:
        return MATCH_NONE
    ident, key, _ = hit
    specific = ident != ANY_IDENTITY
    if key.port_lo != 0 or key.port_hi != MAX_PORT:
        return MATCH_L3_L4 if specific else MATCH_L4_ONLY
    if key.protocol is not Protocol.ANY:
        return MATCH_L3_PROTO if specific else MATCH_PROTO_ONLY
    return MATCH_L3_ONLY if specific else MATCH_ALL


def timestamp(t: float) -> str:
    """RFC 3339 in UTC with a Z, as proto JSON writes a Timestamp."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def endpoint(peer: Peer) -> dict[str, Any]:
    """Hubble's ``Endpoint``: identity, namespace and pod name (from the endpoint's name;
    Kubernetes pods are named ``POD.NAMESPACE`` here), labels as ``source:key=value``."""
    out: dict[str, Any] = {}
    if peer.identity is not None:
        out["identity"] = peer.identity
    namespace = next((label[len(NAMESPACE_LABEL):] for label in peer.labels if label.startswith(NAMESPACE_LABEL)), "")
    if namespace:
        out["namespace"] = namespace
    if peer.labels:
        out["labels"] = list(peer.labels)
    if peer.endpoint:
        suffix = f".{namespace}"
        out["pod_name"] = peer.endpoint[:-len(suffix)] if namespace and peer.endpoint.endswith(suffix) \
            else peer.endpoint
    return out


def pod_name(peer: Peer) -> tuple[str, str]:
    """(namespace, pod) as Hubble names the side, for filters."""
    ep = endpoint(peer)
    return ep.get("namespace", ""), ep.get("pod_name", "")


def _ip(f: Flow) -> dict[str, Any] | None:
    src, dst = f.source.address, f.destination.address
    if not src and not dst:
        return None
    version = 4
    for a in (src, dst):
        try:
            version = ipaddress.ip_address(a).version if a else version
        except ValueError:
            pass
    out: dict[str, Any] = {"ipVersion": f"IPv{version}"}
    if src:
        out["source"] = src
    if dst:
        out["destination"] = dst
    return out


def _l4(f: Flow) -> dict[str, Any]:
    name = _L4.get(f.l4_protocol.upper())
    if name is None:
        return {}
    if name.startswith("ICMP"):  # the datapath gives an ICMP message's type as its destination port
        return {name: {"type": f.destination.port}} if f.destination.port else {name: {}}
    ports = {k: v for k, v in (("source_port", f.source.port), ("destination_port", f.destination.port)) if v}
    return {name: ports}


def _kafka(l7: dict[str, Any], denied: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("api_version", "correlation_id"):
        if str(l7.get(key, "")).lstrip("-").isdigit():
            out[key] = int(l7[key])
    if l7.get("api_key"):
        out["api_key"] = l7["api_key"]
    if l7.get("topic"):
        out["topic"] = l7["topic"]
    if denied:
        out["error_code"] = 29  # TOPIC_AUTHORIZATION_FAILED, what the proxy answers a denial with
    return out


_RCODES = {"NoError": 0, "FormErr": 1, "ServFail": 2, "NXDomain": 3, "NotImp": 4, "Refused": 5}


def _dns(f: Flow, l7: dict[str, Any]) -> dict[str, Any]:
    """Hubble's ``flow.DNS`` (observation_source "proxy"): the answer the client got, or the query
    alone when nothing was answered (a dropped malformed packet)."""
    query = str(l7.get("query", ""))
    dns: dict[str, Any] = {"query": query + "." if query else "", "observation_source": "proxy"}
    if l7.get("qtype"):
        dns["qtypes"] = [l7["qtype"]]
    if l7.get("ips"):
        dns["ips"] = list(l7["ips"])
        dns["ttl"] = int(l7.get("ttl", 0))
    if l7.get("cnames"):
        dns["cnames"] = [c + "." for c in l7["cnames"]]
    rcode = l7.get("rcode")
    if not rcode:
        return {"type": "REQUEST", "dns": {k: v for k, v in dns.items() if v}}
    dns["rcode"] = _RCODES.get(str(rcode), 0)
    out: dict[str, Any] = {"type": "RESPONSE", "dns": {k: v for k, v in dns.items() if v not in ("", [], None)}}
    if f.latency:
        out["latency_ns"] = str(int(f.latency * 1e9))
    return out


def _layer7(f: Flow) -> dict[str, Any] | None:
    if f.type != "L7":
        return None
    l7 = dict(f.l7)
    denied = f.verdict.value == "DROPPED"
    if f.kind == "http":
        status = l7.get("status")
        url = f"http://{l7.get('host', '')}{l7.get('path', '')}"
        http: dict[str, Any] = {"method": l7.get("method", ""), "url": url, "protocol": l7.get("protocol", "")}
        if isinstance(status, int) and status:
            http["code"] = status
        http = {k: v for k, v in http.items() if v not in ("", None)}
        out = {"type": "RESPONSE" if isinstance(status, int) and status and not denied else "REQUEST", "http": http}
        if f.latency:
            out["latency_ns"] = str(int(f.latency * 1e9))  # uint64: a string in proto JSON
        return out
    if f.kind == "kafka":
        return {"type": "REQUEST", "kafka": _kafka(l7, denied)}
    if f.kind == "dns":
        return _dns(f, l7)
    return {"type": "REQUEST"}  # Hubble has no record for this protocol: our summary is in "cilia"


def summary(f: Flow) -> str:
    """Hubble's one-line ``Summary``."""
    l7 = f.l7
    if f.kind == "http":
        what = f"{l7.get('protocol') or 'HTTP'} {l7.get('method')} http://{l7.get('host', '')}{l7.get('path', '')}"
        status = l7.get("status")
        return what + (f" => {status}" if status else "")
    if f.kind == "dns":  # Hubble's wording: DNS Query / DNS Answer ... (Proxy NAME TYPE)
        name, qtype, rcode = f"{l7.get('query', '')}.", l7.get("qtype", ""), l7.get("rcode", "")
        if not rcode:
            return f"DNS Query {name} {qtype}".strip() + (f" ({f.drop_reason})" if f.drop_reason else "")
        answer = ",".join(l7.get("ips", ()))
        what = f"DNS Answer \"{answer}\" TTL: {l7.get('ttl', 0)}" if answer else f"DNS Answer RCode: {rcode}"
        return f"{what} (Proxy {name} {qtype})" + (f" ({f.drop_reason})" if f.drop_reason else "")
    if f.type == "L7":
        fields = " ".join(f"{k}={v}" for k, v in l7.items() if v)
        return f"{f.kind} {fields}".strip() + (f" ({f.drop_reason})" if f.drop_reason else "")
    what = f.l4_protocol
    if f.proxy_port:
        what += f" to proxy port {f.proxy_port}"
    return what + (f" ({f.drop_reason})" if f.drop_reason else "")


def hubble_flow(f: Flow) -> dict[str, Any]:
    """The JSON mapping of Hubble's ``flow.Flow`` for ``f`` (fields without a value omitted)."""
    out: dict[str, Any] = {"time": timestamp(f.time), "verdict": f.verdict.value}
    reason = DROP_REASONS.get(f.drop_reason) if f.type == "L3_L4" else None
    if reason is not None and f.verdict.value in ("DROPPED", "AUDIT"):
        out["drop_reason"], out["drop_reason_desc"] = reason
    if (ip := _ip(f)) is not None:
        out["IP"] = ip
    if l4 := _l4(f):
        out["l4"] = l4
    for side, peer in (("source", f.source), ("destination", f.destination)):
        if ep := endpoint(peer):
            out[side] = ep
    namespace, name = f.service
    if f.service_frontend and name:
        out["destination_service"] = {"name": name, **({"namespace": namespace} if namespace else {})}
    out["Type"] = f.type
    if f.node:
        out["node_name"] = f.node
    if (l7 := _layer7(f)) is not None:
        out["l7"] = l7
    if f.type == "L7":
        event = {"type": EVENT_L7}
    elif reason is not None and f.verdict.value == "DROPPED":
        event = {"type": EVENT_DROP, "sub_type": reason[0]}
    else:
        event = {"type": EVENT_POLICY_VERDICT}
    out["event_type"] = event
    if f.direction in ("ingress", "egress"):
        out["traffic_direction"] = f.direction.upper()
    out["is_reply"] = False  # every flow here is a request or a connection's first packet
    if f.match_type and f.type == "L3_L4":
        out["policy_match_type"] = f.match_type
    if f.proxy_port:
        out["proxy_port"] = f.proxy_port
    out["Summary"] = summary(f)
    return out


def extra(f: Flow, seq: int) -> dict[str, Any]:
    """What Hubble has no field for."""
    out: dict[str, Any] = {"seq": seq, "kind": f.kind, "rule": f.rule}
    for key, value in (("endpoint", f.endpoint), ("listener", f.listener), ("drop_reason", f.drop_reason),
                       ("service_frontend", f.service_frontend)):
        if value:
            out[key] = value
    if f.l7:
        out["l7"] = dict(f.l7)
    return out


def export_line(f: Flow, seq: int) -> dict[str, Any]:
    """One flow as Hubble's exporter writes it, plus our ``cilia`` object."""
    out: dict[str, Any] = {"flow": hubble_flow(f)}
    if f.node:
        out["node_name"] = f.node
    out["time"] = out["flow"]["time"]
    out["cilia"] = extra(f, seq)
    return out

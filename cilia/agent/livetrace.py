"""``POST /v1/policies/trace``: ``cilia.policy.trace`` of one flow against the policies the agent
holds, between its endpoints (named; their labels and named ports as the agent has them) or
labels and outside addresses given in the request.

The body: ``{"source": PEER, "destination": PEER, "protocol": "tcp", "dport": 80, "l7": {...},
"destination_named_ports": ["NAME=PORT/PROTO", ...]}`` where PEER is ``{"endpoint": NAME}``,
``{"labels": ["k8s:app=x", ...]}``, ``{"address": IP}`` or ``{"fqdn": NAME}`` (a name the DNS proxy
learned: its first address). Named ports given in the request override the destination endpoint's
own. toFQDNs selectors select what the agent learned. A destination address that is a service's
frontend is traced to the backend a new connection would get (the trace's ``service`` says which and why).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from ..policy import Identity, LabelSet, MemoryAllocator, Peer, Policy, PolicyError, Protocol, TraceRequest, trace
from ..policy.l7.dns import normalize
from ..policy.trace import PROTOCOL_NAMES, l7_request_from_json
from ..services.model import Service
from ..specs import EndpointSpec, PortSpec, StateError


class TraceInputError(ValueError):
    """A request that cannot be traced; ``status`` 404 when it names an unknown endpoint."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _named_ports(ports: Sequence[PortSpec]) -> tuple[tuple[str, int, Protocol], ...]:
    return tuple((p.name, p.port, p.protocol) for p in ports if p.name)


def _peer(side: str, d: Any, endpoints: Mapping[str, EndpointSpec],
          learned: Mapping[str, frozenset[str]] | None = None) -> Peer:
    if not isinstance(d, dict) or len(d) != 1 or next(iter(d)) not in ("endpoint", "labels", "address", "fqdn"):
        raise TraceInputError(f"{side}: expected one of {{\"endpoint\": NAME}}, {{\"labels\": [...]}}, "
                              "{\"address\": IP}, {\"fqdn\": NAME}")
    if "fqdn" in d:
        name = normalize(str(d["fqdn"]))
        ips = (learned or {}).get(name)
        if not ips:
            raise TraceInputError(f"{side}.fqdn: {name!r} has not been learned (cilia fqdn cache list)", 404)
        first = min(ips, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))
        return Peer(address=ipaddress.ip_address(first), fqdn=name)
    try:
        if "endpoint" in d:
            spec = endpoints.get(str(d["endpoint"]))
            if spec is None:
                raise TraceInputError(f"{side}: no endpoint named {d['endpoint']}", 404)
            return _endpoint_peer(spec)
        if "labels" in d:
            labels = d["labels"]
            if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
                raise TraceInputError(f"{side}.labels: expected a non-empty list of strings")
            return Peer(labels=LabelSet.parse(labels))
        return Peer(address=ipaddress.ip_address(str(d["address"])))
    except PolicyError as e:
        raise TraceInputError(f"{side}.labels: {e}") from None
    except ValueError as e:
        if isinstance(e, TraceInputError):
            raise
        raise TraceInputError(f"{side}.address: {e}") from None


def _endpoint_peer(spec: EndpointSpec) -> Peer:
    return Peer(labels=LabelSet.parse(list(spec.labels)), named_ports=_named_ports(spec.ports),
                ips=tuple(ipaddress.ip_address(ip) for ip in spec.ips))


def parse_request(body: Any, endpoints: Mapping[str, EndpointSpec],
                  learned: Mapping[str, frozenset[str]] | None = None) -> TraceRequest:
    if not isinstance(body, dict):
        raise TraceInputError("body: expected a JSON object")
    src = _peer("source", body.get("source"), endpoints, learned)
    dst = _peer("destination", body.get("destination"), endpoints, learned)
    proto_name = str(body.get("protocol", "tcp")).lower()
    proto = PROTOCOL_NAMES.get(proto_name)
    if proto is None:
        raise TraceInputError(f"protocol: {proto_name!r} is not one of {', '.join(sorted(PROTOCOL_NAMES))}")
    dport = body.get("dport")
    if dport is not None and (not isinstance(dport, int) or not 0 <= dport <= 65535):
        raise TraceInputError("dport: expected a port number 0-65535")
    named = body.get("destination_named_ports", [])
    if not isinstance(named, list):
        raise TraceInputError("destination_named_ports: expected a list of NAME=PORT/PROTO")
    if named:
        if dst.labels is None:
            raise TraceInputError("destination_named_ports: the destination is an address, not an endpoint")
        try:
            specs = [PortSpec.parse(str(n)) for n in named]
        except StateError as e:
            raise TraceInputError(f"destination_named_ports: {e}") from None
        if any(not s.name for s in specs):
            raise TraceInputError("destination_named_ports: each needs a NAME=")
        given = _named_ports(specs)
        kept = tuple(p for p in dst.named_ports if p[0] not in {g[0] for g in given})
        dst = Peer(labels=dst.labels, named_ports=kept + given, ips=dst.ips)
    try:
        l7 = l7_request_from_json(body.get("l7"))
    except ValueError as e:
        raise TraceInputError(str(e)) from None
    return TraceRequest(src, dst, proto, dport, l7)


def trace_live(policies: Sequence[Policy], endpoints: Mapping[str, EndpointSpec], identities: Sequence[Identity],
               body: Any, services: Sequence[Service] = (),
               learned: Mapping[str, frozenset[str]] | None = None) -> dict[str, Any]:
    """The trace's JSON (``TraceResult.to_json``) plus ``text``, its explanation as the CLI prints it;
    identities are the agent's (labels it has no identity for get one private to the trace). A
    destination address that is one of ``services``' frontends is traced to its backend.
    ``learned``: the DNS names the agent learned and their addresses (toFQDNs)."""
    backends = {ip: _endpoint_peer(spec) for spec in endpoints.values() for ip in spec.ips}
    result = trace(policies, parse_request(body, endpoints, learned), allocator=MemoryAllocator.copy_of(identities),
                   services=services, backends=backends, fqdn=learned)
    return {**result.to_json(), "text": result.render()}

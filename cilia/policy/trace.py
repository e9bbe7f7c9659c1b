"""``cilia policy trace``: a flow through the same resolution that enforcement uses.

The source's egress and the destination's ingress are each resolved by a
``PolicyEngine`` into map states and looked up exactly as the datapath does; a
redirect entry is then decided by the same L7 matchers the parsers call. The
answer names every rule that decided it, with file and line.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .engine import Endpoint, EndpointPolicy, PolicyEngine
from .identity import Identity, MemoryAllocator
from .flows import DNSRequest, GenericL7Request, HTTPRequest, KafkaRequest, L7Request
from .l7 import kafka as l7kafka
from .l7.evaluate import L7Verdict, describe_rule, evaluate
from .l7.registry import L7Registry
from .labels import LabelSet
from .mapstate import ANY_IDENTITY, MAX_PORT, DirectionMapState, L4Key, PolicyEntry, RuleOrigin, Verdict
from .model import PORT_PROTOCOLS, Direction, Policy, Protocol
from ..services.choose import Choice, choose, find
from ..services.model import Service

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

PROTOCOL_NAMES = {
    "tcp": Protocol.TCP, "udp": Protocol.UDP, "sctp": Protocol.SCTP,
    "icmp": Protocol.ICMP, "icmpv6": Protocol.ICMPV6, "any": Protocol.ANY,
}


@dataclass(frozen=True, slots=True)
class Peer:
    """One side of a traced flow: an endpoint (labels) or an outside address."""

    labels: LabelSet | None = None
    address: IPAddress | None = None
    # (name, port, protocol) the endpoint serves: what a policy's named ports resolve to
    named_ports: tuple[tuple[str, int, Protocol], ...] = ()
    ips: tuple[IPAddress, ...] = ()  # an endpoint's addresses (toServices knows backends by address)
    fqdn: str | None = None  # the learned DNS name ``address`` was given as

    def describe(self) -> str:
        if self.labels is not None:
            return "[" + ", ".join(str(label) for label in self.labels.labels()) + "]"
        return f"{self.fqdn} ({self.address})" if self.fqdn else str(self.address)


@dataclass(frozen=True, slots=True)
class TraceRequest:
    src: Peer
    dst: Peer
    protocol: Protocol = Protocol.TCP
    dport: int | None = None  # None: every port (or, for ICMP, every type)
    l7: L7Request | None = None


@dataclass
class DirectionTrace:
    direction: Direction
    evaluated: bool  # False when that side is outside the cluster (no policy of ours)
    enforced: bool = False
    selecting: list[RuleOrigin] = field(default_factory=list)
    total_rules: int = 0
    allowed: bool = True
    reason: str = ""
    entry: tuple[int, L4Key, PolicyEntry] | None = None
    l7: L7Verdict | None = None
    l7_protocol: str | None = None  # set when the flow is handed to an L7 proxy
    deciding: list[dict[str, Any]] = field(default_factory=list)
    partial_ports: list[str] = field(default_factory=list)  # allowed ports when not all are


@dataclass
class TraceResult:
    request: TraceRequest
    src_identity: Identity
    dst_identity: Identity
    egress: DirectionTrace
    ingress: DirectionTrace
    notes: list[str]
    per_protocol: list[TraceResult] = field(default_factory=list)
    service: Choice | None = None  # the destination was a service's frontend: the backend traced instead

    @property
    def allowed(self) -> bool:
        if self.per_protocol:
            return all(r.allowed for r in self.per_protocol)
        return self.egress.allowed and self.ingress.allowed

    @property
    def verdict(self) -> str:
        return "allowed" if self.allowed else "denied"

    def to_json(self) -> dict[str, Any]:
        main = self._main()
        out = {
            "verdict": self.verdict,
            "source": _peer_json(self.request.src, self.src_identity),
            "destination": _peer_json(self.request.dst, self.dst_identity),
            "protocol": self.request.protocol.label,
            "dport": self.request.dport,
            "l7": l7_request_json(self.request.l7),
            "egress": _direction_json(main.egress),
            "ingress": _direction_json(main.ingress),
            "deciding_rules": main.egress.deciding + main.ingress.deciding,
            "notes": self.notes,
            "service": self.service.to_json() if self.service is not None else None,
        }
        if self.per_protocol:
            out["per_protocol"] = [
                {"protocol": r.request.protocol.label, "verdict": r.verdict,
                 "egress": _direction_json(r.egress), "ingress": _direction_json(r.ingress)}
                for r in self.per_protocol
            ]
        return out

    def _main(self) -> TraceResult:
        if not self.per_protocol:
            return self
        return next((r for r in self.per_protocol if not r.allowed), self.per_protocol[0])

    def render(self) -> str:
        return render_text(self)


def trace(policies: Sequence[Policy], request: TraceRequest, registry: L7Registry | None = None,
          allocator: MemoryAllocator | None = None, services: Sequence[Service] | None = None,
          backends: Mapping[str, Peer] | None = None,
          fqdn: Mapping[str, Iterable[str]] | None = None) -> TraceResult:
    """Trace one flow against ``policies`` (identities from ``allocator``: a fresh one by default,
    a copy of the agent's for a live trace). ``services``: what toServices selects from (None: not
    known, toServices fails closed), and a destination address that is a frontend is traced to
    the backend the load balancer would choose; ``backends``: the endpoints holding backend
    addresses (address -> peer), else a backend is an outside address. ``fqdn``: names the DNS
    proxy learned and their addresses, what toFQDNs selectors select."""
    engine = PolicyEngine(allocator or MemoryAllocator())
    choice: Choice | None = None
    if services is not None:
        engine.set_services(services)
        request, choice = _through_service(request, services, backends or {})
        if choice is not None and choice.backend is None:
            return _no_backend(engine, request, choice)
    engine.apply(policies)
    if fqdn:
        engine.update_fqdn(fqdn)
    total = sum(len(p.rules) for p in policies)
    # Both endpoints exist before either policy is read: each one's map state
    # must already hold the other's identity.
    for name, peer in (("source", request.src), ("destination", request.dst)):
        if peer.labels is not None:
            engine.upsert_endpoint(Endpoint(name, peer.labels, peer.ips, named_ports=peer.named_ports))
    src_ep = _endpoint(engine, "source", request.src)
    dst_ep = _endpoint(engine, "destination", request.dst)
    src_id = _identity(engine, request.src, src_ep)
    dst_id = _identity(engine, request.dst, dst_ep)
    notes: list[str] = []
    for ep in (src_ep, dst_ep):
        if ep is not None:
            for note in ep.notes:
                text = str(note)
                if text not in notes:
                    notes.append(text)
    protocols = list(PORT_PROTOCOLS) if request.protocol is Protocol.ANY else [request.protocol]
    results = []
    for proto in protocols:
        egress = _trace_direction(Direction.EGRESS, src_ep, dst_id, proto, request, total, registry)
        ingress = _trace_direction(Direction.INGRESS, dst_ep, src_id, proto, request, total, registry)
        one = TraceRequest(request.src, request.dst, proto, request.dport, request.l7)
        results.append(TraceResult(one, src_id, dst_id, egress, ingress, notes))
    if len(results) == 1:
        results[0].service = choice
        return results[0]
    main = next((r for r in results if not r.allowed), results[0])
    return TraceResult(request, src_id, dst_id, main.egress, main.ingress, notes, results, choice)


def _through_service(request: TraceRequest, services: Sequence[Service],
                     backends: Mapping[str, Peer]) -> tuple[TraceRequest, Choice | None]:
    """A destination that is a frontend becomes the backend a new connection would get."""
    dst = request.dst
    if dst.address is None or request.protocol not in (Protocol.TCP, Protocol.UDP, Protocol.ANY):
        return request, None
    protocol = None if request.protocol is Protocol.ANY else request.protocol.name
    service = find(services, str(dst.address), request.dport, protocol)
    if service is None:
        return request, None
    choice = choose(service)
    proto = PROTOCOL_NAMES[service.frontend.protocol.lower()]
    if choice.backend is None:
        return TraceRequest(request.src, dst, proto, service.frontend.port, request.l7), choice
    address = choice.backend.address
    peer = backends.get(address) or Peer(address=ipaddress.ip_address(address))
    return TraceRequest(request.src, peer, proto, choice.backend.port, request.l7), choice


def _no_backend(engine: PolicyEngine, request: TraceRequest, choice: Choice) -> TraceResult:
    """No active backend: the load balancer drops the connection before any policy."""
    src = engine.allocator.allocate(request.src.labels) if request.src.labels is not None else \
        _identity(engine, request.src, None)
    dst = _identity(engine, request.dst, None)
    dropped = DirectionTrace(Direction.EGRESS, True, allowed=False, reason=choice.why)
    ingress = DirectionTrace(Direction.INGRESS, False, reason="not reached: no backend")
    return TraceResult(request, src, dst, dropped, ingress, [], service=choice)


def _endpoint(engine: PolicyEngine, name: str, peer: Peer) -> EndpointPolicy | None:
    if peer.labels is None:
        return None
    return engine.endpoint_policy(name)


def _identity(engine: PolicyEngine, peer: Peer, ep: EndpointPolicy | None) -> Identity:
    if ep is not None:
        return ep.identity
    assert peer.address is not None
    _, ident_id = engine.ipcache.lookup(peer.address)
    ident = engine.allocator.get(ident_id)
    assert ident is not None
    return ident


def _trace_direction(direction: Direction, ep: EndpointPolicy | None, peer: Identity, proto: Protocol,
                     request: TraceRequest, total: int, registry: L7Registry | None) -> DirectionTrace:
    if ep is None:
        side = "source" if direction is Direction.EGRESS else "destination"
        return DirectionTrace(direction, False, reason=f"the {side} is outside the cluster: no {direction} policy")
    dp = ep.selector_policy.direction(direction)
    dms = ep.map_state.direction(direction)
    out = DirectionTrace(direction, True, enforced=dp.enforced, total_rules=total,
                         selecting=[r.origin for r in dp.selecting])
    if request.dport is None:
        _trace_all_ports(out, dms, dp.selecting, peer, proto)
        return out
    hit = dms.lookup(peer.id, proto, request.dport)
    _decide_l4(out, hit, dp.selecting, direction)
    if not out.allowed or hit is None:
        return out
    entry = hit[2]
    if entry.verdict is Verdict.REDIRECT and entry.l7 is not None:
        out.l7_protocol = entry.l7.protocol
        if request.l7 is None:
            out.reason += f"; {entry.l7.protocol} rules apply on this port (give an L7 request to evaluate them)"
            return out
        verdict = evaluate(entry.l7, request.l7, registry)
        out.l7 = verdict
        if verdict.allowed:
            out.reason = f"{entry.l7.protocol} request {verdict.reason}"
            for rule, origin in verdict.matched:
                out.deciding.append(_l7_rule_json(entry.l7.protocol, rule, origin, registry))
        else:
            out.allowed = False
            out.reason = f"{entry.l7.protocol} request denied: {verdict.reason}"
            out.deciding = [_origin_json(o) for o in entry.origins if o.source]
            for rule, origin in entry.l7.rules:
                item = _l7_rule_json(entry.l7.protocol, rule, origin, registry)
                item["matched"] = False
                out.deciding.append(item)
    elif request.l7 is not None:
        out.reason += "; no L7 rules on this port, so every request passes"
    return out


def _decide_l4(out: DirectionTrace, hit: tuple[int, L4Key, PolicyEntry] | None,
               selecting: Sequence[Any], direction: Direction) -> None:
    out.entry = hit
    if hit is None:
        out.allowed = False
        out.reason = "no rule allows this flow (default deny)"
        out.deciding = [_origin_json(r.origin) for r in selecting if r.enables_default_deny(direction)]
        return
    entry = hit[2]
    if entry.verdict is Verdict.DENY:
        out.allowed = False
        out.reason = "denied by a deny rule (deny takes precedence over allow)"
    elif entry.verdict is Verdict.REDIRECT:
        out.reason = "allowed at L3/L4, redirected to the L7 proxy"
    else:
        out.reason = "allowed"
    out.deciding = [_origin_json(o) for o in entry.origins]


def _trace_all_ports(out: DirectionTrace, dms: DirectionMapState, selecting: Sequence[Any],
                     peer: Identity, proto: Protocol) -> None:
    """No port given: allowed only if every port (ICMP type) is allowed."""
    top = 255 if proto in (Protocol.ICMP, Protocol.ICMPV6) else MAX_PORT
    bounds = {0, top + 1}
    groups = [dms.any_group, dms.groups.get(peer.id, {})]
    for group in groups:
        for key in group:
            if key.protocol in (Protocol.ANY, proto):
                bounds.update((key.port_lo, min(key.port_hi, top) + 1))
    cuts = sorted(b for b in bounds if b <= top + 1)
    allowed_ranges, denied_hit = [], None
    first_allowed = None
    for lo, hi in zip(cuts, cuts[1:]):
        hit = dms.lookup(peer.id, proto, lo)
        ok = hit is not None and hit[2].verdict is not Verdict.DENY
        if ok:
            allowed_ranges.append(L4Key(proto, lo, hi - 1))
            first_allowed = first_allowed or hit
        elif denied_hit is None:
            denied_hit = (hit, lo)
    if denied_hit is None:
        _decide_l4(out, first_allowed, selecting, out.direction)
        out.reason = f"all {proto.label} ports allowed" + (
            "" if first_allowed is None or first_allowed[2].verdict is Verdict.ALLOW
            else " (L7 rules apply on some)")
        return
    _decide_l4(out, denied_hit[0], selecting, out.direction)
    out.allowed = False
    if allowed_ranges:
        out.partial_ports = [str(k) for k in _merge_ranges(allowed_ranges)]
        out.reason += f"; only {', '.join(out.partial_ports)} allowed (give --dport to trace one port)"


def _merge_ranges(keys: list[L4Key]) -> list[L4Key]:
    out: list[L4Key] = []
    for k in keys:
        if out and out[-1].port_hi + 1 == k.port_lo:
            out[-1] = L4Key(k.protocol, out[-1].port_lo, k.port_hi)
        else:
            out.append(k)
    return out


# ------------------------------------------------------------------ JSON / text


def _origin_json(o: RuleOrigin) -> dict[str, Any]:
    return {"policy": o.policy, "kind": o.kind, "path": o.path,
            "file": o.source.file if o.source else None, "line": o.source.line if o.source else None}


def _l7_rule_json(protocol: str, rule: Any, origin: RuleOrigin, registry: L7Registry | None) -> dict[str, Any]:
    out = _origin_json(origin)
    out["l7"] = f"{protocol}: {describe_rule(protocol, rule, registry)}"
    out["file"] = rule.source.file
    out["line"] = rule.source.line
    return out


def _peer_json(peer: Peer, ident: Identity) -> dict[str, Any]:
    out: dict[str, Any] = {"identity": ident.id, "identity_labels": ident.labels.to_list()}
    if peer.labels is not None:
        out["labels"] = peer.labels.to_list()
    else:
        out["cidr"] = str(peer.address)
    if peer.fqdn is not None:
        out["fqdn"] = peer.fqdn
    return out


def l7_request_json(req: L7Request | None) -> dict[str, Any] | None:
    if req is None:
        return None
    if isinstance(req, HTTPRequest):
        return {"protocol": "http", "method": req.method, "path": req.path, "host": req.host,
                "headers": [f"{k}: {v}" for k, v in req.headers]}
    if isinstance(req, KafkaRequest):
        return {"protocol": "kafka", "api_key": l7kafka.api_key_name(req.api_key),
                "api_version": req.api_version, "client_id": req.client_id, "topics": list(req.topics)}
    if isinstance(req, DNSRequest):
        return {"protocol": "dns", "name": req.name}
    assert isinstance(req, GenericL7Request)
    return {"protocol": req.protocol, "fields": req.as_dict()}


def l7_request_from_json(d: Any) -> L7Request | None:
    """The inverse of ``l7_request_json`` (how a live trace request travels to the agent);
    raises ValueError naming the bad field."""
    if d is None:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("protocol"), str):
        raise ValueError("l7: expected an object with a protocol")
    proto = d["protocol"]
    try:
        if proto == "http":
            headers = []
            for h in d.get("headers", []):
                name, sep, value = str(h).partition(":")
                if not sep:
                    raise ValueError(f"l7.headers: {h!r}: expected 'Name: value'")
                headers.append((name.strip(), value.strip()))
            return HTTPRequest(str(d["method"]), str(d["path"]), str(d.get("host", "")), tuple(headers))
        if proto == "kafka":
            return KafkaRequest(l7kafka.parse_api_key(str(d["api_key"])), int(d.get("api_version", 0)),
                                str(d.get("client_id", "")), tuple(str(t) for t in d.get("topics", [])))
        if proto == "dns":
            return DNSRequest(str(d["name"]))
        fields = d.get("fields", {})
        if not isinstance(fields, dict):
            raise ValueError("l7.fields: expected an object")
        return GenericL7Request.of(proto, {str(k): str(v) for k, v in fields.items()})
    except KeyError as e:
        raise ValueError(f"l7: {proto} request without {e.args[0]}") from None


def _direction_json(d: DirectionTrace) -> dict[str, Any]:
    entry = None
    if d.entry is not None:
        ident, key, value = d.entry
        entry = {"identity": ident if ident != ANY_IDENTITY else "any", "port": str(key),
                 "verdict": value.verdict.value,
                 "l7_protocol": value.l7.protocol if value.l7 else None,
                 "origins": [_origin_json(o) for o in value.origins]}
    return {
        "evaluated": d.evaluated,
        "enforced": d.enforced,
        "verdict": "allowed" if d.allowed else "denied",
        "reason": d.reason,
        "selecting_rules": [_origin_json(o) for o in d.selecting],
        "entry": entry,
        "l7_protocol": d.l7_protocol,
        "l7_verdict": None if d.l7 is None else ("allowed" if d.l7.allowed else "denied"),
        "deciding_rules": d.deciding,
        "allowed_ports": d.partial_ports,
    }


def _where(item: dict[str, Any]) -> str:
    return f"{item['file']}:{item['line']}" if item.get("file") else "built-in"


def render_text(result: TraceResult) -> str:
    req = result.request
    lines = ["-" * 64]
    if req.dport is not None:
        ports = f"{req.dport}/{req.protocol.label}"
    else:
        ports = f"ANY/{req.protocol.label}" if req.protocol is not Protocol.ANY else "ANY"
    lines.append(f"Tracing From: {req.src.describe()} (identity {result.src_identity.id}) => "
                 f"To: {req.dst.describe()} (identity {result.dst_identity.id}) Ports: [{ports}]")
    if result.service is not None:
        lines.append(f"Service: {result.service.why}")
    l7 = l7_request_json(req.l7)
    if l7 is not None:
        desc = {k: v for k, v in l7.items() if k != "protocol" and v not in ("", [], None)}
        lines.append(f"L7 request: {l7['protocol']} " + " ".join(f"{k}={v}" for k, v in desc.items()))
    for sub in (result.per_protocol or [result]):
        if result.per_protocol:
            lines.append("")
            lines.append(f"== {sub.request.protocol.label}: {sub.verdict}")
        for d, who in ((sub.egress, "source"), (sub.ingress, "destination")):
            lines.append("")
            title = "Egress" if d.direction is Direction.EGRESS else "Ingress"
            if not d.evaluated:
                lines.append(f"{title}: {d.reason}")
                continue
            lines.append(f"Resolving {d.direction} policy for the {who}")
            for o in d.selecting:
                lines.append(f"* Rule {o.policy} {o.path} ({o.source}): selected")
            mode = "default deny" if d.enforced else "not enforced: default allow"
            lines.append(f"{len(d.selecting)}/{d.total_rules} rules selected ({mode})")
            if d.entry is not None:
                ident, key, value = d.entry
                peer = "any identity" if ident == ANY_IDENTITY else f"identity {ident}"
                what = value.verdict.value + (f" to {value.l7.protocol} proxy" if value.l7 else "")
                lines.append(f"  Map entry: {peer}, {key} -> {what}")
            for item in d.deciding:
                if "l7" in item:
                    verb = "Not matched" if item.get("matched") is False else "Allowed by"
                    lines.append(f"  {verb}: L7 rule [{item['l7']}] of {item['policy']} {item['path']} "
                                 f"({_where(item)})")
                else:
                    verb = "Decided by" if not d.allowed else "Allowed by"
                    lines.append(f"  {verb} rule {item['policy']} {item['path']} ({_where(item)})")
            lines.append(f"{title} verdict: {'allowed' if d.allowed else 'denied'} ({d.reason})")
    if result.notes:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"  ! {n}" for n in result.notes)
    lines.append("")
    lines.append(f"Final verdict: {result.verdict.upper()}")
    return "\n".join(lines)


"""Policy -> CompiledRule: the policy language reduced to selector-level entries.

This is where Cilium's implicit semantics are applied once per rule:
- a CiliumNetworkPolicy selects only endpoints of its namespace, and its endpoint
  selectors (fromEndpoints, fromRequires) only peers of that namespace unless they
  name a namespace (or a reserved label) themselves;
- an item with peers but no ports allows all ports; one with ports but no peers
  allows every peer; one with neither (``ingress: [{}]``) allows nothing;
- protocol ANY means TCP, UDP and SCTP (only TCP for HTTP/Kafka/l7proto rules,
  TCP and UDP for DNS);
- ``toServices`` stands for the selected services' backends (``toservices``);
- features that need subsystems cilia does not have yet are reported as notes
  and fail closed: an allow that cannot be enforced grants nothing, a deny that
  cannot be enforced denies every peer on its ports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import SourceRef
from .labels import NAMESPACE_KEY, SOURCE_K8S, SOURCE_RESERVED
from .l7 import http as l7http
from .mapstate import ANY_L4, MAX_PORT, L4Key, RuleOrigin
from .model import (
    IPNetwork,
    Direction,
    L7Rules,
    PeerRule,
    Policy,
    PolicyKind,
    PortProtocol,
    Protocol,
    Rule,
)
from .peers import WILDCARD, CIDRPeer, EndpointPeer, EntityPeer, FQDNPeer, PeerSelector
from .selectors import LabelSelector, Operator, Requirement
from .toservices import ServiceView

_ANY_EXPANSION = {
    None: (Protocol.TCP, Protocol.UDP, Protocol.SCTP),
    "dns": (Protocol.TCP, Protocol.UDP),
}


@dataclass(frozen=True, slots=True)
class Note:
    """Something a rule asks for that cilia does not enforce (yet), and how it
    fails closed."""

    origin: RuleOrigin
    message: str

    def __str__(self) -> str:
        return f"{self.origin.source or self.origin.policy}: {self.message}"


@dataclass(frozen=True, slots=True)
class PortSpec:
    """An L4 key, or a named port still to be resolved against endpoints."""

    key: L4Key | None
    name: str | None = None
    protocol: Protocol = Protocol.ANY

    def __str__(self) -> str:
        return str(self.key) if self.key else f"{self.name}/{self.protocol.label}"


@dataclass(frozen=True, slots=True)
class RuleEntry:
    """A selector-level entry: peers, ports, allow/deny and L7 rules, and origin."""

    direction: Direction
    deny: bool
    peer: PeerSelector
    port: PortSpec
    l7: L7Rules | None
    origin: RuleOrigin


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """One rule ready for resolution. Compared by identity: each compile makes new ones."""

    policy: Policy
    rule: Rule
    subject: LabelSelector | None  # None: host policy (nodeSelector), not enforced yet
    entries: tuple[RuleEntry, ...]
    requires: dict[Direction, tuple[LabelSelector, ...]]
    notes: tuple[Note, ...]
    prefixes: frozenset[IPNetwork]
    origin: RuleOrigin = field(compare=False)

    def applies_to(self, direction: Direction) -> bool:
        return self.rule.applies_to(direction)

    def enables_default_deny(self, direction: Direction) -> bool:
        return self.rule.enables_default_deny(direction)


def compile_policy(policy: Policy, services: ServiceView | None = None) -> list[CompiledRule]:
    """``services``: what ``toServices`` resolves against (None: no services known, so
    ``toServices`` is noted as not enforced and fails closed)."""
    return [_compile_rule(policy, rule, services) for rule in policy.rules]


def uses_services(policy: Policy) -> bool:
    """Whether the policy has ``toServices`` (its compiled form depends on the services)."""
    return any(pr.services is not None for rule in policy.rules for d in Direction
               for section in rule.sections(d) for pr in section)


def _origin(policy: Policy, path: str, source: SourceRef | None) -> RuleOrigin:
    return RuleOrigin(policy.display_name, path, source, policy.kind.value)


def _subject(policy: Policy, sel: LabelSelector) -> LabelSelector:
    """A CNP selects endpoints of its own namespace only, whatever its
    endpointSelector says (naming another namespace selects nothing)."""
    if policy.kind is not PolicyKind.CNP or policy.namespace is None:
        return sel
    ns = Requirement(SOURCE_K8S, NAMESPACE_KEY, Operator.IN, (policy.namespace,))
    return LabelSelector(tuple(sorted({*sel.requirements, ns})))


def _scoped(policy: Policy, sel: LabelSelector) -> LabelSelector:
    """Limit a CNP's peer selector to its namespace unless it names a namespace
    (cross-namespace peers) or a reserved identity, as Cilium does."""
    if policy.kind is not PolicyKind.CNP or policy.namespace is None:
        return sel
    if sel.constrains(NAMESPACE_KEY):
        return sel
    if any(req.source == SOURCE_RESERVED for req in sel.requirements):
        return sel
    ns = Requirement(SOURCE_K8S, NAMESPACE_KEY, Operator.IN, (policy.namespace,))
    return LabelSelector(tuple(sorted((*sel.requirements, ns))))


def _compile_rule(policy: Policy, rule: Rule, services: ServiceView | None) -> CompiledRule:
    origin = _origin(policy, rule.path or "spec", rule.source)
    notes: list[Note] = []
    subject: LabelSelector | None = None
    if rule.endpoint_selector is not None:
        subject = _subject(policy, rule.endpoint_selector)
    else:
        notes.append(Note(origin, "host policy (nodeSelector) is not enforced yet: it selects no endpoint"))
    entries: list[RuleEntry] = []
    requires: dict[Direction, tuple[LabelSelector, ...]] = {}
    prefixes: set[IPNetwork] = set()
    for direction in Direction:
        allow, deny = rule.sections(direction)
        reqs: list[LabelSelector] = []
        for peer_rule in allow:
            reqs.extend(_scoped(policy, r) for r in peer_rule.requires)
        requires[direction] = tuple(reqs)
        for peer_rule in (*allow, *deny):
            entries.extend(_compile_peer_rule(policy, rule, peer_rule, notes, prefixes, services))
    return CompiledRule(policy, rule, subject, tuple(entries), requires, tuple(notes),
                        frozenset(prefixes), origin)


def _compile_peer_rule(policy: Policy, rule: Rule, pr: PeerRule, notes: list[Note],
                       prefixes: set[IPNetwork], services: ServiceView | None) -> list[RuleEntry]:
    origin = _origin(policy, pr.path, pr.source)
    # -- peers
    peers: list[PeerSelector] = []
    unenforced: list[str] = list(pr.unenforced_peers)
    if pr.endpoints is not None:
        peers.extend(EndpointPeer(_scoped(policy, sel)) for sel in pr.endpoints)
    if pr.cidrs is not None:
        for c in pr.cidrs:
            peers.append(CIDRPeer(c.cidr, c.excepts))
            prefixes.add(c.cidr)
            prefixes.update(c.excepts)
    if pr.entities is not None:
        for ent in pr.entities:
            peers.append(WILDCARD if ent == "all" else EntityPeer(ent))
    if pr.fqdns is not None:
        # the addresses the DNS proxy learns for matching names (the engine keeps the selections)
        peers.extend(FQDNPeer(f.match_name, f.match_pattern) for f in pr.fqdns)
    if pr.services is not None:
        if services is None:
            unenforced.append("toServices")
        else:  # the selected services' backends; none selected: the rule allows (or denies) nothing
            for sel in pr.services:
                backends, needed = services.peers(sel, policy.namespace)
                peers.extend(backends)
                prefixes.update(needed)
    if pr.authentication == "required":
        unenforced.append("authentication")
    if unenforced:
        kinds = ", ".join(sorted(set(unenforced)))
        why = "not enforced yet"
        if kinds == "toServices":  # enforced by the agent, which knows its services
            why = "is resolved against the agent's services, and none are given here (trace: --service)"
        if pr.deny:
            notes.append(Note(origin, f"{kinds} {why}: this deny applies to every peer on its ports"))
            peers = [WILDCARD]
        else:
            notes.append(Note(origin, f"{kinds} {why}: this rule allows nothing"))
            return []
    elif not pr.has_l3():
        if not pr.has_l4():
            return []  # `{}`: selects the endpoint, allows nothing
        peers = [WILDCARD]
    # -- ports
    out: list[RuleEntry] = []
    port_specs: list[tuple[PortSpec, L7Rules | None, RuleOrigin]] = []
    if pr.to_ports is not None:
        for i, port_rule in enumerate(pr.to_ports):
            # An L4 decision names the toPorts item that made it.
            port_origin = _origin(policy, f"{origin.path}.toPorts[{i}]", port_rule.source)
            blocked = []
            if port_rule.server_names:
                blocked.append("serverNames")
            if port_rule.listener is not None:
                blocked.append("listener")
            if blocked:
                notes.append(Note(origin, f"{', '.join(blocked)} not enforced yet: this port rule allows nothing"))
                continue
            if port_rule.terminating_tls or port_rule.originating_tls:
                notes.append(Note(origin, "TLS interception is not enforced yet: encrypted traffic on "
                                          "this port cannot be inspected, so L7 rules deny it"))
            rules = port_rule.rules
            if rules is not None:
                if rules.protocol == "dns":
                    notes.append(Note(origin, "DNS rules are enforced by the agent's DNS proxy on egress "
                                              "with --datapath bpf only; elsewhere they deny DNS on the port"))
                if rules.protocol == "http":
                    for r in rules.rules:
                        for msg in l7http.unenforced(r):  # type: ignore[arg-type]
                            notes.append(Note(origin, msg))
            if not port_rule.ports:
                port_specs.append((PortSpec(ANY_L4), None, port_origin))
            for pp in port_rule.ports:
                for spec in _port_specs(pp, rules):
                    port_specs.append((spec, rules, port_origin))
    if pr.icmps is not None:
        for icmp in pr.icmps:
            icmp_origin = _origin(policy, f"{origin.path}.icmps", icmp.source)
            port_specs.append((PortSpec(L4Key(icmp.protocol, icmp.type, icmp.type)), None, icmp_origin))
    if pr.to_ports is None and pr.icmps is None:
        port_specs.append((PortSpec(ANY_L4), None, origin))
    for peer in peers:
        for spec, l7, o in port_specs:
            out.append(RuleEntry(pr.direction, pr.deny, peer, spec, l7, o))
    return out


def l7_protocols(rules: L7Rules | None) -> tuple[Protocol, ...]:
    """The transport protocols protocol ANY stands for, given a port's L7 rules."""
    kind = rules.protocol if rules is not None else None
    if kind is None:
        return _ANY_EXPANSION[None]
    return _ANY_EXPANSION.get(kind, (Protocol.TCP,))


def _port_specs(pp: PortProtocol, rules: L7Rules | None) -> list[PortSpec]:
    if pp.name is not None:
        # A named port carries its own protocol; resolution picks the matching ones.
        return [PortSpec(None, pp.name, pp.protocol)]
    if pp.protocol is Protocol.ANY:
        protocols = l7_protocols(rules)
    else:
        protocols = (pp.protocol,)
    assert pp.port is not None
    if pp.port == 0:
        lo, hi = 0, MAX_PORT
    else:
        lo, hi = pp.port, pp.end_port if pp.end_port is not None else pp.port
    return [PortSpec(L4Key(proto, lo, hi)) for proto in protocols]

"""A brute-force reference evaluator for policy verdicts (test-only code).

It decides a flow straight from the parsed rules (``model.Policy``), with no
identities, no selector cache, no map states and no closure, so the property
tests can check the engine's resolution against it. It reuses only label
selectors' ``matches`` and the L7 matchers, which are tested on their own.

Semantics (the project's decisions, see the policy package docs):

* A flow is allowed iff the source endpoint's egress (if the source is an
  endpoint) and the destination endpoint's ingress (likewise) both allow it.
* One direction at endpoint E with peer P: the rules whose endpointSelector
  selects E and that have allow or deny items in that direction apply. The
  direction is enforced if one of them does not set ``enableDefaultDeny`` to
  false for it. A matching deny item denies; otherwise, in an unenforced
  direction everything is allowed; otherwise a matching allow item allows
  (subject to L7 rules), and nothing matching means denied.
* A CiliumNetworkPolicy's endpointSelector always requires the policy's
  namespace; its peer selectors (fromEndpoints, fromRequires) require it unless
  they name the namespace key or a ``reserved:`` label. Endpoints without a
  namespace label are in ``default``.
* Outside addresses are matched against CIDRs directly (in the prefix and in no
  except); they are "world" and never match endpoint selectors.
* fromRequires / toRequires: every selector of every allow item of the rules
  applying in that direction must match the peer, for every allow item.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from cilia.policy.flows import HTTPRequest
from cilia.policy.l7 import http as l7http
from cilia.policy.labels import Label, LabelSet
from cilia.policy.model import (
    Direction,
    HTTPRule,
    L7Rules,
    PeerRule,
    Policy,
    PolicyKind,
    PortRule,
    Protocol,
    Rule,
)
from cilia.policy.selectors import LabelSelector

NAMESPACE_KEY = "io.kubernetes.pod.namespace"

#: what an outside address looks like to a label selector
WORLD_LABELS = LabelSet([Label("reserved", "world")])


@dataclass(frozen=True, slots=True)
class Side:
    """One end of a flow: endpoint labels, or an outside address."""

    labels: LabelSet | None = None
    address: ipaddress.IPv4Address | None = None

    def __str__(self) -> str:
        return f"[{self.labels}]" if self.labels is not None else str(self.address)


@dataclass(frozen=True, slots=True)
class Flow:
    src: Side
    dst: Side
    protocol: Protocol
    port: int  # destination port, or the ICMP type
    http: HTTPRequest | None = None

    def __str__(self) -> str:
        req = f" {self.http.method} {self.http.path}" if self.http else ""
        return f"{self.src} -> {self.dst} {self.port}/{self.protocol.label}{req}"


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    egress: str
    ingress: str

    def __str__(self) -> str:
        return f"{'allowed' if self.allowed else 'denied'} (egress: {self.egress}; ingress: {self.ingress})"


def decide(policies: list[Policy], flow: Flow) -> Decision:
    egress_ok, egress_why = True, "source outside the cluster"
    if flow.src.labels is not None:
        egress_ok, egress_why = _direction(policies, Direction.EGRESS, flow.src.labels, flow.dst, flow)
    ingress_ok, ingress_why = True, "destination outside the cluster"
    if flow.dst.labels is not None:
        ingress_ok, ingress_why = _direction(policies, Direction.INGRESS, flow.dst.labels, flow.src, flow)
    return Decision(egress_ok and ingress_ok, egress_why, ingress_why)


# --- one direction ---------------------------------------------------------------


def with_namespace(labels: LabelSet) -> LabelSet:
    if NAMESPACE_KEY in labels or any(label.source == "reserved" for label in labels.labels()):
        return labels
    return LabelSet([*labels.labels(), Label("k8s", NAMESPACE_KEY, "default")])


def _direction(policies: list[Policy], direction: Direction, own: LabelSet, peer: Side,
               flow: Flow) -> tuple[bool, str]:
    me = with_namespace(own)
    applying: list[tuple[Policy, Rule]] = []
    for policy in policies:
        for rule in policy.rules:
            if rule.endpoint_selector is None or not _selector_matches(policy, rule.endpoint_selector, me,
                                                                       subject=True):
                continue
            allow, deny = _sections(rule, direction)
            if allow or deny:
                applying.append((policy, rule))
    if not applying:
        return True, "no rule applies"
    enforced = any(_default_deny_flag(rule, direction) is not False for _, rule in applying)
    for policy, rule in applying:
        for item in _sections(rule, direction)[1]:
            if _peer_matches(policy, item, peer) and _grants(item, flow) is not None:
                return False, f"denied by {policy.name} {item.path}"
    if not enforced:
        return True, "not enforced"
    requires = [(policy, sel) for policy, rule in applying
                for item in _sections(rule, direction)[0] for sel in item.requires]
    peer_labels = _peer_labels(peer)
    if not all(_selector_matches(policy, sel, peer_labels) for policy, sel in requires):
        return False, "a fromRequires/toRequires does not match the peer"
    grants: list[tuple[str, L7Rules | None]] = []
    for policy, rule in applying:
        for item in _sections(rule, direction)[0]:
            if not _peer_matches(policy, item, peer):
                continue
            found = _grants(item, flow)
            if found is not None:
                grants.extend((f"{policy.name} {item.path}", g) for g in found)
    if not grants:
        return False, "no allow rule matches"
    return _l7_decision(grants, flow)


def _l7_decision(grants: list[tuple[str, L7Rules | None]], flow: Flow) -> tuple[bool, str]:
    plain = [where for where, g in grants if g is None or not g.rules]
    if plain:
        return True, f"allowed by {plain[0]}"
    if flow.http is None:
        return True, f"allowed at L4 by {grants[0][0]} (no L7 request)"
    for where, g in grants:
        assert g is not None and g.protocol == "http"
        for rule in g.rules:
            assert isinstance(rule, HTTPRule)
            if l7http.rule_matches(rule, flow.http):
                return True, f"http request allowed by {where}"
    return False, "no http rule matches the request"


def _sections(rule: Rule, direction: Direction) -> tuple[tuple[PeerRule, ...], tuple[PeerRule, ...]]:
    if direction is Direction.INGRESS:
        return rule.ingress, rule.ingress_deny
    return rule.egress, rule.egress_deny


def _default_deny_flag(rule: Rule, direction: Direction) -> bool | None:
    return rule.default_deny.ingress if direction is Direction.INGRESS else rule.default_deny.egress


# --- peers -----------------------------------------------------------------------


def _peer_labels(peer: Side) -> LabelSet:
    return with_namespace(peer.labels) if peer.labels is not None else WORLD_LABELS


def _selector_matches(policy: Policy, sel: LabelSelector, labels: LabelSet, subject: bool = False) -> bool:
    if not sel.matches(labels):
        return False
    if policy.kind is not PolicyKind.CNP:
        return True
    if not subject and any(req.key == NAMESPACE_KEY or req.source == "reserved" for req in sel.requirements):
        return True
    ns = labels.get(NAMESPACE_KEY)
    return ns is not None and ns.source == "k8s" and ns.value == policy.namespace


def _peer_matches(policy: Policy, item: PeerRule, peer: Side) -> bool:
    if item.endpoints is not None:
        return peer.labels is not None and any(
            _selector_matches(policy, sel, with_namespace(peer.labels)) for sel in item.endpoints)
    if item.cidrs is not None:
        addr = peer.address
        return addr is not None and any(
            addr in c.cidr and not any(addr in ex for ex in c.excepts) for c in item.cidrs)
    if item.entities is not None:
        return any(_entity_matches(ent, peer) for ent in item.entities)
    # no peers: ports-only items allow every peer; `{}` allows nothing
    return item.to_ports is not None or item.icmps is not None


def _entity_matches(entity: str, peer: Side) -> bool:
    outside = peer.labels is None
    if entity == "all":
        return True
    if entity in ("world", "world-ipv4"):
        return outside and peer.address is not None and (entity == "world" or peer.address.version == 4)
    if entity == "cluster":
        return not outside
    return False  # host and the other reserved entities are never a flow end here


# --- L4 ----------------------------------------------------------------------------


def _grants(item: PeerRule, flow: Flow) -> list[L7Rules | None] | None:
    """What the item grants this flow at L4 (one value per matching port rule:
    its L7 rules or None), or None if its ports do not cover the flow."""
    if item.to_ports is None and item.icmps is None:
        return [None]
    found: list[L7Rules | None] = []
    for port_rule in item.to_ports or ():
        if _port_rule_matches(port_rule, flow):
            found.append(port_rule.rules)
    for icmp in item.icmps or ():
        if flow.protocol is icmp.protocol and flow.port == icmp.type:
            found.append(None)
    return found or None


def _port_rule_matches(port_rule: PortRule, flow: Flow) -> bool:
    for pp in port_rule.ports:
        assert pp.port is not None, "named ports are not generated"
        if pp.protocol is Protocol.ANY:
            # HTTP rules on ANY apply to TCP only
            allowed = {Protocol.TCP} if port_rule.rules is not None else {Protocol.TCP, Protocol.UDP, Protocol.SCTP}
        else:
            allowed = {pp.protocol}
        if flow.protocol not in allowed:
            continue
        if pp.port == 0:
            return True
        hi = pp.end_port if pp.end_port is not None else pp.port
        if pp.port <= flow.port <= hi:
            return True
    return False

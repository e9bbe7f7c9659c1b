"""What the L7 service needs of policy, as one value: every endpoint's map state and audit mode.

The agent makes a new ``PolicyViews`` at each publish and hands it over whole (to its own L7
service by reference, to worker processes pickled), so a parser never reads a half-changed
policy and never waits for the agent's lock. ``check_for`` is the one place a connection's
``Check`` is made: the local endpoint's map state in the connection's direction, looked up for the
peer on the port; no entry, another L7 protocol or an unknown endpoint deny everything; audit
mode allows what would be denied, marked as audited.
"""

from __future__ import annotations

import copyreg
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from cilia.l7parsers.base import Check, Decision
from cilia.l7parsers.policycheck import policy_check
from cilia.policy.flows import L7Request
from cilia.policy.mapstate import MapState
from cilia.policy.model import Protocol

from .l7service import ConnectionInfo


@dataclass(frozen=True)
class PolicyViews:
    revision: int = 0
    map_states: Mapping[str, MapState] = field(default_factory=dict)
    audits: Mapping[str, tuple[bool, bool]] = field(default_factory=dict)  # endpoint -> (ingress, egress)


def check_for(views: PolicyViews, info: ConnectionInfo) -> Check:
    ms = views.map_states.get(info.endpoint)
    if ms is None:
        return deny_all(Decision(False, "", f"{info.endpoint or 'the connection'} is not an endpoint here"))
    state = ms.ingress if info.direction == "ingress" else ms.egress
    hit = state.lookup(info.peer_identity, Protocol.TCP, info.port)
    if hit is None:
        return deny_all(Decision(False, "no rule allows it", "denied at L3/L4"))
    entry = hit[2]
    if entry.l7 is not None and entry.l7.protocol != info.protocol:
        return deny_all(Decision(False, "", f"this port's rules are {entry.l7.protocol}, not {info.protocol}"))
    check = policy_check(entry)
    ingress, egress = views.audits.get(info.endpoint, (False, False))
    return audited(check) if (ingress if info.direction == "ingress" else egress) else check


def audited(check: Check) -> Check:
    """Audit mode: what ``check`` denies is allowed, marked as audited."""
    def audit(request: L7Request) -> Decision:
        d = check(request)
        return d if d.allowed else Decision(True, d.rule, d.reason, audit=True)

    return audit


def deny_all(decision: Decision) -> Check:
    def check(_request: L7Request) -> Decision:
        return decision

    return check


class ViewSource:
    """A ``PolicySource`` reading whatever ``PolicyViews`` it was last given."""

    def __init__(self, views: PolicyViews | None = None) -> None:
        self.views = views or PolicyViews()

    def l7_check(self, info: ConnectionInfo) -> Check:
        return check_for(self.views, info)

    def policy_revision(self) -> int:
        return self.views.revision


def _mapping_proxy(d: dict[object, object]) -> MappingProxyType[object, object]:
    return MappingProxyType(d)


# Map states keep read-only views of their dicts; this makes them picklable for worker processes.
copyreg.pickle(MappingProxyType, lambda m: (_mapping_proxy, (dict(m),)))

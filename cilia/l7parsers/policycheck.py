"""An endpoint's L7 policy for one peer on one port as a parser's ``Check``.

The same matchers decide here as in ``cilia policy trace`` (``cilia.policy.l7.evaluate``), and
decisions are named like Envoy's HTTP RBAC names them: an allowed request after the L7 rule that
allowed it (``<policy> <path> (<file>:<line>)``, the line of that rule), a denied one as
``default deny: <the rules behind the port>``.
"""

from __future__ import annotations

from cilia.policy.flows import L7Request
from cilia.policy.l7.evaluate import evaluate
from cilia.policy.mapstate import PolicyEntry, RuleOrigin, Verdict, origins_name

from .base import Check, Decision


def _named(rule: object, origin: RuleOrigin) -> str:
    source = getattr(rule, "source", None) or origin.source
    return str(RuleOrigin(origin.policy, origin.path, source, origin.kind))


def policy_check(entry: PolicyEntry) -> Check:
    """``entry``: the map-state entry for the peer on the port (a redirect with L7 rules, or an
    L3/L4 allow, which allows every request)."""
    if entry.verdict is Verdict.DENY:
        denied = Decision(False, origins_name(entry), "denied at L3/L4")

        def deny_all(_request: L7Request) -> Decision:
            return denied

        return deny_all
    l7 = entry.l7
    allowed = origins_name(entry)
    if l7 is None or l7.allow_all:
        everything = Decision(True, allowed, "every request is allowed here")

        def allow(_request: L7Request) -> Decision:
            return everything

        return allow
    deny_name = "default deny: " + allowed

    def check(request: L7Request) -> Decision:
        verdict = evaluate(l7, request)
        if not verdict.allowed:
            return Decision(False, deny_name, verdict.reason)
        names = "; ".join(dict.fromkeys(_named(r, o) for r, o in verdict.matched)) or allowed
        return Decision(True, names, verdict.reason)

    return check

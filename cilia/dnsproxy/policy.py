"""Which endpoint asks, and may it ask this name: the proxy's policy snapshot and decision.

The ``DNSProxySink`` builds one ``DNSPolicy`` per revision (endpoints by address, their egress map
states and audit mode, the ipcache) and the proxy swaps it in whole, so a query never waits for
the agent's lock. A query is judged by the sending endpoint's egress entry for the server it asked
(its identity, the protocol and port): the entry's ``dns`` rules decide by name with the same
matchers as ``cilia policy trace``; an L3/L4 allow there allows every name (Cilium's rule for a
DNS port without L7 rules). Anything else (no such endpoint, no entry, another L7 protocol)
refuses: fail closed.

Judgements are memoized on the snapshot (``decide``), so a name asked again under the same revision
costs a dict lookup; a new revision is a new snapshot with an empty memo.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..l7parsers.base import Check, Decision
from ..l7parsers.policycheck import policy_check
from ..policy.flows import DNSRequest, L7Request
from ..policy.ipcache import IPCache
from ..policy.mapstate import DirectionMapState, Verdict
from ..policy.model import IPNetwork, Protocol
from ..realizer.desired import Desired

WORLD = 2  # reserved:world: an address in no prefix
MEMO_MAX = 65_536  # judgements kept per snapshot; beyond, the memo starts over


@dataclass(frozen=True, slots=True)
class DNSEndpoint:
    name: str
    identity: int
    egress: DirectionMapState
    audit: bool = False  # egress audit mode: what would be refused is forwarded, marked AUDIT


@dataclass(frozen=True, slots=True)
class Judgement:
    endpoint: DNSEndpoint | None
    peer_identity: int
    decision: Decision


@dataclass(frozen=True)
class DNSPolicy:
    revision: int = 0
    endpoints: Mapping[str, DNSEndpoint] = field(default_factory=dict)  # by address
    ipcache: tuple[tuple[IPNetwork, int], ...] = ()
    _lookup: list[IPCache] = field(default_factory=list, compare=False, repr=False)
    _memo: dict[tuple[str, str, int, Protocol, str], Judgement] = field(default_factory=dict, compare=False,
                                                                        repr=False)

    @classmethod
    def of(cls, desired: Desired) -> DNSPolicy:
        eps = {ip: DNSEndpoint(ep.name, ep.identity, ep.map_state.egress, ep.audit_egress)
               for ep in desired.endpoints.values() for ip in ep.ips}
        return cls(desired.revision, eps, desired.ipcache)

    def identity_of(self, address: str) -> int:
        if not self._lookup:  # built once per snapshot, on the first query that needs it
            cache = IPCache()
            for prefix, ident in self.ipcache:
                cache.upsert(prefix, ident)
            self._lookup.append(cache)
        try:
            return self._lookup[0].lookup(address)[1]
        except (KeyError, ValueError):
            return WORLD

    def endpoint_name(self, address: str) -> str:
        ep = self.endpoints.get(address)
        return ep.name if ep is not None else ""

    def decide(self, source: str, server: str, port: int, protocol: Protocol, name: str) -> Judgement:
        """``judge``, memoized: a snapshot's answer for one (asker, server, port, protocol, name)
        never changes (the name as asked: case differs, the memo does, the judgement does not)."""
        key = (source, server, port, protocol, name)
        judged = self._memo.get(key)
        if judged is None:
            if len(self._memo) >= MEMO_MAX:
                self._memo.clear()
            judged = self._memo[key] = self.judge(source, server, port, protocol, name)
        return judged

    def judge(self, source: str, server: str, port: int, protocol: Protocol, name: str) -> Judgement:
        """May the endpoint at ``source`` ask ``server``:``port`` over ``protocol`` for ``name``?"""
        ep = self.endpoints.get(source)
        if ep is None:
            return Judgement(None, 0, Decision(False, "", f"{source} is not an endpoint here"))
        peer = self.identity_of(server)
        hit = ep.egress.lookup(peer, protocol, port)
        if hit is None:
            return Judgement(ep, peer, Decision(False, "no rule allows it", "denied at L3/L4"))
        entry = hit[2]
        if entry.verdict is Verdict.REDIRECT and (entry.l7 is None or entry.l7.protocol != "dns"):
            what = entry.l7.protocol if entry.l7 is not None else "L7"
            return Judgement(ep, peer, Decision(False, "", f"this port's rules are {what}, not dns"))
        check = policy_check(entry)
        if ep.audit:
            check = audited(check)
        return Judgement(ep, peer, check(DNSRequest(name)))


def audited(check: Check) -> Check:
    """Audit mode: what ``check`` refuses is allowed, marked as audited."""
    def audit(request: L7Request) -> Decision:
        d = check(request)
        return d if d.allowed else Decision(True, d.rule, d.reason, audit=True)

    return audit

"""The resolved, per-endpoint policy: what Envoy and BPF enforce.

A ``MapState`` holds, for each direction, entries keyed by
``(peer identity or ANY, protocol or ANY, port range)`` with a value of
ALLOW, DENY or REDIRECT (to an L7 proxy, with the L7 rules for that peer).

It is *precedence-complete*: for any flow, the single most specific matching
entry carries the whole answer. Specificity is, in order, a named protocol over
ANY, a narrower port range, then a named identity over ANY — Cilium's BPF lookup
order (id/proto/port > ANY/proto/port > id/proto/ANY > ... > ANY/ANY/ANY). To make
that true, every intersection of overlapping entries is present with the merge
of everything that covers it (deny beats allow; an L3/L4 allow on an L7 port
allows every request of that protocol). A datapath can therefore do at most two
lookups (exact identity, then ANY) and take the most specific hit.

Every entry carries the rules (``RuleOrigin``, with file:line) that produced it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from types import MappingProxyType

from .errors import L7ConflictError, SourceRef
from .model import Direction, L7Rule, L7Rules, Protocol

ANY_IDENTITY = 0
MAX_PORT = 65535


class Verdict(str, Enum):
    ALLOW = "allow"
    DENY = "deny"
    REDIRECT = "redirect"  # allowed at L3/L4, handed to the L7 proxy

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True, order=True)
class L4Key:
    """A protocol (ANY = 0) and an inclusive port range; for ICMP the "port" is the type."""

    protocol: Protocol
    port_lo: int = 0
    port_hi: int = MAX_PORT

    def contains(self, other: L4Key) -> bool:
        return ((self.protocol is Protocol.ANY or self.protocol == other.protocol)
                and self.port_lo <= other.port_lo and other.port_hi <= self.port_hi)

    def matches(self, protocol: Protocol, port: int) -> bool:
        return ((self.protocol is Protocol.ANY or self.protocol == protocol)
                and self.port_lo <= port <= self.port_hi)

    def intersect(self, other: L4Key) -> L4Key | None:
        if self.protocol is Protocol.ANY:
            proto = other.protocol
        elif other.protocol is Protocol.ANY or other.protocol == self.protocol:
            proto = self.protocol
        else:
            return None
        lo, hi = max(self.port_lo, other.port_lo), min(self.port_hi, other.port_hi)
        if lo > hi:
            return None
        return L4Key(proto, lo, hi)

    def specificity(self) -> tuple[bool, int]:
        return (self.protocol is not Protocol.ANY, self.port_lo - self.port_hi)

    def is_any(self) -> bool:
        return self == ANY_L4

    def __str__(self) -> str:
        if self.protocol is Protocol.ANY:
            return "ANY" if self.is_any() else f"{self.port_lo}-{self.port_hi}/ANY"
        if self.port_lo == 0 and self.port_hi == MAX_PORT:
            return f"ANY/{self.protocol.label}"
        if self.port_lo == self.port_hi:
            return f"{self.port_lo}/{self.protocol.label}"
        return f"{self.port_lo}-{self.port_hi}/{self.protocol.label}"


ANY_L4 = L4Key(Protocol.ANY, 0, MAX_PORT)


@dataclass(frozen=True, slots=True)
class RuleOrigin:
    """The policy rule behind an entry: ``policy`` name, field ``path`` and source line."""

    policy: str
    path: str
    source: SourceRef | None
    kind: str = ""

    def __str__(self) -> str:
        where = f" ({self.source})" if self.source else ""
        return f"{self.policy} {self.path}{where}".strip()


#: origin of the allow-all entry of a direction no policy enforces
DEFAULT_ALLOW = RuleOrigin("(no policy)", "default allow: no rule enforces this direction", None)


@dataclass(frozen=True, slots=True)
class L7Policy:
    """What the proxy must check for one peer on one port.

    ``allow_all``: every request of ``protocol`` passes (an L3/L4 rule also
    allowed this peer here, or a rule listed no L7 rules). Otherwise a request
    passes if any of ``rules`` matches it.
    """

    protocol: str
    allow_all: bool
    rules: tuple[tuple[L7Rule, RuleOrigin], ...]


@dataclass(frozen=True, slots=True)
class PolicyEntry:
    verdict: Verdict
    l7: L7Policy | None
    origins: tuple[RuleOrigin, ...]


def origins_name(entry: PolicyEntry) -> str:
    """The rules behind an entry as one name: each ``policy path (file:line)``, sorted."""
    # Keyed on the tuple object: many identities share one entry, and hashing its origins (one
    # per policy selecting the peer, hundreds with 1,000 policies) cost a third of translation.
    origins = entry.origins
    hit = _ORIGIN_NAMES.get(id(origins))
    if hit is not None and hit[0] is origins:
        return hit[1]
    if len(_ORIGIN_NAMES) >= 1 << 14:
        _ORIGIN_NAMES.clear()
    name = "; ".join(sorted({str(o) for o in origins})) or "allowed"
    _ORIGIN_NAMES[id(origins)] = (origins, name)
    return name


#: id(origins tuple) -> (the tuple, kept alive so the id stays its own; its name)
_ORIGIN_NAMES: dict[int, tuple[tuple[RuleOrigin, ...], str]] = {}


@dataclass(frozen=True, slots=True)
class RawEntry:
    """One rule's contribution for one peer (identity or ANY) and L4 key."""

    l4: L4Key
    deny: bool
    l7: L7Rules | None
    origin: RuleOrigin


def merge(raws: Sequence[RawEntry]) -> PolicyEntry:
    """The value of a key covered by ``raws``: deny beats allow; on an L7 port a
    plain allow turns the L7 policy into allow-all for that peer."""
    denies = [r for r in raws if r.deny]
    if denies:
        return PolicyEntry(Verdict.DENY, None, _origins(denies))
    l7s = [r for r in raws if r.l7 is not None]
    if not l7s:
        return PolicyEntry(Verdict.ALLOW, None, _origins(raws))
    protocols = sorted({r.l7.protocol for r in l7s if r.l7 is not None})
    if len(protocols) > 1:
        raise L7ConflictError(
            f"L7 protocols {' and '.join(protocols)} would both have to parse {raws[0].l4}",
            tuple(sorted({r.origin.source for r in l7s if r.origin.source})))
    plain = any(r.l7 is None for r in raws)
    empty = any(r.l7 is not None and not r.l7.rules for r in l7s)
    rules: list[tuple[L7Rule, RuleOrigin]] = []
    seen = set()
    for r in l7s:
        assert r.l7 is not None
        for rule in r.l7.rules:
            if (rule, r.origin) not in seen:
                seen.add((rule, r.origin))
                rules.append((rule, r.origin))
    allow_all = plain or empty
    l7 = L7Policy(protocols[0], allow_all, () if allow_all else tuple(rules))
    return PolicyEntry(Verdict.REDIRECT, l7, _origins(raws))


def _origins(raws: Iterable[RawEntry]) -> tuple[RuleOrigin, ...]:
    out: dict[RuleOrigin, None] = {}
    for r in raws:
        out.setdefault(r.origin, None)
    return tuple(out)


def closure(keys: Iterable[L4Key]) -> set[L4Key]:
    """``keys`` plus every non-empty intersection of them."""
    result = set(keys)
    frontier = list(result)
    while frontier:
        new: list[L4Key] = []
        current = list(result)
        for a in frontier:
            for b in current:
                c = a.intersect(b)
                if c is not None and c not in result:
                    result.add(c)
                    new.append(c)
        frontier = new
    return result


Group = Mapping[L4Key, PolicyEntry]


def build_any_group(any_raws: Sequence[RawEntry]) -> dict[L4Key, PolicyEntry]:
    keys = closure(r.l4 for r in any_raws)
    return {k: merge([r for r in any_raws if r.l4.contains(k)]) for k in keys}


def build_identity_group(own: Sequence[RawEntry], any_raws: Sequence[RawEntry],
                         any_keys: Iterable[L4Key]) -> dict[L4Key, PolicyEntry]:
    """Entries for one peer identity: its own keys and their intersections with
    the ANY-identity keys, each valued by everything covering it."""
    if not own:
        return {}
    own_keys = closure(r.l4 for r in own)
    keys: set[L4Key] = set(own_keys)
    for a in any_keys:
        for c in own_keys:
            k = c.intersect(a)
            if k is not None:
                keys.add(k)
    out = {}
    for k in keys:
        covering = [r for r in own if r.l4.contains(k)] + [r for r in any_raws if r.l4.contains(k)]
        out[k] = merge(covering)
    return out


@dataclass(frozen=True, slots=True)
class DirectionMapState:
    """One direction of a MapState; ``groups`` maps peer identity -> its entries.

    The mappings are read-only; identities selected by the same rules share one
    group object.
    """

    direction: Direction
    enforced: bool
    any_group: Group
    groups: Mapping[int, Group]
    # How this snapshot differs from the one before it, so a consumer that realized that one does
    # the difference only (a learned address: one identity, not all of them). ``serial`` is unique
    # per snapshot (0: not tracked); ``base`` is the previous snapshot's serial (0: none) and
    # ``moved`` the identities whose group differs from it (added, replaced or gone).
    serial: int = field(default=0, compare=False)
    base: int = field(default=0, compare=False)
    moved: frozenset[int] = field(default=frozenset(), compare=False)
    # the distinct group objects of ``groups`` (None: not tracked), a few however many identities
    distinct: tuple[Group, ...] | None = field(default=None, compare=False)

    def entries(self) -> Iterator[tuple[int, L4Key, PolicyEntry]]:
        """Every entry as (identity, key, value); identity 0 is ANY."""
        for k, v in self.any_group.items():
            yield ANY_IDENTITY, k, v
        for ident, group in self.groups.items():
            for k, v in group.items():
                yield ident, k, v

    def __len__(self) -> int:
        return len(self.any_group) + sum(len(g) for g in self.groups.values())

    def lookup(self, identity: int, protocol: Protocol, port: int) -> tuple[int, L4Key, PolicyEntry] | None:
        """The most specific entry for a flow, or None (no entry: dropped)."""
        best: tuple[tuple[bool, int, bool], int, L4Key, PolicyEntry] | None = None
        candidates: list[tuple[int, Group]] = [(ANY_IDENTITY, self.any_group)]
        group = self.groups.get(identity)
        if group is not None:
            candidates.append((identity, group))
        for ident, entries in candidates:
            for key, value in entries.items():
                if key.matches(protocol, port):
                    rank = (*key.specificity(), ident != ANY_IDENTITY)
                    if best is None or rank > best[0]:
                        best = (rank, ident, key, value)
        if best is None:
            return None
        return best[1], best[2], best[3]


@dataclass(frozen=True, slots=True)
class MapState:
    ingress: DirectionMapState
    egress: DirectionMapState

    def direction(self, direction: Direction) -> DirectionMapState:
        return self.ingress if direction is Direction.INGRESS else self.egress

    def __len__(self) -> int:
        return len(self.ingress) + len(self.egress)


def freeze_group(group: Mapping[L4Key, PolicyEntry]) -> Group:
    return MappingProxyType(dict(group))

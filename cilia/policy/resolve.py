"""Resolution: the rules that select one endpoint -> its SelectorPolicy -> MapState.

Two pure steps, as in Cilium:
1. ``resolve_selector_policy``: which rules select the endpoint, per direction
   whether it is in default deny, and its entries still written with peer
   *selectors* (fromRequires applied, named ports resolved, L7 conflicts caught);
2. ``distill``: selectors expanded to identities and closed into a
   precedence-complete ``MapState``.

The engine caches both per (identity, named ports) and redoes only what a
change touches.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from .compile import CompiledRule, Note, l7_protocols
from .errors import L7ConflictError
from .mapstate import (
    ANY_IDENTITY,
    ANY_L4,
    DEFAULT_ALLOW,
    DirectionMapState,
    Group,
    L4Key,
    MapState,
    RawEntry,
    build_any_group,
    build_identity_group,
    freeze_group,
)
from .model import Direction, Protocol
from .peers import WILDCARD, AnyPeer, PeerSelector, RequiresPeer

#: name -> {(port, protocol)}
NamedPortMap = Mapping[str, frozenset[tuple[int, Protocol]]]


@dataclass(frozen=True, slots=True)
class ResolvedEntry:
    peer: PeerSelector  # WILDCARD = any identity
    raw: RawEntry


@dataclass(frozen=True, slots=True)
class DirectionPolicy:
    direction: Direction
    enforced: bool
    selecting: tuple[CompiledRule, ...]  # rules with a section for this direction
    entries: tuple[ResolvedEntry, ...]

    def peers(self) -> set[PeerSelector]:
        return {e.peer for e in self.entries if not isinstance(e.peer, AnyPeer)}


@dataclass(frozen=True, slots=True)
class SelectorPolicy:
    """An endpoint's policy in terms of selectors (before identity expansion)."""

    ingress: DirectionPolicy
    egress: DirectionPolicy
    notes: tuple[Note, ...]
    uses_cluster_named_ports: bool = False

    def direction(self, direction: Direction) -> DirectionPolicy:
        return self.ingress if direction is Direction.INGRESS else self.egress

    def peers(self) -> set[PeerSelector]:
        return self.ingress.peers() | self.egress.peers()


def resolve_selector_policy(
    selecting: Sequence[CompiledRule],
    own_ports: NamedPortMap,
    cluster_ports: NamedPortMap,
) -> SelectorPolicy:
    """The SelectorPolicy of an endpoint selected by ``selecting``.

    Raises L7ConflictError when two L7 protocols would share a port.
    """
    notes: list[Note] = []
    uses_cluster_ports = False
    directions = {}
    for direction in Direction:
        applying = tuple(r for r in selecting if r.applies_to(direction))
        enforced = any(r.enables_default_deny(direction) for r in applying)
        requires = tuple(req for r in applying for req in r.requires[direction])
        entries: list[ResolvedEntry] = []
        if not enforced:
            entries.append(ResolvedEntry(WILDCARD, RawEntry(ANY_L4, False, None, DEFAULT_ALLOW)))
        for rule in applying:
            for entry in rule.entries:
                if entry.direction is not direction:
                    continue
                peer = entry.peer
                if requires and not entry.deny:
                    peer = RequiresPeer(peer, requires)
                if entry.port.key is not None:
                    keys = [entry.port.key]
                else:
                    ports = own_ports if direction is Direction.INGRESS else cluster_ports
                    uses_cluster_ports |= direction is Direction.EGRESS
                    found = sorted(ports.get(entry.port.name or "", frozenset()))
                    usable = (entry.port.protocol,) if entry.port.protocol is not Protocol.ANY \
                        else l7_protocols(entry.l7)
                    keys = [L4Key(proto, num, num) for num, proto in found if proto in usable]
                    if not keys:
                        where = "this endpoint" if direction is Direction.INGRESS else "any endpoint"
                        notes.append(Note(entry.origin, f"named port {entry.port.name!r} is not defined on "
                                                        f"{where}: the rule allows nothing there"))
                for key in keys:
                    entries.append(ResolvedEntry(peer, RawEntry(key, entry.deny, entry.l7, entry.origin)))
        _check_l7_conflicts(entries)
        directions[direction] = DirectionPolicy(direction, enforced, applying, tuple(entries))
    for rule in selecting:
        notes.extend(rule.notes)
    return SelectorPolicy(directions[Direction.INGRESS], directions[Direction.EGRESS],
                          tuple(dict.fromkeys(notes)), uses_cluster_ports)


def _check_l7_conflicts(entries: Sequence[ResolvedEntry]) -> None:
    """Cilium rejects a policy that needs two L7 parsers on one port."""
    l7 = [e.raw for e in entries if e.raw.l7 is not None]
    for i, a in enumerate(l7):
        for b in l7[i + 1:]:
            assert a.l7 is not None and b.l7 is not None
            if a.l7.protocol != b.l7.protocol and a.l4.intersect(b.l4) is not None:
                sources = tuple(s for s in (a.origin.source, b.origin.source) if s)
                raise L7ConflictError(
                    f"{a.l7.protocol} rules of {a.origin.policy} and {b.l7.protocol} rules of "
                    f"{b.origin.policy} both apply to {a.l4.intersect(b.l4)}", sources)


def any_raws(dp: DirectionPolicy) -> list[RawEntry]:
    return [e.raw for e in dp.entries if isinstance(e.peer, AnyPeer)]


_SERIALS = itertools.count(1)  # snapshot serials, unique in the process


class _DirectionBuilder:
    """One direction of a MapStateBuilder.

    Identities selected by the same entries get the same entries in the map
    state, so groups are memoized by that signature (the indices of the
    entries selecting an identity) and shared.
    """

    __slots__ = ("dp", "raws", "anys", "any_group", "any_keys", "by_peer", "groups", "memo", "uses", "serial",
                 "moved")

    def __init__(self, dp: DirectionPolicy, selections: Callable[[PeerSelector], Iterable[int]]) -> None:
        self.dp = dp
        self.raws = [e.raw for e in dp.entries]
        self.anys = any_raws(dp)
        self.any_group = freeze_group(build_any_group(self.anys))
        self.any_keys = list(self.any_group)
        self.by_peer: dict[PeerSelector, list[int]] = {}
        for i, e in enumerate(dp.entries):
            if not isinstance(e.peer, AnyPeer):
                self.by_peer.setdefault(e.peer, []).append(i)
        self.memo: dict[tuple[int, ...], Group] = {}
        selected: dict[int, list[int]] = {}
        for peer, indices in self.by_peer.items():
            for ident in selections(peer):
                selected.setdefault(ident, []).extend(indices)
        self.groups: dict[int, Group] = {}
        self.uses: dict[int, tuple[Group, int]] = {}  # id(group) -> (group, identities using it)
        for ident, indices in selected.items():
            if ident != ANY_IDENTITY:
                self.groups[ident] = group = self._group(tuple(sorted(set(indices))))
                self._use(group, +1)
        self.serial = 0  # of the last snapshot (0: none yet)
        self.moved: set[int] = set()  # identities whose group changed since it

    def _group(self, signature: tuple[int, ...]) -> Group:
        group = self.memo.get(signature)
        if group is None:
            own = [self.raws[i] for i in signature]
            group = freeze_group(build_identity_group(own, self.anys, self.any_keys))
            self.memo[signature] = group
        return group

    def group_for(self, peers: Iterable[PeerSelector]) -> Group | None:
        """The entries of an identity selected by exactly ``peers`` (None: none)."""
        indices = sorted({i for p in peers for i in self.by_peer.get(p, ())})
        return self._group(tuple(indices)) if indices else None

    def set_group(self, identity: int, group: Group | None) -> bool:
        """True if the identity's entries changed."""
        old = self.groups.get(identity)
        if old is group:
            return False
        if old is not None:
            self._use(old, -1)
        if group is None:
            del self.groups[identity]
        else:
            self.groups[identity] = group
            self._use(group, +1)
        self.moved.add(identity)
        return True

    def _use(self, group: Group, delta: int) -> None:
        count = self.uses.get(id(group), (group, 0))[1] + delta
        if count:
            self.uses[id(group)] = (group, count)
        else:
            del self.uses[id(group)]

    def snapshot(self) -> DirectionMapState:
        serial = next(_SERIALS)
        # a delta as large as the whole is not kept (a bulk load): consumers take the whole
        small = len(self.moved) <= 64 + len(self.groups) // 4
        out = DirectionMapState(self.dp.direction, self.dp.enforced, self.any_group,
                                MappingProxyType(dict(self.groups)), serial, self.serial if small else 0,
                                frozenset(self.moved) if small else frozenset(),
                                tuple(group for group, _ in self.uses.values()))
        self.serial, self.moved = serial, set()
        return out


class MapStateBuilder:
    """An endpoint's map state, kept up to date as peer identities come and go.

    ``snapshot()`` returns an immutable MapState (cached until the next change),
    so consumers can hold and diff snapshots while the engine moves on.
    """

    __slots__ = ("sp", "_dirs", "_snapshot", "_by_peers")

    def __init__(self, sp: SelectorPolicy, selections: Callable[[PeerSelector], Iterable[int]]) -> None:
        self.sp = sp
        self._dirs = (_DirectionBuilder(sp.ingress, selections), _DirectionBuilder(sp.egress, selections))
        self._snapshot: MapState | None = None
        # New identities of one app are selected by the same peers: remember the
        # groups per peer set so each endpoint pays one lookup for them.
        self._by_peers: dict[frozenset[PeerSelector], tuple[Group | None, Group | None]] = {}

    def set_identity(self, identity: int, peers: frozenset[PeerSelector]) -> bool:
        """Record that ``identity`` is selected by exactly ``peers`` (empty: gone)."""
        groups = self._by_peers.get(peers)
        if groups is None:
            groups = (self._dirs[0].group_for(peers), self._dirs[1].group_for(peers))
            self._by_peers[peers] = groups
        changed = False
        for d, group in zip(self._dirs, groups):
            changed |= d.set_group(identity, group)
        if changed:
            self._snapshot = None
        return changed

    def snapshot(self) -> MapState:
        if self._snapshot is None:
            self._snapshot = MapState(self._dirs[0].snapshot(), self._dirs[1].snapshot())
        return self._snapshot


def distill(sp: SelectorPolicy, selections: Callable[[PeerSelector], Iterable[int]]) -> MapState:
    """SelectorPolicy -> MapState, with ``selections(peer)`` giving the identities a peer selects."""
    return MapStateBuilder(sp, selections).snapshot()

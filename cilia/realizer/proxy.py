"""The proxy sink: translation of endpoints' policy into Envoy resources, published to the xDS cache.

Sidecar mode translates each endpoint's ingress into its own listeners (Envoy on the endpoint's
address at the policy port, forwarding to the application's port); only the endpoints a change
names are translated again, and those whose RBACs list a prefix that moved (the prefixes of the
identities their policy names, ``relevant_prefixes``: not every endpoint's, so an add is O(1)). Node
mode (the BPF datapath) serves every endpoint from one transparent listener per proxy port, so
its resources are made whole, kept while nothing they are made from changed.

Every publish is one atomic cache update (clusters before the listeners that name them), checked
for dangling references first: an inconsistent set is not published (Envoy keeps the last one)
and the reason is raised for status. ``version_for`` maps a revision to the listener version that
realized it, for ``wait``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..envoy.translate import (
    INGRESS_MARK,
    AccessLogTarget,
    GrpcTarget,
    InprocTarget,
    NodeEndpoint,
    PortMapping,
    ProxyPort,
    ProxyResources,
    prefixes_by_identity,
    relevant_prefixes,
    translate_ingress,
    translate_node,
)
from ..policy import Direction, DirectionMapState
from ..policy.model import IPNetwork
from ..xds import CLUSTER, LISTENER, Cache, TypeChange
from ..xds.consistency import Checker
from .desired import Desired, EndpointState

ProxyMode = Literal["none", "sidecar", "node"]


class InconsistentResources(RuntimeError):
    """Translation produced resources that name missing ones; nothing was published."""


@dataclass
class _Revisions:
    """Listener versions by revision, to answer ``wait``; older revisions map to the oldest kept."""

    versions: dict[int, str] = field(default_factory=dict)

    def record(self, revision: int, version: str) -> None:
        self.versions[revision] = version
        if len(self.versions) > 1000:
            del self.versions[min(self.versions)]

    def version_for(self, revision: int) -> str | None:
        later = [r for r in self.versions if r >= revision]
        return self.versions[min(later)] if later else None


@dataclass(frozen=True)
class _Translated:
    """An endpoint's last sidecar translation and what it was made from."""

    state: EndpointState
    prefixes: Mapping[int, tuple[IPNetwork, ...]]  # the part of all prefixes its RBACs list
    resources: ProxyResources
    named: frozenset[int] | None  # the identities ``prefixes`` is made from; None: it depends on all
    notes: tuple[str, ...] = ()  # what of its policy is not enforced (its resources' notes among them)


class ProxySink:
    name = "proxy"

    def __init__(self, cache: Cache, mode: ProxyMode, node_id: str, access_log: AccessLogTarget,
                 l7_service: GrpcTarget | InprocTarget, listen_address: str = "127.0.0.1",
                 sidecar_mark: int | None = INGRESS_MARK) -> None:
        self.cache = cache
        self.mode = mode
        self.node_id = node_id
        self.access_log = access_log
        self.l7_service = l7_service
        self.listen_address = listen_address  # node mode: where the transparent listeners are
        self.sidecar_mark = sidecar_mark  # sidecar mode: SO_MARK of the connections to the application
        self.notes: tuple[str, ...] = ()
        self.translations = 0  # endpoints (sidecar) or node configs translated, for tests and metrics
        self._revisions = _Revisions()
        self._checker = Checker()
        self._prefixes: Mapping[int, tuple[IPNetwork, ...]] = {}
        self._translated: dict[str, _Translated] = {}
        self._sidecar_prefixes: Mapping[int, tuple[IPNetwork, ...]] = {}  # those of the last sidecar translation
        self._sidecar_names: frozenset[str] = frozenset()  # endpoints whose sidecar view is set
        self._node: tuple[tuple[Any, ...], ProxyResources] | None = None
        # sidecar mode: how many endpoints publish each resource name (shared clusters: the access
        # log's, the L7 service's), and every cluster published, for the consistency check
        self._refs: dict[str, dict[str, int]] = {LISTENER: {}, CLUSTER: {}}
        self._clusters: dict[str, Any] = {}
        self._resync = True  # publish everything next (nothing yet, or a publish failed)
        # which translated endpoints list each identity's prefixes, and those that list all: the ones
        # a moved prefix makes translate again, found without a look at every endpoint
        self._naming: dict[int, set[str]] = {}
        self._relevant_of: tuple[Mapping[int, tuple[IPNetwork, ...]] | None, dict[int, tuple[
            DirectionMapState, Mapping[int, tuple[IPNetwork, ...]], frozenset[int] | None]]] = (None, {})
        self._wide: set[str] = set()

    @property
    def sidecar_names(self) -> frozenset[str]:
        """Endpoints whose sidecar view is set (sidecar mode): only these may be served as nodes,
        never before their view exists, so a sidecar never sees another endpoint's listeners."""
        return self._sidecar_names

    def version_for(self, revision: int) -> str | None:
        return self._revisions.version_for(revision)

    def realize(self, desired: Desired) -> None:
        if self.mode == "sidecar":
            self._realize_sidecars(desired)
            return
        if self.mode == "none":
            listeners: dict[str, Any] = {}
            clusters: dict[str, Any] = {}
            notes: tuple[str, ...] = ()
        else:
            listeners, clusters, notes = self._translate_node(desired, self._prefixes_of(desired))
        problems = self._checker.check({LISTENER: listeners, CLUSTER: clusters})
        if problems:
            raise InconsistentResources("; ".join(problems.describe()))
        update = self.cache.update_many({CLUSTER: TypeChange(clusters, replace=True),
                                         LISTENER: TypeChange(listeners, replace=True)})
        self._revisions.record(desired.revision, update.versions[LISTENER])
        self.notes = notes

    def _prefixes_of(self, desired: Desired) -> Mapping[int, tuple[IPNetwork, ...]]:
        prefixes: Mapping[int, tuple[IPNetwork, ...]] = (
            desired.prefixes if desired.prefixes is not None else prefixes_by_identity(desired.ipcache))
        if prefixes == self._prefixes:
            prefixes = self._prefixes  # the same object: memos match by identity
        self._prefixes = prefixes
        return prefixes

    # ------------------------------------------------------------------ sidecar mode

    def _realize_sidecars(self, desired: Desired) -> None:
        """Translate and publish only what a change touches: the endpoints it names and those whose
        RBACs list a prefix that moved; the cache gets their resources one by one (never a whole type
        replaced), so an endpoint add costs the same at any count. After a failure the next call
        visits and publishes everything (the cache may not hold what ``_translated`` says)."""
        whole = desired.changed is None or self._resync
        self._resync = True
        prefixes = self._prefixes_of(desired)
        moved = _moved(self._sidecar_prefixes, prefixes)
        visit = self._visit(desired, moved, whole)
        translated = dict(self._translated)
        refs = {LISTENER: dict(self._refs[LISTENER]), CLUSTER: dict(self._refs[CLUSTER])}
        upserts: dict[str, dict[str, Any]] = {LISTENER: {}, CLUSTER: {}}
        gone: dict[str, set[str]] = {LISTENER: set(), CLUSTER: set()}
        notes_moved = whole
        replaced: list[tuple[str, _Translated | None, _Translated | None]] = []
        for name in visit:
            before = translated.pop(name, None)
            after = self._translate_sidecar(name, desired.endpoints.get(name), before, prefixes, moved)
            if after is not None:
                translated[name] = after
            replaced.append((name, before, after))
            notes_moved |= (before.notes if before else ()) != (after.notes if after else ())
            if whole or (before is not None and after is not None and before.resources is after.resources):
                continue
            for type_url, old, new in ((LISTENER, _listeners(before), _listeners(after)),
                                       (CLUSTER, _clusters(before), _clusters(after))):
                for n in old:
                    refs[type_url][n] -= 1
                    if not refs[type_url][n]:
                        del refs[type_url][n]
                        gone[type_url].add(n)
                for n, msg in new.items():
                    refs[type_url][n] = refs[type_url].get(n, 0) + 1
                    upserts[type_url][n] = msg
                    gone[type_url].discard(n)
        if whole:
            upserts = {LISTENER: {n: m for t in translated.values() for n, m in _listeners(t).items()},
                       CLUSTER: {n: m for t in translated.values() for n, m in _clusters(t).items()}}
            clusters: Mapping[str, Any] = upserts[CLUSTER]
        else:
            clusters = _Overlay(self._clusters, upserts[CLUSTER], gone[CLUSTER])
        # the listeners published now, against every cluster there will be; those kept refer only
        # to clusters of their own endpoint or shared ones, which stay while any endpoint names them
        problems = self._checker.check_part({LISTENER: upserts[LISTENER], CLUSTER: clusters},
                                            upserts[CLUSTER], gone[LISTENER] if not whole else None)
        if problems:
            raise InconsistentResources("; ".join(problems.describe()))
        self._translated = translated
        self._index(replaced, whole)
        self._set_sidecar_views(desired, visit if not whole else None)
        update = self.cache.update_many({
            CLUSTER: TypeChange(upserts[CLUSTER], tuple(sorted(gone[CLUSTER])), replace=whole),
            LISTENER: TypeChange(upserts[LISTENER], tuple(sorted(gone[LISTENER])), replace=whole)})
        self._revisions.record(desired.revision, update.versions[LISTENER])
        if whole:
            refs = {LISTENER: _count(_listeners(t) for t in translated.values()),
                    CLUSTER: _count(_clusters(t) for t in translated.values())}
            self._clusters = dict(upserts[CLUSTER])
        else:
            for n in gone[CLUSTER]:
                self._clusters.pop(n, None)
            self._clusters.update(upserts[CLUSTER])
        self._refs = refs
        self._sidecar_prefixes = prefixes
        if notes_moved:
            self.notes = tuple(dict.fromkeys(n for _, t in sorted(translated.items()) for n in t.notes))
        self._resync = False

    def _visit(self, desired: Desired, moved: frozenset[int], whole: bool) -> list[str]:
        """The endpoints a change can touch: all when ``whole``; else those it names, those gone, and
        those whose RBACs list an identity whose prefixes moved (or any identity's)."""
        if whole:
            return sorted(desired.endpoints.keys() | self._translated.keys())
        names = set(desired.changed or ()) | (self._translated.keys() - desired.endpoints.keys())
        if moved:
            names |= self._wide
            for ident in moved:
                names |= self._naming.get(ident, set())
        return sorted(names)

    def _index(self, replaced: list[tuple[str, _Translated | None, _Translated | None]], whole: bool) -> None:
        """Keep ``_naming`` and ``_wide`` (which endpoints a moved prefix touches) for the endpoints
        translated now (all of them when ``whole``)."""
        if whole:
            self._naming.clear()
            self._wide.clear()
            replaced = [(n, None, t) for n, t in self._translated.items()]
        for name, before, after in replaced:
            if before is not None:
                if before.named is None:
                    self._wide.discard(name)
                for ident in before.named or ():
                    names = self._naming.get(ident)
                    if names is not None:
                        names.discard(name)
                        if not names:
                            del self._naming[ident]
            if after is not None:
                if after.named is None:
                    self._wide.add(name)
                for ident in after.named or ():
                    self._naming.setdefault(ident, set()).add(name)

    def _relevant(self, ingress: DirectionMapState, prefixes: Mapping[int, tuple[IPNetwork, ...]]
                  ) -> tuple[Mapping[int, tuple[IPNetwork, ...]], frozenset[int] | None]:
        """``relevant_prefixes`` and the identities it is made from (None: it depends on every
        identity's), one object per ingress map state (shared by an app's endpoints) and
        ``prefixes``: their translations then share the matchers made from it."""
        if self._relevant_of[0] is not prefixes:
            self._relevant_of = (prefixes, {})
        hit = self._relevant_of[1].get(id(ingress))
        if hit is not None and hit[0] is ingress:
            return hit[1], hit[2]
        relevant = relevant_prefixes(ingress, prefixes)
        wide = ingress.any_group or any(p.prefixlen < p.max_prefixlen for ps in relevant.values() for p in ps)
        named = None if wide else frozenset(ingress.groups)
        self._relevant_of[1][id(ingress)] = (ingress, relevant, named)
        return relevant, named

    def _translate_sidecar(self, name: str, ep: EndpointState | None, done: _Translated | None,
                           prefixes: Mapping[int, tuple[IPNetwork, ...]], moved: frozenset[int]
                           ) -> _Translated | None:
        """An endpoint's listeners and clusters (None: it has none), from ``done`` when nothing they
        are made of changed."""
        if ep is None:
            return None
        notes: tuple[str, ...] = ()
        if ep.map_state.egress.enforced:
            notes = (f"{name}: egress policy is not enforced: sidecar mode only sees traffic sent to the "
                     "endpoint's ports (egress needs BPF redirection)",)
        if not ep.ports or not ep.ips:
            return _Translated(ep, {}, ProxyResources((), ()), frozenset(), notes) if notes else None
        same = done is not None and _same_sidecar(done.state, ep)
        if same and done is not None and done.named is not None and not done.named & moved:
            return done  # none of the identities it names moved: nor did its prefixes
        relevant, named = self._relevant(ep.map_state.ingress, prefixes)  # what its RBACs list
        if same and done is not None and (done.prefixes is relevant or done.prefixes == relevant):
            res = done.resources
        else:
            ports = [PortMapping(p.port, p.port, p.app_port) for p in ep.ports]
            res = translate_ingress(name, ep.map_state.ingress, ports, ep.ips[0], ep.ips[0], relevant,
                                    self.access_log, self.l7_service, audit=ep.audit_ingress,
                                    upstream_mark=self.sidecar_mark)
            self.translations += 1
        return _Translated(ep, relevant, res, named, notes + res.notes)

    def _set_sidecar_views(self, desired: Desired, visited: list[str] | None) -> None:
        """A sidecar Envoy whose node id is an endpoint's name sees only that endpoint's listeners
        (and their clusters): it runs in the endpoint's namespace and can bind no other address.
        Set before the update, so a sidecar never sees another endpoint's listeners. ``visited``:
        the only endpoints whose resources may have changed (None: any)."""
        names = frozenset(desired.endpoints) if visited is None else (
            (self._sidecar_names - set(visited)) | {n for n in visited if n in desired.endpoints})
        for name in ((names | self._sidecar_names) if visited is None else set(visited)) - {self.node_id}:
            if name in self._sidecar_names and name in names and not desired.is_changed(name):
                continue
            done = self._translated.get(name)
            self.cache.set_node_view(name, LISTENER, [li.name for li in done.resources.listeners] if done else [])
            self.cache.set_node_view(name, CLUSTER, [c.name for c in done.resources.clusters] if done else [])
        self._sidecar_names = names

    # ------------------------------------------------------------------ node mode

    def _translate_node(self, desired: Desired, prefixes: Mapping[int, tuple[IPNetwork, ...]]
                        ) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]:
        """One transparent listener per proxy port on ``listen_address``, where the kernel hands
        redirected connections over, serving every endpoint."""
        endpoints: list[NodeEndpoint] = []
        notes: dict[str, None] = {}
        for name, ep in sorted(desired.endpoints.items()):
            if ep.ips:
                endpoints.append(NodeEndpoint(name, tuple(ipaddress.ip_network(a) for a in ep.ips),
                                              ep.map_state.ingress, ep.map_state.egress, ep.identity,
                                              ep.audit_ingress, ep.audit_egress))
            if ep.interface is None:
                notes[f"{name}: no interface: its policy is not enforced in the kernel "
                      "(add it with --create-netns or --interface)"] = None
        ports = {d: sorted((ProxyPort(int(k.split("/")[1]), v) for k, v in desired.proxy_ports.items()
                            if k.startswith(f"{d.value}/")), key=lambda p: (p.policy_port, p.proxy_port))
                 for d in (Direction.INGRESS, Direction.EGRESS)}
        key = (prefixes, tuple(ports[Direction.INGRESS]), tuple(ports[Direction.EGRESS]),
               *((e.name, e.addresses, e.ingress, e.egress, e.identity, e.audit_ingress, e.audit_egress)
                 for e in endpoints))
        done = self._node
        if done is not None and _same_objects(done[0], key):
            res = done[1]
        else:
            res = translate_node(self.node_id, endpoints, self.listen_address, prefixes,
                                 ingress=ports[Direction.INGRESS], egress=ports[Direction.EGRESS],
                                 access_log=self.access_log, l7_service=self.l7_service)
            self.translations += 1
            self._node = (key, res)
        notes.update(dict.fromkeys(res.notes))
        return ({li.name: li for li in res.listeners}, {c.name: c for c in res.clusters}, tuple(notes))


def _listeners(t: _Translated | None) -> dict[str, Any]:
    return {li.name: li for li in t.resources.listeners} if t is not None else {}


def _clusters(t: _Translated | None) -> dict[str, Any]:
    return {c.name: c for c in t.resources.clusters} if t is not None else {}


def _count(named: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for names in named:
        for n in names:
            out[n] = out.get(n, 0) + 1
    return out


class _Overlay(Mapping[str, Any]):
    """``base`` with ``upserts`` over it and ``gone`` removed, for lookups without a copy."""

    def __init__(self, base: Mapping[str, Any], upserts: Mapping[str, Any], gone: set[str]) -> None:
        self._base, self._upserts, self._gone = base, upserts, gone

    def __getitem__(self, name: str) -> Any:
        if name in self._upserts:
            return self._upserts[name]
        if name in self._gone:
            raise KeyError(name)
        return self._base[name]

    def __iter__(self) -> Iterator[str]:
        yield from self._upserts
        yield from (n for n in self._base if n not in self._gone and n not in self._upserts)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _moved(before: Mapping[int, tuple[IPNetwork, ...]], after: Mapping[int, tuple[IPNetwork, ...]]) -> frozenset[int]:
    """The identities whose prefixes differ (the engine keeps its prefix objects, so equal tuples
    compare by identity, fast)."""
    if before is after:
        return frozenset()
    return frozenset(i for i in before.keys() | after.keys() if before.get(i) != after.get(i))


def _same_sidecar(a: EndpointState, b: EndpointState) -> bool:
    """What a sidecar translation is made of, unchanged (the map state by identity)."""
    return (a.map_state.ingress is b.map_state.ingress and a.ports == b.ports and a.ips[:1] == b.ips[:1]
            and a.audit_ingress == b.audit_ingress)


def _same_objects(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal tuples, with map states and mappings compared by identity: the engine hands out the
    same immutable snapshot until something changes, and comparing their contents would cost
    as much as translating them."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and isinstance(y, tuple):
            if not _same_objects(x, y):
                return False
        elif x is not y and (isinstance(x, DirectionMapState | Mapping) or x != y):
            return False
    return True

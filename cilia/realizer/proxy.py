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
from collections.abc import Mapping
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

    @property
    def sidecar_names(self) -> frozenset[str]:
        """Endpoints whose sidecar view is set (sidecar mode): only these may be served as nodes,
        never before their view exists, so a sidecar never sees another endpoint's listeners."""
        return self._sidecar_names

    def version_for(self, revision: int) -> str | None:
        return self._revisions.version_for(revision)

    def realize(self, desired: Desired) -> None:
        if self.mode == "none":
            listeners: dict[str, Any] = {}
            clusters: dict[str, Any] = {}
            notes: tuple[str, ...] = ()
        else:
            prefixes: Mapping[int, tuple[IPNetwork, ...]] = prefixes_by_identity(desired.ipcache)
            if prefixes == self._prefixes:
                prefixes = self._prefixes  # the same object: memos match by identity
            self._prefixes = prefixes
            if self.mode == "node":
                listeners, clusters, notes = self._translate_node(desired, prefixes)
            else:
                listeners, clusters, notes = self._translate_sidecars(desired, prefixes)
        problems = self._checker.check({LISTENER: listeners, CLUSTER: clusters})
        if problems:
            raise InconsistentResources("; ".join(problems.describe()))
        if self.mode == "sidecar":
            self._set_sidecar_views(desired)
        update = self.cache.update_many({CLUSTER: TypeChange(clusters, replace=True),
                                         LISTENER: TypeChange(listeners, replace=True)})
        self._revisions.record(desired.revision, update.versions[LISTENER])
        self.notes = notes

    # ------------------------------------------------------------------ sidecar mode

    def _translate_sidecars(self, desired: Desired, prefixes: Mapping[int, tuple[IPNetwork, ...]]
                            ) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]:
        moved = _moved(self._sidecar_prefixes, prefixes)
        self._sidecar_prefixes = prefixes
        listeners: dict[str, Any] = {}
        clusters: dict[str, Any] = {}
        notes: dict[str, None] = {}
        translated: dict[str, _Translated] = {}
        for name, ep in sorted(desired.endpoints.items()):
            if ep.map_state.egress.enforced:
                notes[f"{name}: egress policy is not enforced: sidecar mode only sees traffic sent to the "
                      "endpoint's ports (egress needs BPF redirection)"] = None
            if not ep.ports or not ep.ips:
                continue
            done = self._translated.get(name)
            same = done is not None and not desired.is_changed(name) and _same_sidecar(done.state, ep)
            if same and done is not None and done.named is not None and not done.named & moved:
                translated[name] = done  # none of the identities it names moved: nor did its prefixes
                listeners.update((li.name, li) for li in done.resources.listeners)
                clusters.update((c.name, c) for c in done.resources.clusters)
                notes.update(dict.fromkeys(done.resources.notes))
                continue
            relevant = relevant_prefixes(ep.map_state.ingress, prefixes)  # what its RBACs list
            if same and done is not None and (done.prefixes is relevant or done.prefixes == relevant):
                res = done.resources
            else:
                ports = [PortMapping(p.port, p.port, p.app_port) for p in ep.ports]
                res = translate_ingress(name, ep.map_state.ingress, ports, ep.ips[0], ep.ips[0], relevant,
                                        self.access_log, self.l7_service, audit=ep.audit_ingress,
                                        upstream_mark=self.sidecar_mark)
                self.translations += 1
            ingress = ep.map_state.ingress
            wide = ingress.any_group or any(p.prefixlen < p.max_prefixlen for ps in relevant.values() for p in ps)
            translated[name] = _Translated(ep, relevant, res, None if wide else frozenset(ingress.groups))
            listeners.update((li.name, li) for li in res.listeners)
            clusters.update((c.name, c) for c in res.clusters)
            notes.update(dict.fromkeys(res.notes))
        self._translated = translated
        return listeners, clusters, tuple(notes)

    def _set_sidecar_views(self, desired: Desired) -> None:
        """A sidecar Envoy whose node id is an endpoint's name sees only that endpoint's listeners
        (and their clusters): it runs in the endpoint's namespace and can bind no other address.
        Set before the update, so a sidecar never sees another endpoint's listeners."""
        names = frozenset(desired.endpoints)
        for name in (names | self._sidecar_names) - {self.node_id}:
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

"""PolicyEngine: the repository of policies, endpoints and identities, kept
resolved incrementally.

Adding an endpoint or changing a policy recomputes only what it touches:
- a policy change re-resolves the endpoints its old and new rules select;
- a new identity is offered to the selectors that could select it (an index by
  label finds them), and only the policies using those selectors get entries for
  that one identity;
- endpoints with the same identity and named ports share one resolved policy.

Changes are atomic: if any affected endpoint cannot be resolved (an L7
conflict), nothing changes and the error names both rules.
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import cached_property

from .compile import CompiledRule, Note, compile_policy, uses_services
from .errors import PolicyError
from .identity import Identity, IdentityAllocator, IdentityKind, MemoryAllocator, cidr_labels
from .ipcache import IPCache
from .labels import SOURCE_RESERVED, LabelSet, endpoint_labels
from .mapstate import MapState
from .model import IPNetwork, Policy, Protocol
from .l7.dns import normalize as normalize_name
from .peers import FQDNPeer, PeerSelector
from .selectors import LabelSelector
from .toservices import ServiceView, view_of
from ..services.model import Service
from .resolve import (
    MapStateBuilder,
    NamedPortMap,
    SelectorPolicy,
    resolve_selector_policy,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SubjectKey = tuple[int, tuple[tuple[str, int, int], ...]]  # (identity, named ports)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A workload policy applies to: a name, labels, addresses and named ports."""

    name: str
    labels: LabelSet
    ips: tuple[IPAddress, ...] = ()
    named_ports: tuple[tuple[str, int, Protocol], ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """The resolved policy of one endpoint: what Envoy and BPF consume."""

    endpoint: Endpoint
    identity: Identity
    revision: int
    selector_policy: SelectorPolicy
    map_state: MapState

    @property
    def notes(self) -> tuple[Note, ...]:
        return self.selector_policy.notes


@dataclass(frozen=True)
class Change:
    """Result of a mutation: the new revision and the endpoints whose policy changed.

    A new identity selected cluster-wide changes every endpoint; the name set is
    built on first use, so callers that do not need it do not pay for it.
    """

    revision: int
    _groups: tuple[frozenset[str], ...]

    @classmethod
    def of(cls, revision: int, *groups: frozenset[str] | set[str]) -> Change:
        return cls(revision, tuple(g if isinstance(g, frozenset) else frozenset(g) for g in groups))

    @cached_property
    def endpoints(self) -> frozenset[str]:
        return frozenset().union(*self._groups)


@dataclass
class _Subject:
    key: SubjectKey
    labels: LabelSet
    own_ports: NamedPortMap
    rules: list[CompiledRule]
    sp: SelectorPolicy
    builder: MapStateBuilder | None
    endpoints: frozenset[str] = frozenset()  # replaced, not mutated: Changes share it


class PolicyEngine:
    def __init__(self, allocator: IdentityAllocator | None = None) -> None:
        self.allocator: IdentityAllocator = allocator or MemoryAllocator()
        self.ipcache = IPCache()
        self.revision = 1
        self._lock = threading.RLock()
        self._policies: dict[tuple[str, str, str], Policy] = {}
        self._compiled: dict[tuple[str, str, str], list[CompiledRule]] = {}
        self._rule_index: dict[tuple[str, str], set[CompiledRule]] = {}
        self._rule_scan: set[CompiledRule] = set()
        self._prefix_refs: dict[IPNetwork, int] = {}
        self._endpoints: dict[str, Endpoint] = {}
        self._endpoint_subject: dict[str, SubjectKey] = {}
        self._subjects: dict[SubjectKey, _Subject] = {}
        self._subjects_by_identity: dict[int, set[SubjectKey]] = {}
        self._identity_refs: dict[int, int] = {}
        # other nodes' endpoints (from the kvstore): address -> identity, and users per identity
        self._remote: dict[IPNetwork, int] = {}
        self._remote_refs: dict[int, int] = {}
        self._local_ips: dict[IPNetwork, str] = {}  # local endpoints' addresses win over remote ones
        # universe of peer identities and the selector cache
        self._universe: dict[int, Identity] = {}
        self._labels: dict[int, LabelSet] = {}  # _universe's labels: identity_labels copies it in C, per realize
        self._label_index: dict[tuple[str, str], set[int]] = {}
        self._sel: dict[PeerSelector, set[int]] = {}
        self._sel_users: dict[PeerSelector, set[SubjectKey]] = {}
        self._sel_index: dict[tuple[str, str], set[PeerSelector]] = {}
        self._sel_scan: set[PeerSelector] = set()
        self._cluster_ports: dict[str, frozenset[tuple[int, Protocol]]] = {}
        self._port_refs: dict[tuple[str, int, int], int] = {}
        # toFQDNs: names the DNS proxy learned -> addresses. An address holds a CIDR identity (a
        # prefix reference) only while a name with it is matched by a registered toFQDNs selector.
        self._fqdn_names: dict[str, frozenset[IPNetwork]] = {}
        self._fqdn_ip_names: dict[IPNetwork, set[str]] = {}
        self._fqdn_name_peers: dict[str, set[FQDNPeer]] = {}  # only names some selector matches
        self._fqdn_peers: set[FQDNPeer] = set()
        self._fqdn_wanted: dict[IPNetwork, int] = {}  # selected names holding the address
        self._side_changes: set[SubjectKey] = set()  # from (un)registering toFQDNs selectors
        self._batch = 0
        self._dirty: set[SubjectKey] = set()
        # toServices: the services, and the identities of the backend addresses endpoints hold
        self._services: tuple[Service, ...] | None = None  # None until set_services: toServices is noted
        self._service_users: set[tuple[str, str, str]] = set()  # the policies using toServices
        self._compiled_view: ServiceView | None = None  # what they were compiled against
        self._view_cache: ServiceView | None = None  # built when needed, dropped when services or backends move
        self._backend_addresses: frozenset[str] | None = None
        for ident in self.allocator:
            if ident.kind is IdentityKind.RESERVED:
                self._universe_add(ident, notify=False)
        self.ipcache.set_world_defaults()

    # ------------------------------------------------------------------ queries

    def policies(self) -> list[Policy]:
        return [self._policies[k] for k in sorted(self._policies)]

    def endpoints(self) -> list[Endpoint]:
        return [self._endpoints[k] for k in sorted(self._endpoints)]

    def endpoint(self, name: str) -> Endpoint:
        return self._endpoints[name]

    def identity_of(self, name: str) -> Identity:
        ident = self.allocator.get(self._endpoint_subject[name][0])
        assert ident is not None
        return ident

    def endpoint_policy(self, name: str) -> EndpointPolicy:
        with self._lock:
            key = self._endpoint_subject[name]
            subject = self._subjects[key]
            builder = self._ensure_map_state(subject)
            ident = self.allocator.get(key[0])
            assert ident is not None
            return EndpointPolicy(self._endpoints[name], ident, self.revision, subject.sp, builder.snapshot())

    def selections(self, peer: PeerSelector) -> frozenset[int]:
        return frozenset(self._sel.get(peer, ()))

    def identities(self) -> list[Identity]:
        return sorted(self._universe.values(), key=lambda i: i.id)

    def identity_labels(self) -> dict[int, LabelSet]:
        """Every peer identity's labels (unordered: no sort per realize)."""
        with self._lock:
            return dict(self._labels)

    def __len__(self) -> int:
        return len(self._endpoints)

    # ---------------------------------------------------------------- batching

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Defer map-state builds until the end of a bulk load (each endpoint's
        map state is then built once instead of patched per new identity)."""
        with self._lock, self.allocator.batch():
            self._batch += 1
            try:
                yield
            finally:
                self._batch -= 1
                if self._batch == 0:
                    for key in list(self._dirty):
                        subject = self._subjects.get(key)
                        if subject is not None:
                            subject.builder = None
                            self._ensure_map_state(subject)
                    self._dirty.clear()

    # ------------------------------------------------------------------ policies

    def apply(self, policies: Sequence[Policy]) -> Change:
        """Add or replace policies (by kind, namespace, name), all or nothing."""
        with self._lock:
            new = {p.key: p for p in policies}
            return self._replace(new, set())

    def delete(self, keys: Iterable[tuple[str, str, str]]) -> Change:
        with self._lock:
            missing = [k for k in keys if k not in self._policies]
            if missing:
                raise PolicyError(f"no such policy: {', '.join('/'.join(x for x in k if x) for k in missing)}")
            return self._replace({}, set(keys))

    def find_policies(self, name: str, namespace: str | None = None) -> list[tuple[str, str, str]]:
        return [k for k, p in self._policies.items()
                if p.name == name and (namespace is None or p.namespace == namespace)]

    def _replace(self, new: dict[tuple[str, str, str], Policy], removed: set[tuple[str, str, str]]) -> Change:
        old_rules = [r for k in (*new, *removed) for r in self._compiled.get(k, [])]
        users = {k for k, p in new.items() if uses_services(p)}
        view = self._current_view() if users else None
        new_compiled = {k: compile_policy(p, view if k in users else None) for k, p in new.items()}
        new_rules = [r for rules in new_compiled.values() for r in rules]
        affected = self._subjects_matching(old_rules) | self._subjects_matching(new_rules)
        # Resolve every affected subject with the new rule set before changing anything.
        old_set, new_set = set(old_rules), set(new_rules)
        staged: dict[SubjectKey, tuple[list[CompiledRule], SelectorPolicy]] = {}
        for key in affected:
            subject = self._subjects[key]
            rules = [r for r in subject.rules if r not in old_set]
            rules += [r for r in new_rules if r.subject is not None and r.subject.matches(subject.labels)]
            rules.sort(key=_rule_order)
            staged[key] = (rules, resolve_selector_policy(rules, subject.own_ports, self._cluster_ports))
        # Commit.
        for rule in old_rules:
            self._unindex_rule(rule)
        for k in removed:
            self._policies.pop(k, None)
            self._compiled.pop(k, None)
        for k, p in new.items():
            self._policies[k] = p
            self._compiled[k] = new_compiled[k]
        self._service_users = (self._service_users - removed - new.keys()) | users
        if users:
            self._compiled_view = view
        for rule in new_rules:
            self._index_rule(rule)
        changed: set[SubjectKey] = self._update_prefixes(old_rules, new_rules)
        for key, (rules, sp) in staged.items():
            self._set_policy(self._subjects[key], rules, sp)
            changed.add(key)
        del old_set, new_set
        self.revision += 1
        return Change.of(self.revision, *self._endpoints_of(changed | self._take_side_changes()))

    def _index_rule(self, rule: CompiledRule) -> None:
        if rule.subject is None:
            return
        eq = rule.subject.equality_labels()
        if eq:
            self._rule_index.setdefault(eq[0], set()).add(rule)
        else:
            self._rule_scan.add(rule)

    def _unindex_rule(self, rule: CompiledRule) -> None:
        if rule.subject is None:
            return
        eq = rule.subject.equality_labels()
        if eq:
            self._rule_index.get(eq[0], set()).discard(rule)
        else:
            self._rule_scan.discard(rule)

    def _rules_for(self, labels: LabelSet) -> list[CompiledRule]:
        if labels.has_source(SOURCE_RESERVED):
            # The host (and other reserved identities) are selected only by
            # nodeSelector host policies, which are not enforced yet.
            return []
        candidates: set[CompiledRule] = set(self._rule_scan)
        for key, label in labels.items():
            candidates.update(self._rule_index.get((key, label.value), ()))
        out = [r for r in candidates if r.subject is not None and r.subject.matches(labels)]
        out.sort(key=_rule_order)
        return out

    def _smallest_bucket(self, selector: LabelSelector) -> Iterable[int] | None:
        """The identities holding the rarest label the selector requires (None:
        it requires no exact label, so every identity is a candidate)."""
        best: set[int] | None = None
        for label in selector.equality_labels():
            ids = self._label_index.get(label, set())
            if best is None or len(ids) < len(best):
                best = ids
        return best

    def _subjects_matching(self, rules: Iterable[CompiledRule]) -> set[SubjectKey]:
        out: set[SubjectKey] = set()
        for rule in rules:
            if rule.subject is None:
                continue
            ids = self._smallest_bucket(rule.subject)
            for ident_id in (ids if ids is not None else list(self._subjects_by_identity)):
                for key in self._subjects_by_identity.get(ident_id, ()):
                    if rule.subject.matches(self._subjects[key].labels):
                        out.add(key)
        return out

    def _update_prefixes(self, old_rules: Iterable[CompiledRule],
                         new_rules: Iterable[CompiledRule]) -> set[SubjectKey]:
        """Allocate CIDR identities for prefixes policies now name and release the
        ones no longer named; returns the endpoints whose selections changed."""
        changed: set[SubjectKey] = set()
        for rule in new_rules:
            for prefix in rule.prefixes:
                changed |= self._prefix_ref(prefix, +1)
        for rule in old_rules:
            for prefix in rule.prefixes:
                changed |= self._prefix_ref(prefix, -1)
        return changed

    def _prefix_ref(self, prefix: IPNetwork, delta: int) -> set[SubjectKey]:
        """One more (+1) or one fewer (-1) user of ``prefix`` (a policy's CIDR or a learned
        address): the first allocates its CIDR identity and puts it in the ipcache (an endpoint's
        own address keeps its identity), the last releases it."""
        refs = self._prefix_refs.get(prefix, 0) + delta
        if refs > 0:
            self._prefix_refs[prefix] = refs
            if refs == 1 and delta > 0:
                ident = self.allocator.allocate_cidr(prefix)
                if prefix not in self._local_ips:
                    self.ipcache.upsert(prefix, ident.id)
                return self._universe_add(ident)
            return set()
        self._prefix_refs.pop(prefix, None)
        ident = self.allocator.allocate_cidr(prefix)
        if self.ipcache.get(prefix) == ident.id:
            self.ipcache.delete(prefix)
        changed = self._universe_remove(ident)
        self.allocator.release(ident.id)
        return changed

    # ----------------------------------------------------------------- endpoints

    def upsert_endpoint(self, endpoint: Endpoint) -> Change:
        """Add an endpoint or update its labels, addresses or named ports."""
        with self._lock:
            endpoint = Endpoint(endpoint.name, endpoint_labels(endpoint.labels),
                                tuple(endpoint.ips), tuple(sorted(endpoint.named_ports)))
            old = self._endpoints.get(endpoint.name)
            if old == endpoint:
                return Change.of(self.revision)
            own_ports = _port_map(endpoint.named_ports)
            port_key = tuple(sorted((n, p, int(pr)) for n, p, pr in endpoint.named_ports))
            # Resolve before changing anything: an L7 conflict must leave no trace
            # (no identity allocated, the old endpoint untouched).
            known = self.allocator.lookup(endpoint.labels)
            staged: tuple[list[CompiledRule], SelectorPolicy] | None = None
            if known is None or (known.id, port_key) not in self._subjects:
                rules = self._rules_for(endpoint.labels)
                staged = (rules, resolve_selector_policy(rules, own_ports, self._cluster_ports))
            ident = self.allocator.allocate(endpoint.labels)
            key: SubjectKey = (ident.id, port_key)
            changed: set[SubjectKey] = set()
            # Hold the new identity before detaching the old endpoint: when only
            # its addresses or named ports change, the identity stays allocated.
            refs = self._identity_refs.get(ident.id, 0)
            self._identity_refs[ident.id] = refs + 1
            if old is not None:
                changed |= self._detach(old)
                if self._count_ports(old, -1):
                    changed |= self._refresh_cluster_ports()
            subject = self._subjects.get(key)
            if subject is None:
                if staged is None:  # the old endpoint was the subject's last user
                    rules = self._rules_for(endpoint.labels)
                    staged = (rules, resolve_selector_policy(rules, own_ports, self._cluster_ports))
                rules, sp = staged
                subject = _Subject(key, endpoint.labels, own_ports, rules, sp, None)
                self._subjects[key] = subject
                self._subjects_by_identity.setdefault(ident.id, set()).add(key)
                self._register_peers(subject, set(), sp.peers())
                changed.add(key)
            subject.endpoints = subject.endpoints | {endpoint.name}
            self._endpoints[endpoint.name] = endpoint
            self._endpoint_subject[endpoint.name] = key
            if refs == 0:
                changed |= self._universe_add(ident)
            for ip in endpoint.ips:
                net = ipaddress.ip_network(ip)
                self.ipcache.upsert(net, ident.id)
                self._local_ips[net] = endpoint.name
            if self._count_ports(endpoint, +1):
                changed |= self._refresh_cluster_ports()
            if not self._batch:
                self._ensure_map_state(subject)
            moved = self._backends_moved(endpoint.ips, old.ips if old is not None else ())
            if self._batch:  # bulk loads do not need the change set
                return Change.of(self.revision, {endpoint.name}, *moved,
                                 *self._endpoints_of(self._take_side_changes()))
            return Change.of(self.revision, {endpoint.name}, *self._endpoints_of(changed | self._take_side_changes()),
                             *moved)

    def remove_endpoint(self, name: str) -> Change:
        with self._lock:
            old = self._endpoints.get(name)
            if old is None:
                raise PolicyError(f"no such endpoint: {name}")
            changed = self._detach(old)
            if self._count_ports(old, -1):
                changed |= self._refresh_cluster_ports()
            moved = self._backends_moved(old.ips)
            return Change.of(self.revision, {name}, *self._endpoints_of(changed | self._take_side_changes()), *moved)

    def _detach(self, ep: Endpoint) -> set[SubjectKey]:
        key = self._endpoint_subject.pop(ep.name)
        self._endpoints.pop(ep.name, None)
        for ip in ep.ips:
            net = ipaddress.ip_network(ip)
            if self._local_ips.get(net) == ep.name:
                del self._local_ips[net]
            if self.ipcache.get(net) == key[0]:
                self.ipcache.delete(net)
                if net in self._remote:  # another node's endpoint had (or has) this address
                    self.ipcache.upsert(net, self._remote[net])
                elif net in self._prefix_refs:  # a policy names it (toCIDR, toServices): its CIDR identity
                    self.ipcache.upsert(net, self.allocator.allocate_cidr(net).id)
        subject = self._subjects[key]
        subject.endpoints = subject.endpoints - {ep.name}
        changed: set[SubjectKey] = set()
        if not subject.endpoints:
            self._register_peers(subject, subject.sp.peers(), set())
            del self._subjects[key]
            self._subjects_by_identity[key[0]].discard(key)
            if not self._subjects_by_identity[key[0]]:
                del self._subjects_by_identity[key[0]]
            self._dirty.discard(key)
        self._identity_refs[key[0]] -= 1
        if self._identity_refs[key[0]] == 0:
            del self._identity_refs[key[0]]
            ident = self.allocator.get(key[0])
            if ident is not None:
                if key[0] not in self._remote_refs:  # still a peer while another node's endpoint has it
                    changed |= self._universe_remove(ident)
                self.allocator.release(ident.id)
        return changed

    # ------------------------------------------------------------------ services (toServices)

    def set_services(self, services: Iterable[Service]) -> Change:
        """The services ``toServices`` selects from; the policies using it are recompiled (all or
        nothing, like ``apply``) when what they resolve to changed. Without such policies this
        only stores them (the view is built when a policy first needs it): a service change
        costs the engine nothing then."""
        with self._lock:
            before = self._services, self._backend_addresses, self._view_cache
            self._services = tuple(services)
            self._backend_addresses = self._view_cache = None
            try:
                return Change.of(self.revision, *self._refresh_services())
            except BaseException:
                self._services, self._backend_addresses, self._view_cache = before
                raise

    @property
    def service_view(self) -> ServiceView | None:
        """What ``toServices`` resolves against now (None: no services were ever given)."""
        with self._lock:
            return self._current_view()

    def _current_view(self) -> ServiceView | None:
        if self._services is None:
            return None
        if self._view_cache is None:
            self._view_cache = view_of(self._services, self._holders())
        return self._view_cache

    def _backends(self) -> frozenset[str]:
        if self._backend_addresses is None:
            self._backend_addresses = frozenset(b.address for s in self._services or () for b in s.backends)
        return self._backend_addresses

    def _backends_moved(self, *addresses: Iterable[IPAddress]) -> list[frozenset[str]]:
        """After an endpoint (or remote address) change: re-resolve toServices if it touched a backend."""
        if self._services is None:
            return []
        backends = self._backends()
        if not backends or not any(str(a) in backends for group in addresses for a in group):
            return []
        self._view_cache = None
        return self._refresh_services()

    def _holders(self) -> dict[str, tuple[int, str]]:
        """Backend address -> (identity, endpoint) for the addresses an endpoint holds (a local one first)."""
        backends = self._backends()
        held: dict[str, tuple[int, str]] = {}
        for net, identity in self._remote.items():
            address = str(net.network_address)
            if net.prefixlen == net.max_prefixlen and address in backends:
                held[address] = (identity, f"identity {identity} on another node")
        for net, name in self._local_ips.items():
            address = str(net.network_address)
            if address in backends:
                held[address] = (self._endpoint_subject[name][0], name)
        return held

    def _refresh_services(self) -> list[frozenset[str]]:
        """Recompile the policies using toServices if what they resolve to changed."""
        if not self._service_users:
            return []
        view = self._current_view()
        if view == self._compiled_view:
            return []
        users = {k: self._policies[k] for k in self._service_users}
        return [self._replace(users, set()).endpoints]

    # ------------------------------------------------------------ other nodes' endpoints

    def update_remote(self, upserts: Mapping[IPNetwork, int], deletes: Iterable[IPNetwork] = ()) -> Change:
        """Addresses of other nodes' endpoints (a producer of ipcache entries, e.g. the kvstore):
        each prefix now holds that identity, or is gone. The identity's labels come from the
        allocator: an identity it does not know is selected by no selector (its traffic is
        denied), yet its addresses leave ``world``. A local endpoint's address wins."""
        deletes = tuple(deletes)  # read twice: here and for toServices below
        with self._lock:
            changed: set[SubjectKey] = set()
            for prefix in deletes:
                old = self._remote.pop(prefix, None)
                if old is None:
                    continue
                if prefix not in self._local_ips:
                    self.ipcache.delete(prefix)
                changed |= self._remote_unref(old)
            for prefix, identity in upserts.items():
                old = self._remote.get(prefix)
                if old == identity:
                    continue
                self._remote[prefix] = identity
                if prefix not in self._local_ips:
                    self.ipcache.upsert(prefix, identity)
                refs = self._remote_refs.get(identity, 0)
                self._remote_refs[identity] = refs + 1
                if refs == 0:
                    changed |= self._remote_learn(identity)
                if old is not None:
                    changed |= self._remote_unref(old)
            moved = self._backends_moved(p.network_address for p in (*upserts, *deletes))
            return Change.of(self.revision, *self._endpoints_of(changed), *moved)

    def refresh_remote(self, identity: int) -> Change:
        """The allocator may know ``identity``'s labels now (they arrived after its addresses)."""
        with self._lock:
            if identity not in self._remote_refs:
                return Change.of(self.revision)
            return Change.of(self.revision, *self._endpoints_of(self._remote_learn(identity)))

    def remote(self) -> dict[IPNetwork, int]:
        with self._lock:
            return dict(self._remote)

    def _remote_learn(self, identity: int) -> set[SubjectKey]:
        if identity in self._universe:
            return set()
        ident = self.allocator.get(identity)
        if ident is None or ident.kind is not IdentityKind.ENDPOINT:
            return set()  # unknown (or claims to be reserved/CIDR): selected by nothing
        return self._universe_add(ident)

    def _remote_unref(self, identity: int) -> set[SubjectKey]:
        refs = self._remote_refs[identity] - 1
        if refs:
            self._remote_refs[identity] = refs
            return set()
        del self._remote_refs[identity]
        ident = self._universe.get(identity)
        if ident is None or identity in self._identity_refs or ident.kind is not IdentityKind.ENDPOINT:
            return set()
        return self._universe_remove(ident)

    def _count_ports(self, ep: Endpoint, delta: int) -> bool:
        """Track every endpoint's named ports; True if the set of names changed."""
        changed = False
        for name, num, proto in ep.named_ports:
            key = (name, num, int(proto))
            refs = self._port_refs.get(key, 0) + delta
            if refs > 0:
                self._port_refs[key] = refs
            else:
                self._port_refs.pop(key, None)
            if refs == 0 or (delta > 0 and refs == 1):  # a port appeared or vanished
                changed = True
        return changed

    def _refresh_cluster_ports(self) -> set[SubjectKey]:
        """Egress named ports resolve against every endpoint's ports; when that
        map changes, re-resolve the endpoints whose egress rules use names."""
        ports: dict[str, set[tuple[int, Protocol]]] = {}
        for name, num, proto in self._port_refs:
            ports.setdefault(name, set()).add((num, Protocol(proto)))
        self._cluster_ports = {k: frozenset(v) for k, v in ports.items()}
        changed = set()
        for key, subject in self._subjects.items():
            if subject.sp.uses_cluster_named_ports:
                sp = resolve_selector_policy(subject.rules, subject.own_ports, self._cluster_ports)
                self._set_policy(subject, subject.rules, sp)
                changed.add(key)
        return changed

    # ------------------------------------------------------ selectors & identities

    def _set_policy(self, subject: _Subject, rules: list[CompiledRule], sp: SelectorPolicy) -> None:
        old_peers = subject.sp.peers()
        subject.rules = rules
        subject.sp = sp
        self._register_peers(subject, old_peers, sp.peers())
        subject.builder = None
        if self._batch:
            self._dirty.add(subject.key)
        else:
            self._ensure_map_state(subject)

    def _ensure_map_state(self, subject: _Subject) -> MapStateBuilder:
        if subject.builder is None:
            subject.builder = MapStateBuilder(subject.sp, lambda peer: self._sel.get(peer, ()))
        return subject.builder

    def _register_peers(self, subject: _Subject, old: set[PeerSelector], new: set[PeerSelector]) -> None:
        for peer in new - old:
            users = self._sel_users.get(peer)
            if users is None:
                self._sel_users[peer] = users = set()
                if isinstance(peer, FQDNPeer):
                    self._sel[peer] = set()
                    self._fqdn_register(peer)
                    users.add(subject.key)
                    continue
                self._sel[peer] = {i for i, ident in self._candidates_for(peer) if peer.selects(ident)}
                label = peer.index_label()
                if label is not None:
                    self._sel_index.setdefault(label, set()).add(peer)
                else:
                    self._sel_scan.add(peer)
            users.add(subject.key)
        for peer in old - new:
            users = self._sel_users.get(peer)
            if users is None:
                continue
            users.discard(subject.key)
            if not users:
                del self._sel_users[peer]
                del self._sel[peer]
                if isinstance(peer, FQDNPeer):
                    self._fqdn_unregister(peer)
                    continue
                label = peer.index_label()
                if label is not None:
                    self._sel_index[label].discard(peer)
                else:
                    self._sel_scan.discard(peer)

    def _candidates_for(self, peer: PeerSelector) -> Iterable[tuple[int, Identity]]:
        label = peer.index_label()
        if label is not None:
            return ((i, self._universe[i]) for i in self._label_index.get(label, ()))
        if peer.only_cidr():
            return ((i, ident) for i, ident in self._universe.items()
                    if ident.kind is not IdentityKind.ENDPOINT)
        return self._universe.items()

    def _peers_that_may_select(self, ident: Identity) -> set[PeerSelector]:
        peers: set[PeerSelector] = set(self._sel_scan)
        for key, label in ident.labels.items():
            peers.update(self._sel_index.get((key, label.value), ()))
        return peers

    def _universe_add(self, ident: Identity, notify: bool = True) -> set[SubjectKey]:
        if ident.id in self._universe:
            return set()
        self._universe[ident.id] = ident
        self._labels[ident.id] = ident.labels
        for key, label in ident.labels.items():
            self._label_index.setdefault((key, label.value), set()).add(ident.id)
        affected: set[SubjectKey] = set()
        selecting: set[PeerSelector] = set()
        for peer in self._peers_that_may_select(ident):
            if peer.selects(ident):
                self._sel[peer].add(ident.id)
                selecting.add(peer)
                affected |= self._sel_users[peer]
        for fqdn_peer in self._fqdn_selecting(ident):
            self._sel[fqdn_peer].add(ident.id)
            selecting.add(fqdn_peer)
            affected |= self._sel_users[fqdn_peer]
        if notify:
            self._peer_changed(affected, ident.id, frozenset(selecting))
        return affected

    def _universe_remove(self, ident: Identity) -> set[SubjectKey]:
        if ident.id not in self._universe:
            return set()
        del self._universe[ident.id]
        del self._labels[ident.id]
        for key, label in ident.labels.items():
            ids = self._label_index.get((key, label.value))
            if ids is not None:
                ids.discard(ident.id)
                if not ids:
                    del self._label_index[(key, label.value)]
        affected: set[SubjectKey] = set()
        for peer in (*self._peers_that_may_select(ident), *self._fqdn_peers):
            ids = self._sel[peer]
            if ident.id in ids:
                ids.discard(ident.id)
                affected |= self._sel_users[peer]
        self._peer_changed(affected, ident.id, frozenset())
        return affected

    def _peer_changed(self, subjects: set[SubjectKey], identity: int, peers: frozenset[PeerSelector]) -> None:
        """``identity`` is now selected by exactly ``peers``: patch the map
        states of the endpoints using any of them."""
        for key in subjects:
            subject = self._subjects.get(key)
            if subject is None or subject.builder is None:
                continue
            if self._batch:
                self._dirty.add(key)
                continue
            subject.builder.set_identity(identity, peers)

    def _endpoints_of(self, keys: Iterable[SubjectKey]) -> list[frozenset[str]]:
        return [self._subjects[k].endpoints for k in keys if k in self._subjects]

    def _take_side_changes(self) -> set[SubjectKey]:
        out, self._side_changes = self._side_changes, set()
        return out

    # ------------------------------------------------------------------ toFQDNs

    def update_fqdn(self, names: Mapping[str, Iterable[IPAddress | str]]) -> Change:
        """What the DNS proxy learned: each name now holds exactly these addresses (none: the name
        is gone). Every toFQDNs selector matching a name selects its addresses' CIDR identities
        (allocated, and put in the ipcache, while some selector wants them). An allocator that can
        defer persisting them (``FileAllocator.deferred``) does: the caller flushes it."""
        deferred = getattr(self.allocator, "deferred", None)
        with self._lock, (deferred() if deferred is not None else nullcontext()):
            touched: set[IPNetwork] = set()
            gained: list[IPNetwork] = []
            lost: list[IPNetwork] = []
            for raw_name, ips in names.items():
                name = normalize_name(raw_name)
                new = frozenset(_host_prefix(ip) for ip in ips)
                old = self._fqdn_names.get(name, frozenset())
                if new == old:
                    continue
                touched |= old | new
                was_selected = name in self._fqdn_name_peers
                for net in new - old:
                    self._fqdn_ip_names.setdefault(net, set()).add(name)
                for net in old - new:
                    holders = self._fqdn_ip_names[net]
                    holders.discard(name)
                    if not holders:
                        del self._fqdn_ip_names[net]
                if new:
                    self._fqdn_names[name] = new
                    if not old:
                        peers = {p for p in self._fqdn_peers if p.matches_name(name)}
                        if peers:
                            self._fqdn_name_peers[name] = peers
                else:
                    del self._fqdn_names[name]
                    self._fqdn_name_peers.pop(name, None)
                if was_selected:
                    lost.extend(old)
                if name in self._fqdn_name_peers:
                    gained.extend(new)
            changed: set[SubjectKey] = set()
            for net in gained:  # references first, so an address another name keeps never bounces
                changed |= self._fqdn_want(net, +1)
            for net in lost:
                changed |= self._fqdn_want(net, -1)
            for net in touched:
                changed |= self._fqdn_refresh(net)
            return Change.of(self.revision, *self._endpoints_of(changed))

    def fqdn_names(self) -> dict[str, frozenset[IPNetwork]]:
        """Every learned name and its addresses."""
        with self._lock:
            return dict(self._fqdn_names)

    def fqdn_selected(self, name: str) -> bool:
        """Whether some toFQDNs selector matches ``name``."""
        return normalize_name(name) in self._fqdn_name_peers

    def _fqdn_want(self, net: IPNetwork, delta: int) -> set[SubjectKey]:
        refs = self._fqdn_wanted.get(net, 0) + delta
        if refs > 0:
            self._fqdn_wanted[net] = refs
        else:
            self._fqdn_wanted.pop(net, None)
        if refs == 0 or (delta > 0 and refs == 1):
            return self._prefix_ref(net, +1 if delta > 0 else -1)
        return set()

    def _fqdn_selecting(self, ident: Identity) -> set[FQDNPeer]:
        """The toFQDNs selectors that select a CIDR identity: those matching a name holding it."""
        if ident.kind is not IdentityKind.CIDR or ident.prefix is None:
            return set()
        out: set[FQDNPeer] = set()
        for name in self._fqdn_ip_names.get(ident.prefix, ()):
            out |= self._fqdn_name_peers.get(name, set())
        return out

    def _fqdn_refresh(self, net: IPNetwork) -> set[SubjectKey]:
        """Make the toFQDNs selections of ``net``'s identity (if it has one) what the names now say,
        and patch the map states of the endpoints using the selectors that moved."""
        if net not in self._prefix_refs:
            return set()
        ident = self.allocator.lookup(cidr_labels(net))
        if ident is None or ident.id not in self._universe:
            return set()
        want = self._fqdn_selecting(ident)
        have = {p for p in self._fqdn_peers if ident.id in self._sel[p]}
        if want == have:
            return set()
        affected: set[SubjectKey] = set()
        for peer in want ^ have:
            if peer in want:
                self._sel[peer].add(ident.id)
            else:
                self._sel[peer].discard(ident.id)
            affected |= self._sel_users[peer]
        selecting = {p for p in self._peers_that_may_select(ident) if p.selects(ident)} | want
        self._peer_changed(affected, ident.id, frozenset(selecting))
        return affected

    def _fqdn_register(self, peer: FQDNPeer) -> None:
        """A new toFQDNs selector: it selects the learned addresses of every name it matches."""
        self._fqdn_peers.add(peer)
        nets: set[IPNetwork] = set()
        for name, ips in self._fqdn_names.items():
            if not peer.matches_name(name):
                continue
            peers = self._fqdn_name_peers.get(name)
            if peers is None:
                self._fqdn_name_peers[name] = {peer}
                for net in ips:
                    self._side_changes |= self._fqdn_want(net, +1)
            else:
                peers.add(peer)
            nets |= ips
        for net in nets:
            self._side_changes |= self._fqdn_refresh(net)

    def _fqdn_unregister(self, peer: FQDNPeer) -> None:
        self._fqdn_peers.discard(peer)
        nets: set[IPNetwork] = set()
        for name in [n for n, peers in self._fqdn_name_peers.items() if peer in peers]:
            peers = self._fqdn_name_peers[name]
            peers.discard(peer)
            ips = self._fqdn_names.get(name, frozenset())
            if not peers:
                del self._fqdn_name_peers[name]
                for net in ips:
                    self._side_changes |= self._fqdn_want(net, -1)
            nets |= ips
        for net in nets:
            self._side_changes |= self._fqdn_refresh(net)


def _host_prefix(ip: IPAddress | str) -> IPNetwork:
    addr = ipaddress.ip_address(ip)
    return ipaddress.ip_network(f"{addr}/{addr.max_prefixlen}")


def _rule_order(rule: CompiledRule) -> tuple[tuple[str, str, str], str]:
    return (rule.policy.key, rule.origin.path)


def _port_map(named: Iterable[tuple[str, int, Protocol]]) -> dict[str, frozenset[tuple[int, Protocol]]]:
    out: dict[str, set[tuple[int, Protocol]]] = {}
    for name, num, proto in named:
        out.setdefault(name, set()).add((num, Protocol(proto)))
    return {k: frozenset(v) for k, v in out.items()}


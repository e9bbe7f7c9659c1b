"""``CRDAllocator``: identities numbered cluster-wide through ``CiliumIdentity`` objects (Cilium's
CRD mode: no kvstore, the API server is the shared store).

A ``CiliumIdentity`` is cluster-scoped, named by its number, with the labels in
``security-labels`` (``source:key`` → value, as Cilium writes them). The API server can create one
object if its name is free (409 otherwise) but has no multi-object transaction, so the number is
derived from the labels: candidates follow a probe sequence that starts at a hash of the sorted
label strings. Every node allocating the same labels walks the same sequence: at each candidate
it creates the object, or reads the one that exists; the first candidate that is free or already
holds these labels is the identity. So two nodes asking at the same moment get one number, and
one number never names two label sets (a name is created once).

Allocation is an API request: ``prepare`` does it before the agent takes its lock (the agent calls
``prepare`` when its allocator has one), ``allocate`` inside is then a lookup. The watcher feeds
every ``CiliumIdentity`` in (``sync``/``upsert``/``remove``: it is a watch handler), so a remote
endpoint's identity maps to its labels; one whose labels do not parse, that claims reserved
labels, or whose labels change after it was seen is logged, counted and unknown (selected by
nothing: its traffic is denied). The API server unreachable: ``IdentityUnavailable``, never a
node-local number. Not done: garbage collection of identities no endpoint uses any more (Cilium's
operator does it).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from ..policy.identity import (
    MAX_ALLOCATED,
    MIN_ALLOCATED,
    Identity,
    IdentityKind,
    IdentityUnavailable,
)
from ..cluster.shared import SharedAllocator
from ..policy.labels import SOURCE_RESERVED, LabelSet

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

_log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "cilium.io", "v2", "ciliumidentities"
_SPAN = MAX_ALLOCATED - MIN_ALLOCATED + 1
_CONFLICT = 409


def candidates(labels: LabelSet, attempts: int) -> Iterator[int]:
    """The probe sequence of ``labels``: the same on every node."""
    digest = hashlib.sha256("\n".join(sorted(labels.to_list())).encode()).digest()
    start = int.from_bytes(digest[:8], "big") % _SPAN
    for i in range(attempts):
        yield MIN_ALLOCATED + (start + i) % _SPAN


def security_labels(labels: LabelSet) -> dict[str, str]:
    """``k8s:app=x`` → ``{"k8s:app": "x"}`` (CiliumIdentity's form)."""
    out = {}
    for text in labels.to_list():
        key, _, value = text.partition("=")
        out[key] = value
    return out


def identity_object(number: int, labels: LabelSet) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "CiliumIdentity",
            "metadata": {"name": str(number), "labels": {"io.cilium.k8s.policy.cluster": "default"}},
            "security-labels": security_labels(labels)}


def parse_identity(obj: Mapping[str, Any]) -> Identity:
    """A CiliumIdentity object as an endpoint identity; ValueError naming what is wrong."""
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name.isdigit():
        raise ValueError(f"CiliumIdentity {name!r}: the name is not an identity number")
    number = int(name)
    if not MIN_ALLOCATED <= number <= MAX_ALLOCATED:
        raise ValueError(f"CiliumIdentity {name}: outside 256-65535")
    raw = obj.get("security-labels")
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(k, str) and isinstance(v, str)
                                                           for k, v in raw.items()):
        raise ValueError(f"CiliumIdentity {name}: security-labels is not a map of strings")
    try:
        labels = LabelSet.parse([f"{k}={v}" if v else k for k, v in raw.items()])
    except ValueError as e:
        raise ValueError(f"CiliumIdentity {name}: {e}") from None
    if labels.has_source(SOURCE_RESERVED):
        raise ValueError(f"CiliumIdentity {name}: claims reserved labels {labels}")
    return Identity(number, labels, IdentityKind.ENDPOINT)


class CRDAllocator(SharedAllocator):
    def __init__(self, api: ApiClient, attempts: int = 64, timeout: float = 10.0) -> None:
        super().__init__()
        from kubernetes import client

        self._custom = client.CustomObjectsApi(api)
        self.attempts = attempts
        self.timeout = timeout
        self.objects = 0  # CiliumIdentity objects seen (valid or not)

    # ------------------------------------------------------------------ IdentityAllocator

    def allocate(self, labels: LabelSet) -> Identity:
        if labels.has_source(SOURCE_RESERVED):
            found = self._by_labels.get(labels)
            if found is None:
                raise ValueError(f"labels {labels} name a reserved identity that does not exist")
            return found
        with self._cluster_lock:
            held = self._held.get(labels)
        if held is not None:
            return held
        with self._io_lock:
            with self._cluster_lock:
                held = self._held.get(labels)
            if held is not None:
                return held
            ident = Identity(self._allocate(labels), labels, IdentityKind.ENDPOINT)
            with self._cluster_lock:
                self._held[labels] = ident
                self._learn(ident)
            return ident

    def prepare(self, labels: LabelSet) -> AbstractContextManager[Identity]:
        """Allocate now (before the agent's lock); held from then on, so ``allocate`` is a lookup.
        (No release in CRD mode: a held identity stays held while the agent runs.)"""
        return nullcontext(self.allocate(labels))

    def release(self, identity_id: int) -> None:
        if not MIN_ALLOCATED <= identity_id <= MAX_ALLOCATED:
            super().release(identity_id)  # CIDR identities are node-local

    # ------------------------------------------------------------------ allocation

    def _allocate(self, labels: LabelSet) -> int:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        with self._cluster_lock:
            known = self._known_labels.get(labels)
        if known is not None:
            return known.id  # the watcher has seen it: no request
        try:
            for number in candidates(labels, self.attempts):
                with self._cluster_lock:
                    taken = self._known.get(number)
                if taken is not None and taken.labels != labels:
                    continue  # another label set's, as the watcher saw it
                try:
                    self._custom.create_cluster_custom_object(GROUP, VERSION, PLURAL, identity_object(number, labels),
                                                              _request_timeout=self.timeout)
                    return number
                except ApiException as e:
                    if e.status != _CONFLICT:
                        raise
                existing = _as_dict(self._custom.get_cluster_custom_object(GROUP, VERSION, PLURAL, str(number),
                                                                           _request_timeout=self.timeout))
                try:
                    if parse_identity(existing).labels == labels:
                        return number
                except ValueError as e:  # a broken object holds this number: the next one
                    _log.warning("k8s: %s", e)
        except ApiException as e:
            raise IdentityUnavailable(f"no cluster-wide identity for {labels}: API server: {e.status} "
                                      f"{e.reason}") from None
        except (HTTPError, OSError) as e:
            raise IdentityUnavailable(f"no cluster-wide identity for {labels}: API server: {e}") from None
        raise IdentityUnavailable(f"no cluster-wide identity for {labels}: {self.attempts} candidates taken")

    # ------------------------------------------------------------------ the watch handler

    def count(self) -> int:
        return self.objects

    def sync(self, items: Sequence[Mapping[str, Any]]) -> None:
        names = {str((o.get("metadata") or {}).get("name")) for o in items}
        with self._cluster_lock:
            before = set(self._known)
            for number in [n for n in self._known if str(n) not in names]:
                self._forget(number)
            self._rewritten = {n for n in self._rewritten if str(n) in names}
            for obj in items:
                self._apply(obj)
            self.objects = len(items)
            learned = sorted(set(self._known) - before)
        self._tell(learned)

    def upsert(self, obj: Mapping[str, Any]) -> None:
        with self._cluster_lock:
            before = set(self._known)
            self._apply(obj)
            learned = sorted(set(self._known) - before)
        self._tell(learned)

    def remove(self, obj: Mapping[str, Any]) -> None:
        name = str((obj.get("metadata") or {}).get("name"))
        if name.isdigit():
            with self._cluster_lock:
                self._forget(int(name))
                self._rewritten.discard(int(name))

    def _apply(self, obj: Mapping[str, Any]) -> None:
        try:
            ident = parse_identity(obj)
        except ValueError as e:
            self.malformed += 1
            _log.warning("k8s: skipping %s; its traffic is denied", e)
            return
        old = self._known.get(ident.id)
        if ident.id in self._rewritten or (old is not None and old.labels != ident.labels):
            # created once with its labels: another writer changed them; the new ones could widen access
            self._rewritten.add(ident.id)
            self._forget(ident.id)
            self.malformed += 1
            _log.warning("k8s: CiliumIdentity %d's labels changed to %s; its traffic is denied", ident.id,
                         ident.labels)
            return
        self._learn(ident)

    def _learn(self, ident: Identity) -> None:
        self._known[ident.id] = ident
        self._known_labels[ident.labels] = ident

    def _forget(self, number: int) -> None:
        old = self._known.pop(number, None)
        if old is not None and self._known_labels.get(old.labels) is old:
            del self._known_labels[old.labels]

    def _tell(self, learned: list[int]) -> None:
        if learned:
            for callback in list(self.on_learned):
                callback(learned)

    def status(self) -> dict[str, Any]:
        return {"objects": self.objects, "known": len(self._known), "held": len(self._held),
                "malformed": self.malformed}


def _as_dict(obj: object) -> dict[str, Any]:
    """The client's JSON answer (typed ``object``) as the mapping it is (empty if it is not)."""
    return obj if isinstance(obj, dict) else {}

"""``ClusterAllocator``: identities numbered cluster-wide through the kvstore.

An implementation of ``cilia.policy.IdentityAllocator``, so the engine uses it unchanged:

- ``allocate(labels)``: if the labels key exists, reference its ID (``refs/<ID>/<node>`` under the
  node's lease) and read the labels key again: if it still names that ID, no collector can delete
  it any more (the collector's transaction requires no reference). Otherwise create the labels key,
  the ID key and this node's reference in one transaction that requires that neither the labels
  nor the ID exist: of several nodes allocating the same labels at once exactly one wins and the
  others read its ID. Candidate IDs are drawn at random from the free ones (256-65535).
- CIDR identities stay node-local (bit 24 set, as Cilium's), as do the reserved ones.
- ``release``: drop this node's reference, on a thread of its own (the engine calls it under the
  agent's lock, which must never wait for the store); ``collect_garbage`` deletes an ID (and its
  labels key) that no node has referenced for ``grace`` seconds, in a transaction that fails if
  either key changed or a reference appeared meanwhile.
- ``prepare(labels)``: allocate before taking the agent's lock (the store's I/O happens there) and
  keep the identity held until the engine has taken it (``allocate`` is then a lookup).
- Every identity of the cluster is mirrored (``PrefixMirror``), so a remote endpoint's ID maps to
  its labels; an ID record whose labels do not parse is logged and left unknown, and an unknown
  identity is selected by nothing (its traffic is denied).
- If the store cannot be reached, ``allocate`` raises ``IdentityUnavailable``: never a local number.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager

from ..kvstore.base import KVStore, KVStoreError, Put
from ..kvstore.mirror import PrefixMirror
from ..policy.identity import (
    LOCAL_CIDR_BASE,
    MAX_ALLOCATED,
    MIN_ALLOCATED,
    RESERVED_IDENTITIES,
    Identity,
    IdentityKind,
    IdentityUnavailable,
)
from ..policy.labels import SOURCE_RESERVED, LabelSet
from . import keys
from .shared import SharedAllocator
from .session import Session

_log = logging.getLogger(__name__)


class ClusterAllocator(SharedAllocator):
    def __init__(self, store: KVStore, session: Session, grace: float = 60.0, attempts: int = 32,
                 gc_interval: float | None = None) -> None:
        super().__init__()
        self.store = store
        self.session = session
        self.node = session.node
        self.grace = grace
        self.attempts = attempts
        self._refs: dict[int, set[str]] = {}  # ID -> nodes referencing it (from the mirror)
        self._engine_uses: set[LabelSet] = set()  # allocated by the engine and not released since
        self._pins: dict[LabelSet, int] = {}  # prepared for an engine change still to come
        self._dropping: dict[int, LabelSet] = {}  # released: this node's reference is to be deleted
        self._drop_wake = threading.Event()
        self._unreferenced: dict[tuple[int, int], float] = {}  # (ID, mod revision) -> since when
        self.mirror = PrefixMirror(store, keys.IDENTITIES, self._on_change)
        session.on_renew.append(self._rereference)
        # every node collects (the transaction makes concurrent collectors safe); None: only when called
        self.gc_interval = gc_interval
        self._stopped = threading.Event()
        self._gc_thread = threading.Thread(target=self._collect, name="identity-gc", daemon=True)
        self._drop_thread = threading.Thread(target=self._drop_loop, name="identity-release", daemon=True)

    def start(self) -> None:
        self.mirror.start()
        self.mirror.synced.wait(self.store_timeout)
        self._drop_thread.start()
        if self.gc_interval is not None:
            self._gc_thread.start()

    def _collect(self) -> None:
        assert self.gc_interval is not None
        while not self._stopped.wait(self.gc_interval):
            try:
                deleted = self.collect_garbage()
                if deleted:
                    _log.info("identities no node references any more, deleted: %s", deleted)
            except KVStoreError as e:
                _log.warning("identity garbage collection: %s", e)

    @property
    def store_timeout(self) -> float:
        return float(getattr(self.store, "timeout", 5.0))

    def stop(self) -> None:
        self._stopped.set()
        self._drop_wake.set()
        for thread in (self._gc_thread, self._drop_thread):
            if thread.is_alive():
                thread.join(10)
        self.mirror.stop()

    # ------------------------------------------------------------------ IdentityAllocator

    def allocate(self, labels: LabelSet) -> Identity:
        ident = self._hold(labels)
        with self._cluster_lock:
            self._engine_uses.add(labels)
        return ident

    def prepare(self, labels: LabelSet) -> AbstractContextManager[Identity]:
        """Allocate ``labels`` now (raises ``IdentityUnavailable``) and keep the identity held
        while the returned context runs, so the engine's ``allocate`` inside it does no store I/O;
        if the engine did not take it, it is released after the context."""
        return self._pinned(labels, self._hold(labels, pin=True))

    @contextmanager
    def _pinned(self, labels: LabelSet, ident: Identity) -> Iterator[Identity]:
        try:
            yield ident
        finally:
            with self._cluster_lock:
                left = self._pins.get(labels, 1) - 1
                if left:
                    self._pins[labels] = left
                else:
                    self._pins.pop(labels, None)
                    if labels not in self._engine_uses and not labels.has_source(SOURCE_RESERVED):
                        self._drop(labels)
            self._drop_wake.set()

    def _hold(self, labels: LabelSet, pin: bool = False) -> Identity:
        if labels.has_source(SOURCE_RESERVED):
            found = self._by_labels.get(labels)
            if found is not None:
                return found
            raise ValueError(f"labels {labels} name a reserved identity that does not exist")
        if (held := self._held_now(labels, pin)) is not None:
            return held
        with self._io_lock:
            if (held := self._held_now(labels, pin)) is not None:
                return held
            try:
                number = self._allocate(labels)
            except KVStoreError as e:
                raise IdentityUnavailable(f"no cluster-wide identity for {labels}: {e}") from None
            ident = Identity(number, labels, IdentityKind.ENDPOINT)
            with self._cluster_lock:
                self._held[labels] = ident
                self._dropping.pop(number, None)  # referenced again: keep the reference
                if pin:
                    self._pins[labels] = self._pins.get(labels, 0) + 1
                self._learn(ident)
            return ident

    def _held_now(self, labels: LabelSet, pin: bool) -> Identity | None:
        with self._cluster_lock:
            held = self._held.get(labels)
            if held is not None and pin:
                self._pins[labels] = self._pins.get(labels, 0) + 1
            return held

    def release(self, identity_id: int) -> None:
        """No store I/O here (called under the agent's lock): the reference is deleted by a
        thread of its own, unless the labels are held again before it gets there."""
        if not MIN_ALLOCATED <= identity_id < LOCAL_CIDR_BASE:
            super().release(identity_id)  # CIDR identities are node-local
            return
        with self._cluster_lock:
            ident = next((i for i in self._held.values() if i.id == identity_id), None)
            if ident is None:
                return
            self._engine_uses.discard(ident.labels)
            if self._pins.get(ident.labels):
                return  # an endpoint change in progress is about to take it
            self._drop(ident.labels)
        self._drop_wake.set()

    def _drop(self, labels: LabelSet) -> None:
        """(cluster lock held) no longer held: queue its reference for deletion."""
        ident = self._held.pop(labels, None)
        if ident is not None:
            self._dropping[ident.id] = labels

    def _drop_loop(self) -> None:
        delay = 0.2
        while not self._stopped.is_set():
            self._drop_wake.wait()
            self._drop_wake.clear()
            try:
                self._drop_pending()
                delay = 0.2
            except KVStoreError as e:  # kept in the queue; the lease drops them if this node dies
                _log.warning("releasing identities: %s", e)
                self._stopped.wait(delay)
                delay = min(delay * 2, 5.0)
                self._drop_wake.set()

    def _drop_pending(self) -> None:
        with self._io_lock:
            with self._cluster_lock:
                pending = dict(self._dropping)
            for number, labels in pending.items():
                with self._cluster_lock:
                    if self._held.get(labels) is not None or number not in self._dropping:
                        self._dropping.pop(number, None)
                        continue
                self.store.delete(keys.ref_key(number, self.node))
                with self._cluster_lock:
                    self._dropping.pop(number, None)

    # ------------------------------------------------------------------ cluster view

    def references(self) -> dict[int, tuple[str, ...]]:
        """ID -> the nodes referencing it (as last mirrored)."""
        with self._cluster_lock:
            return {i: tuple(sorted(n)) for i, n in self._refs.items() if n}

    def held(self) -> list[Identity]:
        return sorted(self._held.values(), key=lambda i: i.id)

    # ------------------------------------------------------------------ allocation

    def _allocate(self, labels: LabelSet) -> int:
        strings = sorted(labels.to_list())
        labels_key = keys.labels_key(strings)
        record = json.dumps(strings).encode()
        tried: set[int] = set()
        for _ in range(self.attempts):
            kv = self.store.get(labels_key)
            if kv is not None:
                number = self._checked_id(labels_key, kv.value, strings)
                ref = keys.ref_key(number, self.node)
                self.store.put(ref, b"", lease=self.session.lease)
                again = self.store.get(labels_key)
                if again is not None and again.value == kv.value:
                    return number
                self.store.delete(ref)  # collected between our read and our reference: start over
                continue
            candidate = self._candidate(tried)
            tried.add(candidate)
            lease = self.session.lease
            if self.store.create([Put(labels_key, str(candidate).encode()),
                                  Put(keys.id_key(candidate), record),
                                  Put(keys.ref_key(candidate, self.node), b"", lease)]):
                return candidate
            # lost: either the labels appeared (read them next) or the ID was taken (draw another)
        raise KVStoreError(f"no free identity for {labels} after {self.attempts} attempts")

    def _checked_id(self, labels_key: str, value: bytes, strings: list[str]) -> int:
        try:
            number = int(value.decode())
        except (UnicodeDecodeError, ValueError):
            raise KVStoreError(f"{labels_key}: value {value[:40]!r} is not an identity number") from None
        record = self.store.get(keys.id_key(number))
        if record is None or _labels_of(record.value) != strings:
            # never take an ID whose record says something else: that would merge two label sets
            raise KVStoreError(f"{labels_key} names identity {number}, whose record "
                               f"{'is missing' if record is None else 'holds other labels'}")
        return number

    def _candidate(self, tried: set[int]) -> int:
        with self._cluster_lock:
            taken = self._known.keys() | self._refs.keys() | tried
        for _ in range(1000):
            n = random.randint(MIN_ALLOCATED, MAX_ALLOCATED)
            if n not in taken:
                return n
        free = [n for n in range(MIN_ALLOCATED, MAX_ALLOCATED + 1) if n not in taken]
        if not free:
            raise KVStoreError("identity space 256-65535 is exhausted")
        return random.choice(free)

    def _rereference(self, lease: int) -> None:
        """A new lease: put back this node's references (they went with the old one)."""
        with self._io_lock:
            with self._cluster_lock:
                held = list(self._held.values())
            for ident in held:
                try:
                    self.store.put(keys.ref_key(ident.id, self.node), b"", lease=lease)
                except KVStoreError as e:
                    _log.warning("re-referencing identity %d: %s", ident.id, e)

    # ------------------------------------------------------------------ the mirror

    def _on_change(self, upserts: Mapping[str, bytes], deletes: Sequence[str]) -> None:
        with self._cluster_lock:
            before = set(self._known)
            for key in deletes:
                self._apply(key, None)
            for key, value in upserts.items():
                self._apply(key, value)
            learned = sorted(set(self._known) - before)
        for callback in list(self.on_learned):  # outside the lock: callbacks take the agent's
            if learned:
                callback(learned)

    def _apply(self, key: str, value: bytes | None) -> None:
        try:
            if key.startswith(keys.ID):
                number = keys.parse_id_key(key)
                if not MIN_ALLOCATED <= number <= MAX_ALLOCATED:
                    raise ValueError(f"{key}: identity {number} is outside 256-65535")
                old = self._known.pop(number, None)
                if old is not None and self._known_labels.get(old.labels) is old:
                    del self._known_labels[old.labels]
                if value is None:
                    self._rewritten.discard(number)  # deleted: the number may be allocated afresh
                elif number in self._rewritten:
                    raise ValueError(f"{key}: identity {number} was rewritten before; still denied")
                else:
                    ident = self._parse(number, value)
                    if ident is not None and old is not None and ident.labels != old.labels:
                        # an ID is created once with its labels; another writer changed them: taking
                        # the new labels could widen access, so the number is known to no one now
                        self._rewritten.add(number)
                        raise ValueError(f"{key}: identity {number}'s labels changed from {old.labels} to "
                                         f"{ident.labels}; its traffic is denied")
                    if ident is not None:
                        self._learn(ident)
            elif key.startswith(keys.REFS):
                number, node = keys.parse_ref_key(key)
                nodes = self._refs.setdefault(number, set())
                if value is None:
                    nodes.discard(node)
                    if not nodes:
                        del self._refs[number]
                else:
                    nodes.add(node)
            elif not key.startswith(keys.LABELS):
                raise ValueError(f"unexpected key {key!r}")
        except ValueError as e:
            self.malformed += 1
            _log.warning("kvstore: skipping %s", e)

    def _parse(self, number: int, value: bytes) -> Identity | None:
        strings = _labels_of(value)
        if strings is None:
            self.malformed += 1
            _log.warning("kvstore: identity %d: labels %r do not parse; its traffic is denied", number, value[:80])
            return None
        try:
            labels = LabelSet.parse(strings)
        except ValueError as e:
            self.malformed += 1
            _log.warning("kvstore: identity %d: %s; its traffic is denied", number, e)
            return None
        if labels.has_source(SOURCE_RESERVED):
            self.malformed += 1
            _log.warning("kvstore: identity %d claims reserved labels %s; ignored", number, labels)
            return None
        return Identity(number, labels, IdentityKind.ENDPOINT)

    def _learn(self, ident: Identity) -> None:
        self._known[ident.id] = ident
        self._known_labels[ident.labels] = ident

    # ------------------------------------------------------------------ garbage collection

    def collect_garbage(self, now: float | None = None) -> list[int]:
        """Delete identities no node has referenced for ``grace`` seconds; returns their IDs."""
        now = time.monotonic() if now is None else now
        self._drop_pending()  # this node's released references first
        items, _ = self.store.get_prefix(keys.IDENTITIES)
        records = {kv.key: kv for kv in items}
        referenced = set()
        for kv in items:
            if kv.key.startswith(keys.REFS):
                try:
                    referenced.add(keys.parse_ref_key(kv.key)[0])
                except ValueError:
                    continue
        seen: set[tuple[int, int]] = set()
        deleted = []
        for kv in items:
            if not kv.key.startswith(keys.ID):
                continue
            try:
                number = keys.parse_id_key(kv.key)
            except ValueError:
                continue
            if number in referenced:
                continue
            mark = (number, kv.mod_revision)
            seen.add(mark)
            since = self._unreferenced.setdefault(mark, now)
            if now - since < self.grace:
                continue
            doomed = [(kv.key, kv.mod_revision)]
            strings = _labels_of(kv.value)
            if strings is not None:
                label_kv = records.get(keys.labels_key(strings))
                if label_kv is not None and label_kv.value == str(number).encode():
                    doomed.append((label_kv.key, label_kv.mod_revision))
            if self.store.delete_unchanged(doomed, unless_prefix=keys.refs_prefix(number)):
                deleted.append(number)
        self._unreferenced = {m: t for m, t in self._unreferenced.items() if m in seen}
        return deleted


def _labels_of(value: bytes) -> list[str] | None:
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, list) or not data or not all(isinstance(s, str) for s in data):
        return None
    return sorted(data)


__all__ = ["ClusterAllocator", "RESERVED_IDENTITIES"]

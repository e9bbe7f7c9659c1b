"""What every allocator of cluster-wide identities keeps, whichever store shares them (etcd's keys
in ``identities``, CiliumIdentity objects in ``cilia.k8s.crd_identities``): the identities the
cluster knows, those this node holds, and the lookups the engine makes under the agent's lock
without any store I/O."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from ..policy.identity import Identity, MemoryAllocator
from ..policy.labels import LabelSet


class SharedAllocator(MemoryAllocator):
    def __init__(self) -> None:
        super().__init__()
        self._cluster_lock = threading.RLock()  # the maps below; never held across a store call
        self._io_lock = threading.Lock()  # one allocation (or reference deletion) at a time
        self._known: dict[int, Identity] = {}  # every cluster identity whose labels parse
        self._known_labels: dict[LabelSet, Identity] = {}
        self._held: dict[LabelSet, Identity] = {}  # what this node references
        self._rewritten: set[int] = set()  # IDs whose labels another writer changed: unknown until deleted
        self.malformed = 0  # records skipped because they do not parse
        #: called (on the store's watching thread) with IDs whose labels just became known
        self.on_learned: list[Callable[[list[int]], None]] = []

    def get(self, identity_id: int) -> Identity | None:
        """What is known (shared or held); no store I/O: the engine asks under the agent's lock.
        A remote endpoint's identity that has not arrived yet is unknown (selected by nothing)
        until the store's watch delivers it (``on_learned``)."""
        return self._by_id.get(identity_id) or self._known.get(identity_id)

    def lookup(self, labels: LabelSet) -> Identity | None:
        return self._held.get(labels) or self._by_labels.get(labels) or self._known_labels.get(labels)

    def __iter__(self) -> Iterator[Identity]:
        with self._cluster_lock:
            every = {**self._known, **self._by_id}
        return iter(sorted(every.values(), key=lambda i: i.id))

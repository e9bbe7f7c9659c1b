"""``MemoryKVStore``: an in-process test double of the store (etcd's semantics, no network).

Revisions, create-if-absent transactions, compare-and-delete, leases and watches from a revision
behave as etcd's do, so unit tests of the allocator and the publishers run without etcd; a lease
expires only when the test says so (``expire_lease``), and ``compact`` drops history so a watch
from before it fails with ``WatchCompacted``. Everything cluster-level is also tested against real
etcd (tests/kvstore).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from .base import (
    ErrorCallback,
    EventKind,
    EventsCallback,
    KeyValue,
    KVStoreUnavailable,
    Put,
    WatchCompacted,
    WatchEvent,
)


@dataclass
class _Watch:
    prefix: str
    on_events: EventsCallback
    on_error: ErrorCallback
    queue: queue.Queue[Sequence[WatchEvent] | Exception | None] = field(default_factory=queue.Queue)
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True
        self.queue.put(None)

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None or self.cancelled:
                return
            if isinstance(item, Exception):
                self.on_error(item)
                return
            self.on_events(item)


class MemoryKVStore:
    description = "memory (test double)"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data: dict[str, KeyValue] = {}
        self._rev = 1
        self._history: list[WatchEvent] = []
        self._compacted = 0
        self._leases: dict[int, set[str]] = {}
        self._next_lease = 1000
        self._watches: list[_Watch] = []
        self.down = False  # set by tests: every call fails as if no member answered

    def _check(self) -> None:
        if self.down:
            raise KVStoreUnavailable("memory store marked down")

    def get(self, key: str) -> KeyValue | None:
        with self._lock:
            self._check()
            return self._data.get(key)

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        with self._lock:
            self._check()
            return sorted((kv for k, kv in self._data.items() if k.startswith(prefix)),
                          key=lambda kv: kv.key), self._rev

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        with self._lock:
            self._check()
            self._commit([(key, value, lease)])
            return self._rev

    def create(self, puts: Sequence[Put]) -> bool:
        with self._lock:
            self._check()
            if any(p.key in self._data for p in puts):
                return False
            self._commit([(p.key, p.value, p.lease) for p in puts])
            return True

    def delete(self, key: str, mod_revision: int | None = None) -> bool:
        with self._lock:
            self._check()
            kv = self._data.get(key)
            if kv is None or (mod_revision is not None and kv.mod_revision != mod_revision):
                return False
            self._commit([(key, None, 0)])
            return True

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            self._check()
            keys = [k for k in self._data if k.startswith(prefix)]
            if keys:
                self._commit([(k, None, 0) for k in keys])
            return len(keys)

    def delete_unchanged(self, keys: Sequence[tuple[str, int]], unless_prefix: str = "") -> bool:
        with self._lock:
            self._check()
            if any(self._data.get(k) is None or self._data[k].mod_revision != rev for k, rev in keys):
                return False
            if unless_prefix and any(k.startswith(unless_prefix) for k in self._data):
                return False
            self._commit([(k, None, 0) for k, _ in keys])
            return True

    def _commit(self, writes: list[tuple[str, bytes | None, int]]) -> None:
        """One transaction: one new revision for all of ``writes`` (value None: delete)."""
        if writes and any(lease and lease not in self._leases for _, _, lease in writes):
            raise KVStoreUnavailable("requested lease not found")
        self._rev += 1
        events = []
        for key, value, lease in writes:
            old = self._data.pop(key, None)
            if old is not None and old.lease:
                self._leases.get(old.lease, set()).discard(key)
            if value is None:
                events.append(WatchEvent(EventKind.DELETE, key, b"", self._rev))
                continue
            self._data[key] = KeyValue(key, value, self._rev, lease)
            if lease:
                self._leases[lease].add(key)
            events.append(WatchEvent(EventKind.PUT, key, value, self._rev))
        self._history += events
        for w in self._watches:
            mine = [e for e in events if e.key.startswith(w.prefix)]
            if mine and not w.cancelled:
                w.queue.put(mine)

    def watch_prefix(self, prefix: str, start_revision: int, on_events: EventsCallback,
                     on_error: ErrorCallback) -> _Watch:
        with self._lock:
            self._check()
            w = _Watch(prefix, on_events, on_error)
            if start_revision and start_revision <= self._compacted:
                w.queue.put(WatchCompacted(self._compacted))
            else:
                past = [e for e in self._history if e.revision >= start_revision and e.key.startswith(prefix)]
                if past:
                    w.queue.put(past)
                self._watches.append(w)
            threading.Thread(target=w.run, name=f"memory-watch {prefix}", daemon=True).start()
            return w

    def grant_lease(self, ttl: int) -> int:
        with self._lock:
            self._check()
            self._next_lease += 1
            self._leases[self._next_lease] = set()
            return self._next_lease

    def keep_alive(self, lease: int) -> bool:
        with self._lock:
            self._check()
            return lease in self._leases

    def revoke_lease(self, lease: int) -> None:
        self.expire_lease(lease)

    def expire_lease(self, lease: int) -> None:
        """What etcd does when a lease's TTL runs out: its keys are deleted in one revision."""
        with self._lock:
            keys = self._leases.pop(lease, set())
            if keys:
                self._commit([(k, None, 0) for k in sorted(keys)])

    def compact(self) -> None:
        with self._lock:
            self._compacted = self._rev
            self._history.clear()

    def fail_watches(self, error: Exception) -> None:
        """End every open watch with ``error`` (a lost connection, a compaction)."""
        with self._lock:
            for w in self._watches:
                w.queue.put(error)
            self._watches.clear()

    def revision(self) -> int:
        with self._lock:
            self._check()
            return self._rev

    def close(self) -> None:
        with self._lock:
            for w in self._watches:
                w.cancel()
            self._watches.clear()

"""The key-value store the agents coordinate through, as a small synchronous interface.

Keys are text (``cilia/...``), values bytes. Every write returns the store's revision after it;
``watch_prefix`` streams the changes after a revision. Leases hold the keys a node owns: when a
node stops refreshing its lease, the store deletes them (a dead node's entries vanish).

The etcd backend (``cilia.kvstore.etcd``) speaks etcd's v3 API; ``MemoryKVStore``
(``cilia.kvstore.memory``) is the in-memory test double with the same semantics.
Errors from a backend's client are translated at the boundary: ``KVStoreUnavailable`` when the
store cannot be reached (the caller keeps what it knows and retries), ``WatchCompacted`` when a
watch asks for history the store no longer has (the caller relists).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol


class KVStoreError(Exception):
    """A store operation failed."""


class KVStoreUnavailable(KVStoreError):
    """The store cannot be reached (no member answers, or none has quorum)."""


class WatchCompacted(KVStoreError):
    """The revision a watch starts from has been compacted away: relist."""

    def __init__(self, compacted: int) -> None:
        super().__init__(f"revision compacted below {compacted}")
        self.compacted = compacted


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    lease: int = 0  # 0: no lease


class EventKind(str, Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: EventKind
    key: str
    value: bytes  # empty for a delete
    revision: int  # the revision of this change


@dataclass(frozen=True, slots=True)
class Put:
    """One write in a transaction."""

    key: str
    value: bytes
    lease: int = 0


class WatchHandle(Protocol):
    def cancel(self) -> None: ...


#: Called with the events of one watch response, in revision order; an exception (of the store or of
#: ``WatchCompacted``) ends the watch and is passed to the error callback instead.
EventsCallback = Callable[[Sequence[WatchEvent]], None]
ErrorCallback = Callable[[Exception], None]


class KVStore(Protocol):
    def get(self, key: str) -> KeyValue | None: ...

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under ``prefix`` (sorted) and the revision they were read at."""

    def put(self, key: str, value: bytes, lease: int = 0) -> int: ...

    def create(self, puts: Sequence[Put]) -> bool:
        """Write all of ``puts`` if none of their keys exists, atomically; False (nothing
        written) if any exists."""

    def delete(self, key: str, mod_revision: int | None = None) -> bool:
        """Delete ``key``; with ``mod_revision`` only if it was last written at that revision
        (compare-and-delete). True if something was deleted."""

    def delete_prefix(self, prefix: str) -> int: ...

    def delete_unchanged(self, keys: Sequence[tuple[str, int]], unless_prefix: str = "") -> bool:
        """Delete all ``keys`` ((key, mod_revision) pairs) atomically if each was last written at
        that revision and no key exists under ``unless_prefix`` (garbage collection of a record no
        one references); False (nothing deleted) otherwise."""

    def watch_prefix(self, prefix: str, start_revision: int, on_events: EventsCallback,
                     on_error: ErrorCallback) -> WatchHandle:
        """Deliver every change under ``prefix`` from ``start_revision`` (inclusive) on."""

    def grant_lease(self, ttl: int) -> int: ...

    def keep_alive(self, lease: int) -> bool:
        """Refresh ``lease`` once; False if it no longer exists (expired or revoked)."""

    def revoke_lease(self, lease: int) -> None: ...

    def revision(self) -> int:
        """The store's current revision (a read that also proves it is reachable)."""

    def close(self) -> None: ...

    @property
    def description(self) -> str:
        """What this store is, for status (e.g. ``etcd http://a:2379,...``)."""

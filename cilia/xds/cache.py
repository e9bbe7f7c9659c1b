"""Versioned resource cache: one linear version counter per type URL, shared by all nodes.

Like go-control-plane's linear cache and Cilium's xDS cache: a type's version moves only
when a resource's serialized bytes really change, so recomputing equal config pushes
nothing. Versions are ``EPOCH-N`` with a per-process epoch, so a restarted server never
hands out a version an old Envoy already holds. Each resource remembers the version it
last changed at (for delta xDS). Per-node views restrict what a node sees to a set of
resource names. Watchers are called after the lock is released.

``update_many`` changes several types atomically and returns a ``revert`` that puts back what
it replaced, as a new version (what an agent does when Envoy rejects a policy update).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message

from cilia.xds.types import Resource, ads_rank

Watcher = Callable[[str], None]  # called with the type URL that changed


def new_epoch() -> str:
    """A per-process version prefix: start time in ns plus the PID, in hex."""
    return f"{time.time_ns():x}{os.getpid():x}"


def version_key(version: str) -> tuple[str, int] | None:
    """Split ``EPOCH-N`` into an orderable key; None for versions not made by this scheme."""
    epoch, sep, counter = version.rpartition("-")
    if not sep or not counter.isdigit():
        return None
    return epoch, int(counter)


@dataclass(frozen=True, slots=True)
class View:
    """What one node sees of one type: the type's version and the resources visible to it."""

    type_url: str
    version: str
    resources: Mapping[str, Resource]


@dataclass(frozen=True, slots=True)
class TypeChange:
    """One type's part of ``Cache.update_many``: upserts, deletes, and with ``replace`` the
    deletion of every resource not upserted (the type becomes exactly ``upserts``)."""

    upserts: Mapping[str, Message] = field(default_factory=dict)
    delete: tuple[str, ...] = ()
    replace: bool = False


class _Reverter:
    """Restores what one update replaced: every name it touched gets its previous message back
    (or is deleted again), as a new change with new versions, never the old version strings, so
    every node sees the revert as an update. Names the update did not touch keep later changes."""

    def __init__(self, cache: Cache, before: Mapping[str, Mapping[str, Message | None]]) -> None:
        self._cache = cache
        self._before = before
        self._done = False
        self._lock = threading.Lock()

    def __call__(self) -> dict[str, str]:
        with self._lock:
            if self._done:
                return {t: self._cache.version(t) for t in self._before}
            self._done = True
        changes = {
            type_url: TypeChange(
                {n: m for n, m in prior.items() if m is not None},
                tuple(n for n, m in prior.items() if m is None),
            )
            for type_url, prior in self._before.items()
        }
        return dict(self._cache.update_many(changes).versions)


@dataclass(frozen=True, slots=True)
class Update:
    """What ``Cache.update_many`` did: each type's version afterwards, and ``revert()``, which
    undoes it (once; it returns each type's version after the revert)."""

    versions: Mapping[str, str]
    revert: Callable[[], dict[str, str]]


class _TypeState:
    __slots__ = ("counter", "resources")

    def __init__(self) -> None:
        self.counter = 0
        self.resources: dict[str, Resource] = {}


class Cache:
    """Resources by type URL and name; thread-safe."""

    def __init__(self, epoch: str | None = None) -> None:
        self.epoch = epoch or new_epoch()
        self._lock = threading.Lock()
        self._types: dict[str, _TypeState] = {}
        self._node_names: dict[str, dict[str, frozenset[str]]] = {}  # node -> type -> visible names
        self._watchers: list[Watcher] = []

    # -- reading -----------------------------------------------------------------

    def version(self, type_url: str) -> str:
        with self._lock:
            return self._version(self._state(type_url))

    def view(self, type_url: str, node_id: str = "") -> View:
        """The resources of a type as node ``node_id`` sees them."""
        with self._lock:
            st = self._state(type_url)
            allowed = self._node_names.get(node_id, {}).get(type_url)
            if allowed is None:
                res = dict(st.resources)
            else:  # walk the node's few names, not every resource of the type
                res = {n: st.resources[n] for n in allowed if n in st.resources}
            return View(type_url, self._version(st), res)

    def get(self, type_url: str, name: str) -> Message | None:
        with self._lock:
            r = self._state(type_url).resources.get(name)
            return r.message if r else None

    def snapshot(self, node_id: str = "") -> dict[str, dict[str, Message]]:
        """Every type's messages by name as ``node_id`` sees them, read under one lock hold."""
        with self._lock:
            out: dict[str, dict[str, Message]] = {}
            for type_url, st in self._types.items():
                allowed = self._node_names.get(node_id, {}).get(type_url)
                out[type_url] = {n: r.message for n, r in st.resources.items() if allowed is None or n in allowed}
            return out

    # -- writing -----------------------------------------------------------------

    def upsert(self, type_url: str, name: str, message: Message) -> str:
        """Add or replace one resource; returns the type's version afterwards."""
        return self.update(type_url, {name: message})

    def delete(self, type_url: str, name: str) -> str:
        return self.update(type_url, {}, delete=[name])

    def set(self, type_url: str, resources: Mapping[str, Message]) -> str:
        """Replace every resource of a type with ``resources``."""
        return self.update(type_url, resources, delete_others=True)

    def update(
        self,
        type_url: str,
        upserts: Mapping[str, Message],
        delete: Iterable[str] = (),
        *,
        delete_others: bool = False,
    ) -> str:
        """Apply upserts and deletes as one change: at most one version bump, one notification.

        ``delete_others`` also deletes every resource not in ``upserts``.
        """
        change = TypeChange(upserts, tuple(delete), replace=delete_others)
        return self.update_many({type_url: change}).versions[type_url]

    def update_many(self, changes: Mapping[str, TypeChange]) -> Update:
        """Apply changes to several types atomically: readers see all of them or none.

        Each changed type gets one version bump, and watchers are told once per changed type,
        in ADS order (clusters, endpoints, listeners, routes), after the lock is released. The
        returned ``Update`` has each type's version and a ``revert`` that undoes the change.
        """
        with self._lock:
            before: dict[str, dict[str, Message | None]] = {}
            changed_types: list[str] = []
            for type_url, change in changes.items():
                prior = self._apply(type_url, change)
                before[type_url] = prior
                if prior:
                    changed_types.append(type_url)
            versions = {t: self._version(self._state(t)) for t in changes}
            watchers = list(self._watchers) if changed_types else []
        self._notify(watchers, changed_types)
        return Update(versions, _Reverter(self, before))

    def _apply(self, type_url: str, change: TypeChange) -> dict[str, Message | None]:
        """Apply one type's change under the lock; returns the previous message of every name it
        changed (None: the name did not exist), empty when nothing changed."""
        st = self._state(type_url)
        delete: Iterable[str] = change.delete
        if change.replace:
            delete = [n for n in st.resources if n not in change.upserts]
        changed: dict[str, bytes] = {}
        for name, msg in change.upserts.items():
            data = msg.SerializeToString(deterministic=True)
            old = st.resources.get(name)
            if old is None or old.serialized != data:
                changed[name] = data
        removed = [n for n in dict.fromkeys(delete) if n in st.resources and n not in change.upserts]
        prior: dict[str, Message | None] = {}
        if not changed and not removed:
            return prior
        st.counter += 1
        version = self._version(st)
        for name, data in changed.items():
            old = st.resources.get(name)
            prior[name] = old.message if old else None
            st.resources[name] = Resource(name, change.upserts[name], version, data)
        for name in removed:
            prior[name] = st.resources.pop(name).message
        return prior

    @staticmethod
    def _notify(watchers: list[Watcher], type_urls: Iterable[str]) -> None:
        for type_url in sorted(type_urls, key=ads_rank):
            for w in watchers:
                w(type_url)

    def set_node_view(self, node_id: str, type_url: str, names: Iterable[str] | None) -> None:
        """Restrict what ``node_id`` sees of a type to ``names`` (None: everything)."""
        with self._lock:
            per_node = self._node_names.setdefault(node_id, {})
            new = None if names is None else frozenset(names)
            if per_node.get(type_url) == new:
                return
            if new is None:
                per_node.pop(type_url, None)
            else:
                per_node[type_url] = new
            watchers = list(self._watchers)
        for w in watchers:
            w(type_url)

    # -- watching ----------------------------------------------------------------

    def watch(self, watcher: Watcher) -> Callable[[], None]:
        """Call ``watcher(type_url)`` after every change; returns a function that stops it."""
        with self._lock:
            self._watchers.append(watcher)

        def cancel() -> None:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)

        return cancel

    # -- internals -----------------------------------------------------------------

    def _state(self, type_url: str) -> _TypeState:
        st = self._types.get(type_url)
        if st is None:
            st = self._types[type_url] = _TypeState()
        return st

    def _version(self, st: _TypeState) -> str:
        return f"{self.epoch}-{st.counter}"

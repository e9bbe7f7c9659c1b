"""Versioned resource cache: one linear version counter per type URL, shared by all nodes.

Like go-control-plane's linear cache and Cilium's xDS cache: a type's version moves only
when a resource's serialized bytes really change, so recomputing equal config pushes
nothing. Versions are ``EPOCH-N`` with a per-process epoch, so a restarted server never
hands out a version an old Envoy already holds. Each resource remembers the version it
last changed at (for delta xDS). Per-node views restrict what a node sees to a set of
resource names. Watchers are called after the lock is released.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from google.protobuf.message import Message

from cilia.xds.types import Resource

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
            res = dict(st.resources)
            if allowed is not None:
                res = {n: r for n, r in res.items() if n in allowed}
            return View(type_url, self._version(st), res)

    def get(self, type_url: str, name: str) -> Message | None:
        with self._lock:
            r = self._state(type_url).resources.get(name)
            return r.message if r else None

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
        with self._lock:
            st = self._state(type_url)
            if delete_others:
                delete = [n for n in st.resources if n not in upserts]
            changed: dict[str, bytes] = {}
            for name, msg in upserts.items():
                data = msg.SerializeToString(deterministic=True)
                old = st.resources.get(name)
                if old is None or old.serialized != data:
                    changed[name] = data
            removed = [n for n in delete if n in st.resources and n not in upserts]
            if changed or removed:
                st.counter += 1
                version = self._version(st)
                for name, data in changed.items():
                    st.resources[name] = Resource(name, upserts[name], version, data)
                for name in removed:
                    del st.resources[name]
            version = self._version(st)
            watchers = list(self._watchers) if (changed or removed) else []
        for w in watchers:
            w(type_url)
        return version

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

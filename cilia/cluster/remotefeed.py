"""``RemoteFeed``: other nodes' addresses and newly learned identities, coalesced into batches.

The kvstore's watches deliver changes one response at a time; applying each to the engine would
cost a revision (and a realization) per response. The feed merges whatever arrives while the
previous batch is being applied (the last value of an address wins, an address added then deleted
is a delete) and hands one ``RemoteBatch`` to ``apply`` on a thread of its own, so churn from many
nodes costs one engine change per round, and the watch threads never wait for the agent's lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..background import Worker
from ..policy.engine import PolicyEngine
from ..policy.model import IPNetwork

_log = logging.getLogger(__name__)


@dataclass
class RemoteBatch:
    upserts: dict[IPNetwork, int] = field(default_factory=dict)
    deletes: list[IPNetwork] = field(default_factory=list)
    learned: set[int] = field(default_factory=set)  # identities whose labels just became known

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes or self.learned)


class RemoteFeed(Worker):
    def __init__(self, apply: Callable[[RemoteBatch], None]) -> None:
        super().__init__("kvstore-remote-feed")
        self.apply = apply
        self._lock = threading.Lock()
        self._upserts: dict[IPNetwork, int] = {}
        self._deleted: set[IPNetwork] = set()
        self._learned: set[int] = set()
        self.batches = 0  # applied so far (for status and the benchmark)
        self.idle = threading.Event()  # nothing pending and nothing being applied
        self.idle.set()

    def add(self, upserts: Mapping[IPNetwork, int], deletes: Iterable[IPNetwork]) -> None:
        with self._lock:
            for prefix in deletes:
                self._upserts.pop(prefix, None)
                self._deleted.add(prefix)
            for prefix, identity in upserts.items():
                self._deleted.discard(prefix)
                self._upserts[prefix] = identity
            self.idle.clear()
        self._wake.set()

    def learned(self, identities: Iterable[int]) -> None:
        with self._lock:
            self._learned.update(identities)
            self.idle.clear()
        self._wake.set()

    def _take(self) -> RemoteBatch:
        with self._lock:
            batch = RemoteBatch(self._upserts, sorted(self._deleted, key=str), self._learned)
            self._upserts, self._deleted, self._learned = {}, set(), set()
            return batch

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait()
            self._wake.clear()
            batch = self._take()
            if batch:
                try:
                    self.apply(batch)
                    self.batches += 1
                except Exception:  # a bug applying one batch must not stop the feed
                    _log.exception("applying other nodes' endpoints")
            with self._lock:
                if not (self._upserts or self._deleted or self._learned):
                    self.idle.set()


def engine_change(batch: RemoteBatch) -> Callable[[PolicyEngine], set[str] | None]:
    """``batch`` as one change for ``Agent.change_engine``: the addresses, then the identities
    whose labels arrived late; a revision even when no endpoint's policy moved, if the ipcache did."""

    def change(engine: PolicyEngine) -> set[str] | None:
        changed = set(engine.update_remote(batch.upserts, batch.deletes).endpoints)
        for identity in sorted(batch.learned):
            changed |= engine.refresh_remote(identity).endpoints
        return changed if changed or batch.upserts or batch.deletes else None

    return change

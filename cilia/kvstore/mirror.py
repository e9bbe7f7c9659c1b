"""``PrefixMirror``: a local copy of every key under a prefix, kept current by a watch.

List, then watch from the revision after the list; when the watch ends (the store unreachable, a
member gone) resume it from the last revision seen, after a backoff; when that revision has been
compacted away, list again and report only the difference, so the consumer sees one consistent
stream of upserts and deletes whatever happened in between.
While the store is unreachable the mirror keeps what it has (nothing is flushed).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence

from .base import EventKind, KVStore, KVStoreError, WatchCompacted, WatchEvent, WatchHandle

_log = logging.getLogger(__name__)

#: (upserts: key -> value, deletes: keys), called on the mirror's thread, one call at a time.
ChangeCallback = Callable[[Mapping[str, bytes], Sequence[str]], None]


class PrefixMirror:
    def __init__(self, store: KVStore, prefix: str, on_change: ChangeCallback,
                 backoff: tuple[float, float] = (0.2, 5.0)) -> None:
        self.store = store
        self.prefix = prefix
        self.on_change = on_change
        self.backoff = backoff
        self.data: dict[str, bytes] = {}
        self.revision = 0  # the last revision reflected in ``data``
        self._listed = 0  # the revision of the last list
        self._compacted = False  # the watch ended because its revision was compacted: list again
        self.synced = threading.Event()  # the first list has been delivered
        self.connected = False
        self.last_error: str | None = None
        self.relists = 0
        self._lock = threading.Lock()  # one delivery at a time
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._watch: WatchHandle | None = None
        self._thread = threading.Thread(target=self._run, name=f"kvstore-mirror {prefix}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._watch is not None:
            self._watch.cancel()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        delay = self.backoff[0]
        need_list = True
        while not self._stopped.is_set():
            self._wake.clear()
            self._compacted = False
            try:
                if need_list:
                    self._relist()
                    need_list = False
                    start = self.revision + 1
                else:  # resume; inclusive: the stream may have ended amid one revision's events
                    start = self.revision
                self._watch = self.store.watch_prefix(self.prefix, start, self._on_events, self._on_error)
                self.connected = True
                delay = self.backoff[0]
                self._wake.wait()  # until the watch fails or we stop
            except KVStoreError as e:
                self._failed(e)
            need_list = need_list or self._compacted
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
            if not self._stopped.is_set() and not self.connected:  # back off before trying again
                self._stopped.wait(delay)
                delay = min(delay * 2, self.backoff[1])

    def _relist(self) -> None:
        items, revision = self.store.get_prefix(self.prefix)
        fresh = {kv.key: kv.value for kv in items}
        with self._lock:
            upserts = {k: v for k, v in fresh.items() if self.data.get(k) != v}
            deletes = [k for k in self.data if k not in fresh]
            self.data = fresh
            self.revision = self._listed = revision
            self.relists += 1
            self._deliver(upserts, deletes)
        self.synced.set()

    def _on_events(self, events: Sequence[WatchEvent]) -> None:
        with self._lock:
            upserts: dict[str, bytes] = {}
            deletes: list[str] = []
            for e in events:
                if e.revision <= self._listed:
                    continue  # already in the list this watch started after (one revision may hold many events)
                if e.kind is EventKind.PUT:
                    if self.data.get(e.key) == e.value:
                        continue  # seen already (a resumed watch repeats its first revision)
                    self.data[e.key] = e.value
                    upserts[e.key] = e.value
                    if e.key in deletes:
                        deletes.remove(e.key)
                elif self.data.pop(e.key, None) is not None:
                    upserts.pop(e.key, None)
                    deletes.append(e.key)
                self.revision = max(self.revision, e.revision)
            self._deliver(upserts, deletes)

    def _deliver(self, upserts: Mapping[str, bytes], deletes: Sequence[str]) -> None:
        if not upserts and not deletes:
            return
        try:
            self.on_change(upserts, deletes)
        except Exception:  # a consumer's bug must not stop the mirror
            _log.exception("kvstore mirror %s: consumer failed", self.prefix)

    def _on_error(self, error: Exception) -> None:
        if isinstance(error, WatchCompacted):
            self._compacted = True
            _log.info("kvstore mirror %s: %s; relisting", self.prefix, error)
            self.last_error = str(error)
        else:
            self._failed(error)
        self._wake.set()

    def _failed(self, error: Exception) -> None:
        if self._stopped.is_set():
            return
        self.connected = False
        self.last_error = str(error)
        _log.warning("kvstore mirror %s: %s", self.prefix, error)

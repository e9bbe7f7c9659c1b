"""A node's session with the kvstore: one lease, kept alive, renewed if it was lost.

Everything a node owns in the store (identity references, its endpoints' addresses, its node
record) is written under this lease, so it vanishes when the node dies and stops refreshing it.
If the lease is lost anyway (the store was unreachable longer than the TTL), a new one is granted
and every ``on_renew`` callback re-writes what the node owns under it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from ..kvstore.base import KVStore, KVStoreError

_log = logging.getLogger(__name__)


class Session:
    def __init__(self, store: KVStore, node: str, ttl: int = 15) -> None:
        self.store = store
        self.node = node
        self.ttl = ttl
        self._lock = threading.Lock()
        self._lease = 0
        self.on_renew: list[Callable[[int], None]] = []
        self.healthy = False
        self.last_error: str | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._keep, name=f"kvstore-lease {node}", daemon=True)

    @property
    def lease(self) -> int:
        """The current lease, granted now if there is none (raises KVStoreError if unreachable)."""
        with self._lock:
            if not self._lease:
                self._lease = self.store.grant_lease(self.ttl)
                self.healthy = True
            return self._lease

    def start(self) -> None:
        self.lease  # noqa: B018 - grant now: a store that cannot grant one fails the start
        self._thread.start()

    def stop(self, revoke: bool = False) -> None:
        """Stop refreshing; ``revoke``: delete everything the node owns now (a clean leave)."""
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(5)
        if revoke and self._lease:
            try:
                self.store.revoke_lease(self._lease)
            except KVStoreError as e:
                _log.warning("revoking lease: %s", e)

    def _keep(self) -> None:
        interval = max(self.ttl / 3, 0.2)
        while not self._stopped.wait(interval):
            try:
                with self._lock:
                    lease = self._lease
                alive = bool(lease) and self.store.keep_alive(lease)
                if alive:
                    self.healthy, self.last_error = True, None
                    continue
                _log.warning("kvstore lease %x of %s was lost; granting a new one", lease, self.node)
                with self._lock:
                    self._lease = self.store.grant_lease(self.ttl)
                    lease = self._lease
                self.healthy, self.last_error = True, None
                for renew in list(self.on_renew):
                    renew(lease)
            except KVStoreError as e:
                self.healthy, self.last_error = False, str(e)
                _log.warning("kvstore lease of %s: %s", self.node, e)
            except Exception:  # a renew callback's bug must not stop the keepalive
                _log.exception("kvstore lease renewal of %s", self.node)

"""Endpoints waiting for a cluster-wide identity (issue 13): the retry loop that admits them.

An endpoint added while the identity allocator cannot reach its store (the kvstore down, the API
server in CRD mode) is accepted in the state ``waiting-for-identity`` (Cilium's name) with no
identity number: nothing is published, its BPF policy is empty. This loop tries again with
backoff (as the kvstore's watches do) and hands each endpoint back to the agent, which allocates
its identity outside its lock and admits it through the normal commit path. Only endpoints still
waiting are tried, so one deleted meanwhile gets nothing allocated.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

_log = logging.getLogger(__name__)

WAITING_FOR_IDENTITY = "waiting-for-identity"  # Cilium's endpoint state
READY = "ready"


class PendingIdentities:
    """``admit(name)`` returns True once the endpoint is admitted (or gone), False while its
    identity still cannot be had; ``waiting()`` names the endpoints to try."""

    def __init__(self, waiting: Callable[[], Iterable[str]], admit: Callable[[str], bool],
                 backoff: tuple[float, float] = (0.2, 5.0)) -> None:
        self._waiting = waiting
        self._admit = admit
        self.backoff = backoff
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: dict[str, str] = {}  # endpoint -> why it still waits (the agent keeps it), for status

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cilia-pending-identities", daemon=True)
            self._thread.start()

    def kick(self) -> None:
        """An endpoint began to wait: wake the loop if it was idle."""
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(30)
        self._thread = None

    def _run(self) -> None:
        delay = self.backoff[0]
        first = 0  # each round starts one endpoint further, so one that keeps failing blocks no other
        while not self._stopped.is_set():
            names = list(self._waiting())
            if not names:
                delay = self.backoff[0]
                self._wake.wait()
                self._wake.clear()
                continue
            if self._stopped.wait(delay):  # the add that made it wait has just failed: not at once
                return
            failed = False
            first = (first + 1) % len(names)
            for name in names[first:] + names[:first]:
                try:
                    if not self._admit(name):
                        failed = True
                        break  # the store is still unreachable: the others would wait for it too
                except Exception as e:  # noqa: BLE001  the loop must outlive one endpoint's bad luck
                    _log.warning("endpoint %s waiting for its identity: %s", name, e)
                    self.errors[name] = str(e)
                    failed = True
            delay = min(delay * 2, self.backoff[1]) if failed else self.backoff[0]

"""Threads that work off the agent's lock: woken when there is something to do, stopped with the
agent. ``Worker`` is the thread; ``SyncLoop`` a worker that makes a store hold what is wanted and
retries with a doubling delay while the store fails (the kvstore's and Kubernetes' publishers)."""

from __future__ import annotations

import logging
import threading

_log = logging.getLogger(__name__)


class Worker:
    def __init__(self, name: str) -> None:
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        raise NotImplementedError


class SyncLoop(Worker):
    """``_sync`` at start and at every wake; a failure it raises (one of ``_failures()``) is kept in
    ``last_error`` and the sync retried after ``backoff[0]`` seconds, doubling up to ``backoff[1]``."""

    what = "syncing"  # for the log: what the loop does

    def __init__(self, name: str, backoff: tuple[float, float]) -> None:
        super().__init__(name)
        self.backoff = backoff
        self.last_error: str | None = None

    def _sync(self) -> None:
        raise NotImplementedError

    def _failures(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError

    def _describe(self, error: BaseException) -> str:
        return str(error)

    def _run(self) -> None:
        failures = self._failures()
        delay = self.backoff[0]
        while not self._stopped.is_set():
            try:
                self._sync()
                self.last_error = None
                delay = self.backoff[0]
                self._wake.wait()
                self._wake.clear()
            except failures as e:
                self.last_error = self._describe(e)
                _log.warning("%s: %s", self.what, self.last_error)
                self._stopped.wait(delay)
                delay = min(delay * 2, self.backoff[1])

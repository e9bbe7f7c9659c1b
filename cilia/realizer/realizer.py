"""The realizer: hands each ``Desired`` to the sinks that turn it into configuration.

A sink is anything with ``name`` and ``realize(desired)``: the proxy sink (Envoy through the
xDS cache), the BPF datapath, the L7 parsers' views, the agent's flow naming; a new consumer of
resolved policy (a service load balancer, a DNS proxy, a kvstore publisher) is one more sink.
``realize`` must not wait for anything outside the process: waiting for proxies to acknowledge
happens afterwards, outside the agent's lock, through the proxy sink.

Sinks run in the order given, the L7 views before the proxies so a listener never reaches Envoy
before the parsers behind it know its policy. A sink that raises does not stop the others; its
error is kept (``errors``) for status and health, and it is given the next ``Desired`` as usual.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Protocol

from .desired import Desired

_log = logging.getLogger(__name__)


class Sink(Protocol):
    name: str

    def realize(self, desired: Desired) -> None:
        """Make the world express ``desired``; only what ``desired.changed`` names needs redoing."""


class Realizer:
    def __init__(self, sinks: Sequence[Sink] = ()) -> None:
        self._sinks: list[Sink] = list(sinks)
        self._lock = threading.Lock()  # one Desired at a time, in revision order
        self.last: Desired | None = None
        self.errors: dict[str, str] = {}  # sink name -> its last error, cleared when it succeeds

    def add(self, sink: Sink) -> None:
        """Plug in a sink; it is given the last ``Desired`` at once (whole: nothing is changed
        relative to a sink that has seen nothing)."""
        with self._lock:
            self._sinks.append(sink)
            if self.last is not None:
                self._run(sink, _whole(self.last))

    def realize(self, desired: Desired) -> None:
        with self._lock:
            self.last = desired
            for sink in self._sinks:
                self._run(sink, desired)

    def _run(self, sink: Sink, desired: Desired) -> None:
        try:
            sink.realize(desired)
        except Exception as e:  # one sink's failure must not keep the others stale
            _log.exception("sink %s failed to realize revision %d", sink.name, desired.revision)
            self.errors[sink.name] = f"{type(e).__name__}: {e}"
        else:
            self.errors.pop(sink.name, None)


def _whole(desired: Desired) -> Desired:
    from dataclasses import replace

    return replace(desired, changed=None)

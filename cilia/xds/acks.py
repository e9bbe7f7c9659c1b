"""ACK/NACK bookkeeping per node and type URL, and completions that wait on it.

Streams report what they sent and what Envoy answered; ``wait`` blocks until a node
has acked a version (or a later one of the same epoch) or rejected it. This is what
"policy realized" is built on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace

from cilia.xds.cache import version_key


class NackError(Exception):
    """Envoy rejected the version; ``message`` is its ``error_detail`` text."""

    def __init__(self, node_id: str, type_url: str, version: str, message: str) -> None:
        super().__init__(f"{node_id} rejected {type_url} version {version}: {message}")
        self.node_id = node_id
        self.type_url = type_url
        self.version = version
        self.message = message


@dataclass(frozen=True, slots=True)
class AckState:
    """Where one node stands on one type."""

    sent: str = ""
    acked: str = ""
    nacked: str = ""
    nack_message: str = ""


def _at_least(have: str, want: str) -> bool:
    if have == want:
        return bool(have)
    h, w = version_key(have), version_key(want)
    return h is not None and w is not None and h[0] == w[0] and h[1] >= w[1]


class AckTracker:
    """Implements the stream observer hooks; thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._state: dict[tuple[str, str], AckState] = {}

    def on_sent(self, node_id: str, type_url: str, version: str) -> None:
        self._set(node_id, type_url, sent=version)

    def on_ack(self, node_id: str, type_url: str, version: str) -> None:
        self._set(node_id, type_url, acked=version)

    def on_nack(self, node_id: str, type_url: str, version: str, message: str) -> None:
        self._set(node_id, type_url, nacked=version, nack_message=message)

    def state(self, node_id: str, type_url: str) -> AckState:
        with self._cond:
            return self._state.get((node_id, type_url), AckState())

    def states(self) -> dict[tuple[str, str], AckState]:
        with self._cond:
            return dict(self._state)

    def wait(self, node_id: str, type_url: str, version: str, timeout: float) -> None:
        """Return once ``node_id`` acked ``version`` of ``type_url`` or later.

        Raises NackError if it rejected that version (or a later one) first, TimeoutError
        when ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                st = self._state.get((node_id, type_url), AckState())
                if _at_least(st.acked, version):
                    return
                if _at_least(st.nacked, version) and not _at_least(st.acked, st.nacked):
                    raise NackError(node_id, type_url, st.nacked, st.nack_message)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{node_id} did not ack {type_url} version {version} in {timeout}s")
                self._cond.wait(left)

    def _set(self, node_id: str, type_url: str, **changes: str) -> None:
        with self._cond:
            key = (node_id, type_url)
            self._state[key] = replace(self._state.get(key, AckState()), **changes)
            self._cond.notify_all()

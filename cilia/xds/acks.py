"""ACK/NACK bookkeeping per stream, and completions that wait on it per node and type URL.

Streams report what they sent and what their node answered; ``wait`` blocks until a node has
acked a version (or a later one of the same epoch) or rejected it. This is what "policy
realized" is built on.

Answers are kept per stream, never merged into one record per node id: a second stream naming
the same node cannot overwrite what the first one answered. Only streams the server admitted
for that node report here (its client certificate names the node, or it came through the
owner-only local socket); a node whose streams are open has realized a version only when every
one of them acked it, and any of them rejecting it is a NACK. With none open, the last answer of
its last stream stands (an Envoy that acked and went away keeps counting as having acked), and
``gone`` says since when the node has had no stream, so the agent can stop waiting for a proxy
that went away for good.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
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


def _nack_stands(st: AckState) -> bool:
    return bool(st.nacked) and not _at_least(st.acked, st.nacked)


def _order(version: str) -> tuple[str, int]:
    key = version_key(version)
    return key if key is not None else ("", -1)


def _combined(states: Iterable[AckState]) -> AckState:
    """One node's standing from its open streams: the newest version sent, the oldest acked (what
    all of them hold), and the NACK that still stands on one of them, else the newest one."""
    states = list(states)
    sent = max((st.sent for st in states), key=_order)
    acked = min((st.acked for st in states), key=_order)
    nack = next((st for st in states if _nack_stands(st)), None) or max(states, key=lambda st: _order(st.nacked))
    return AckState(sent, acked, nack.nacked, nack.nack_message)


class AckTracker:
    """Implements the stream observer hooks; thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._streams: dict[int, tuple[str, dict[str, AckState]]] = {}  # open stream -> (node, type -> state)
        self._by_node: dict[str, set[int]] = {}  # node -> its open streams
        self._last: dict[tuple[str, str], AckState] = {}  # (node, type) -> latest state of any of its streams
        self._gone: dict[str, float] = {}  # node with no open stream left -> monotonic time its last one closed

    def on_sent(self, node_id: str, type_url: str, version: str, *, stream: int) -> None:
        self._set(stream, node_id, type_url, sent=version)

    def on_ack(self, node_id: str, type_url: str, version: str, *, stream: int) -> None:
        self._set(stream, node_id, type_url, acked=version)

    def on_nack(self, node_id: str, type_url: str, version: str, message: str, *, stream: int) -> None:
        self._set(stream, node_id, type_url, nacked=version, nack_message=message)

    def on_closed(self, node_id: str, *, stream: int) -> None:
        with self._cond:
            entry = self._streams.pop(stream, None)
            if entry is not None:
                self._forget(stream, entry[0])
                if entry[0] not in self._by_node:
                    self._gone[entry[0]] = time.monotonic()
            self._cond.notify_all()

    def state(self, node_id: str, type_url: str) -> AckState:
        with self._cond:
            return self._state(node_id, type_url)

    def states(self) -> dict[tuple[str, str], AckState]:
        with self._cond:
            return {key: self._state(*key) for key in self._last}

    def streams(self, node_id: str) -> int:
        """How many open streams speak for ``node_id``."""
        with self._cond:
            return len(self._by_node.get(node_id, ()))

    def gone(self) -> dict[str, float]:
        """Nodes whose streams all closed (and none opened since): seconds since the last one closed."""
        now = time.monotonic()
        with self._cond:
            return {node: now - since for node, since in self._gone.items()}

    def wait(self, node_id: str, type_url: str, version: str, timeout: float) -> None:
        """Return once ``node_id`` acked ``version`` of ``type_url`` or later (on every open stream).

        Raises NackError if it rejected that version (or a later one) first, TimeoutError
        when ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                states = self._open_states(node_id, type_url) or [self._last.get((node_id, type_url), AckState())]
                if all(_at_least(st.acked, version) for st in states):
                    return
                for st in states:
                    if _at_least(st.nacked, version) and _nack_stands(st):
                        raise NackError(node_id, type_url, st.nacked, st.nack_message)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{node_id} did not ack {type_url} version {version} in {timeout}s")
                self._cond.wait(left)

    def _open_states(self, node_id: str, type_url: str) -> list[AckState]:
        out = []
        for stream in self._by_node.get(node_id, ()):
            st = self._streams[stream][1].get(type_url)
            if st is not None:
                out.append(st)
        return out

    def _state(self, node_id: str, type_url: str) -> AckState:
        states = self._open_states(node_id, type_url)
        return _combined(states) if states else self._last.get((node_id, type_url), AckState())

    def _forget(self, stream: int, node_id: str) -> None:
        streams = self._by_node.get(node_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self._by_node[node_id]

    def _set(self, stream: int, node_id: str, type_url: str, **changes: str) -> None:
        with self._cond:
            entry = self._streams.get(stream)
            if entry is None or entry[0] != node_id:
                if entry is not None:
                    self._forget(stream, entry[0])
                entry = self._streams[stream] = (node_id, {})
                self._by_node.setdefault(node_id, set()).add(stream)
                self._gone.pop(node_id, None)
            types = entry[1]
            st = types[type_url] = replace(types.get(type_url, AckState()), **changes)
            self._last[(node_id, type_url)] = st
            self._cond.notify_all()

"""A bounded, numbered, thread-safe ring of the newest items, readable from a sequence number.

Writers append; readers ask for what came after the last number they saw (``since``) and may
wait for it (long polling), so several readers follow one stream without missing or repeating
items while they keep up, and the oldest are forgotten once ``maxlen`` is reached.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from itertools import islice
from typing import Generic, TypeVar

T = TypeVar("T")


class SeqRing(Generic[T]):
    def __init__(self, maxlen: int = 10_000) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self._cond = threading.Condition()
        self._ring: deque[tuple[int, T]] = deque(maxlen=maxlen)
        self._seq = 0

    @property
    def maxlen(self) -> int:
        return self._ring.maxlen or 0

    def append(self, item: T) -> int:
        return self.extend((item,))

    def extend(self, items: Iterable[T]) -> int:
        """Append ``items`` in order; returns the number of the last one."""
        with self._cond:
            for item in items:
                self._seq += 1
                self._ring.append((self._seq, item))
            self._cond.notify_all()
            return self._seq

    def last_seq(self) -> int:
        """The number of the newest item ever appended (0 before the first)."""
        with self._cond:
            return self._seq

    def since(self, since: int | None = None, limit: int | None = None,
              wait: float = 0.0) -> list[tuple[int, T]]:
        """(number, item) pairs numbered above ``since`` (all kept ones if None), oldest first;
        with ``limit``, only the newest ``limit``. With ``wait``, block up to that many seconds
        for at least one."""
        deadline = time.monotonic() + wait
        with self._cond:
            while since is not None and self._seq <= since:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            # numbers in the ring are consecutive, ending at self._seq
            skip = 0 if since is None else max(0, len(self._ring) - max(0, self._seq - since))
            found = list(islice(self._ring, skip, None))
        if limit is not None:
            found = found[-limit:] if limit > 0 else []
        return found

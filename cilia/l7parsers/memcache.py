"""Memcached's L7 parser: a connection speaks the text or the binary protocol, chosen by the
client's first byte as memcached's ``-B auto`` chooses (0x80 opens a binary request, anything
else a text command), and keeps to it::

    conn = MemcacheConnection(check)
    out = conn.receive_client(b"get a b\\r\\n")    # one GenericL7Request per key, all must pass

Requests are named for policy after the text command of the same operation (``getkq`` is
``get``, ``ms ... MA`` is ``append``); see ``memcache_text`` and ``memcache_binary``. What both
share (the read buffer, key decoding, the per-request decision) is in ``memcache_framing``.
"""

from __future__ import annotations

from .base import DEFAULT_MAX_BUFFER, Check, L7Connection, Output, ProtocolError
from .memcache_binary import REQUEST_MAGIC, MemcacheBinaryConnection
from .memcache_framing import MAX_KEY, MAX_LINE, Answer
from .memcache_text import MemcacheTextConnection

__all__ = ["MAX_KEY", "MAX_LINE", "Answer", "MemcacheConnection"]


class MemcacheConnection(L7Connection):
    """A memcached connection in either protocol; ``dialect`` is ``"text"`` or ``"binary"`` once
    the client has sent its first byte."""

    protocol = "memcache"

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER, *, max_line: int = MAX_LINE) -> None:
        super().__init__(check, max_buffer)
        self.max_line = max_line
        self._inner: L7Connection | None = None
        self.dialect: str | None = None

    @property
    def check(self) -> Check:
        return self._check

    @check.setter
    def check(self, check: Check) -> None:
        # A policy change reaches the dialect's parser too, not only this dispatcher.
        self._check = check
        inner = getattr(self, "_inner", None)  # None while the base class's __init__ sets it
        if inner is not None:
            inner.check = check

    def assume(self, first: int) -> None:
        """Choose the dialect as if the client's first byte had been ``first``: a fast path that
        read the first requests itself hands the connection over (``memcache_fast``)."""
        if self._inner is None:
            self._inner = self._start(first)

    def receive_client(self, data: bytes) -> Output:
        if self._inner is None:
            if not data:
                return Output()
            self._inner = self._start(data[0])
        return self._inner.receive_client(data)

    def receive_server(self, data: bytes) -> Output:
        if self._inner is None:
            if data:
                raise ProtocolError("server", "the server spoke before the client")
            return Output()
        return self._inner.receive_server(data)

    def _start(self, first: int) -> L7Connection:
        if first == REQUEST_MAGIC:
            self.dialect = "binary"
            return MemcacheBinaryConnection(self.check, self.max_buffer)
        self.dialect = "text"
        return MemcacheTextConnection(self.check, self.max_buffer, max_line=self.max_line)

"""Memcached's L7 parser: a connection speaks the text or the binary protocol, chosen by the
client's first byte as memcached's ``-B auto`` chooses (0x80 opens a binary request, anything
else a text command), and keeps to it::

    conn = MemcacheConnection(check)
    out = conn.receive_client(b"get a b\\r\\n")    # one GenericL7Request per key, all must pass

Requests are named for policy after the text command of the same operation (``getkq`` is
``get``, ``ms ... MA`` is ``append``); see ``memcache_text`` and ``memcache_binary``. This module
also holds what both share: the read buffer, key decoding and the per-request decision.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from cilia.policy.flows import GenericL7Request

from .base import DEFAULT_MAX_BUFFER, Check, L7Connection, Output, ProtocolError, Record, decide

__all__ = ["MAX_KEY", "MAX_LINE", "Answer", "MemcacheConnection"]

MAX_KEY = 250  # memcached's KEY_MAX_LENGTH, in both protocols
MAX_LINE = 64 << 10  # a command or reply line; a multi-get of a few hundred long keys fits


class Answer(enum.Enum):
    """Whether the server answers a forwarded request."""

    ALWAYS = "always"
    MAYBE = "maybe"  # quiet: only some outcomes are answered (a meta q flag, a binary quiet opcode)
    NEVER = "never"  # noreply, quit


class Buffer:
    """Bytes one side sent that are not framed yet. ``line()`` and ``take()`` return a whole unit
    or None (wait for more); going over the side's limits raises ProtocolError."""

    __slots__ = ("side", "max_buffer", "max_line", "_data", "_scanned")

    def __init__(self, side: str, max_buffer: int, max_line: int = MAX_LINE) -> None:
        self.side = side
        self.max_buffer = max_buffer
        self.max_line = max_line
        self._data = bytearray()
        self._scanned = 0  # no newline before this offset: fed byte by byte, a line is searched once

    def __len__(self) -> int:
        return len(self._data)

    def feed(self, data: bytes) -> None:
        self._data += data

    def line(self) -> bytes | None:
        """The next line with its ``\\n`` (and the ``\\r`` before it, if any)."""
        end = self._data.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._data)
            if self._scanned > self.max_line:
                raise ProtocolError(self.side, f"a line longer than {self.max_line} bytes")
            return None
        if end > self.max_line:
            raise ProtocolError(self.side, f"a line longer than {self.max_line} bytes")
        return self._pop(end + 1)

    def take(self, n: int) -> bytes | None:
        return self._pop(n) if len(self._data) >= n else None

    def check_limit(self) -> None:
        """Called once a chunk is framed: what is left is one unfinished frame."""
        if len(self._data) > self.max_buffer:
            raise ProtocolError(self.side, f"an unfinished frame of more than {self.max_buffer} bytes")

    def _pop(self, n: int) -> bytes:
        unit = bytes(self._data[:n])
        del self._data[:n]  # bytearray drops a prefix without copying the rest
        self._scanned = 0
        return unit


def key_text(raw: bytes) -> str:
    """A key as policy sees it. Keys are bytes; invalid UTF-8 becomes U+FFFD, which is what Go's
    regexp (Cilium's keyRegex) matches such bytes as."""
    return raw.decode("utf-8", "replace")


def decided(check: Check, commands: Sequence[str], keys: Sequence[str]) -> Record:
    """One request: every (command, key) pair must be allowed; a keyless request is checked by
    command only. The record's summary names the command(s) and the keys."""
    if keys:
        requests = [GenericL7Request.of("memcache", {"command": c, "key": k}) for c in commands for k in keys]
    else:
        requests = [GenericL7Request.of("memcache", {"command": c}) for c in commands]
    summary = {"command": ",".join(commands)}
    if keys:
        summary["key"] = " ".join(keys)
    return Record(summary, decide(check, requests))


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
        # Imported here: both protocol modules import this one's shared helpers.
        from .memcache_binary import REQUEST_MAGIC, MemcacheBinaryConnection
        from .memcache_text import MemcacheTextConnection

        if first == REQUEST_MAGIC:
            self.dialect = "binary"
            return MemcacheBinaryConnection(self.check, self.max_buffer)
        self.dialect = "text"
        return MemcacheTextConnection(self.check, self.max_buffer, max_line=self.max_line)

"""What memcached's text and binary parsers share: the read buffer, key decoding and the
per-request decision (``memcache`` chooses between the two dialects)."""

from __future__ import annotations

import enum
from collections.abc import Sequence

from cilia.policy.flows import GenericL7Request

from .base import Check, ProtocolError, Record, decide

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

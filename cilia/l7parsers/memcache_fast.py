"""A fast path in front of the memcache parser for the shape nearly all traffic has.

Most memcached clients send one text ``get <key>`` or ``set <key> <flags> <exptime> <bytes>``
per TCP read and wait for its reply, which comes back in one read. ``FastMemcacheConnection``
recognises exactly that shape with one regular expression per side and answers it without the
general parser (``MemcacheConnection``), keeping each (command, key) decision for as long as the
policy (its ``check``) is the same. Anything else — another command, two requests in a chunk, a
partial one, a reply that is not one whole ``VALUE``/``END`` or storage answer — hands the
connection to the general parser for good, which is first brought to the fast path's state by
replaying the request still awaiting its reply (its output was already produced, so it is
dropped). Decisions, records and bytes are the general parser's own: tests feed both the same
streams.
"""

from __future__ import annotations

import re

from .base import DEFAULT_MAX_BUFFER, Check, L7Connection, Output, Record
from .memcache import MemcacheConnection
from .memcache_framing import MAX_LINE, decided
from .memcache_text import DENIED

# One whole request, nothing after it. Keys: printable ASCII up to memcached's 250 bytes (the
# general parser accepts more; those take the slow path). Numbers short enough to be in range.
_GET = re.compile(rb"get ([\x21-\x7e]{1,250})\r\n")
_SET = re.compile(rb"set ([\x21-\x7e]{1,250}) ([0-9]{1,9}) (-?[0-9]{1,9}) ([0-9]{1,7})\r\n")
_VALUE = re.compile(rb"VALUE [\x21-\x7e]{1,250} [0-9]{1,9} ([0-9]{1,7})\r\n")
_END = b"END\r\n"
_FAST_LINES = 1024  # every line the fast path reads is shorter
_STORED = frozenset((b"STORED\r\n", b"NOT_STORED\r\n", b"EXISTS\r\n", b"NOT_FOUND\r\n"))


class FastMemcacheConnection(L7Connection):
    protocol = "memcache"

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER, *, max_line: int = MAX_LINE) -> None:
        self._memo: dict[tuple[str, str], Record] = {}
        super().__init__(check, max_buffer)
        self.max_line = max_line
        self._fast = max_line >= _FAST_LINES  # a lower limit is the general parser's to enforce
        self._full: MemcacheConnection | None = None  # once set, it has the connection for good
        self._awaiting: tuple[bytes, bool] | None = None  # (the forwarded request, is it a get)
        self._first: int | None = None  # the client's first byte (the dialect the general parser picks)

    @property
    def check(self) -> Check:
        return self._check

    @check.setter
    def check(self, check: Check) -> None:
        self._check = check
        self._memo.clear()  # decisions hold for one policy only
        full = getattr(self, "_full", None)
        if full is not None:
            full.check = check

    def receive_client(self, data: bytes) -> Output:
        if self._fast and self._full is None and self._awaiting is None and data and len(data) <= self.max_buffer:
            request = _whole_request(data)
            if request is not None:
                command, key = request
                if self._first is None:
                    self._first = data[0]
                record = self._memo.get((command, key))
                if record is None:
                    record = self._memo[(command, key)] = decided(self.check, (command,), (key,))
                if record.decision.allowed:
                    self._awaiting = (data, command == "get")
                    return Output(data, b"", (record,))
                return Output(b"", DENIED, (record,))  # nothing outstanding: the denial goes now
        if self._full is None and not data:
            return Output()
        return self._general().receive_client(data)

    def receive_server(self, data: bytes) -> Output:
        if self._full is None:
            if not data:
                return Output()
            awaiting = self._awaiting
            if awaiting is not None and self._whole_reply(data, awaiting[1]):
                self._awaiting = None
                return Output(to_client=data)
        return self._general().receive_server(data)

    @property
    def dialect(self) -> str | None:
        """As ``MemcacheConnection.dialect``: ``text`` once the fast path read a request."""
        if self._full is not None:
            return self._full.dialect
        return "text" if self._first is not None else None

    def _whole_reply(self, data: bytes, get: bool) -> bool:
        if not get:
            return data in _STORED
        if data == _END:
            return True
        value = _VALUE.match(data)
        if value is None:
            return False
        size = int(value.group(1))
        line = value.end()
        return (len(data) == line + size + 2 + len(_END) and data.endswith(b"\r\n" + _END)
                and line + size + 2 <= self.max_buffer)

    def _general(self) -> MemcacheConnection:
        full = self._full
        if full is None:
            full = self._full = MemcacheConnection(self.check, self.max_buffer, max_line=self.max_line)
            if self._first is not None:
                full.assume(self._first)
            if self._awaiting is not None:  # bring it to our state: that request awaits its reply
                full.receive_client(self._awaiting[0])
                self._awaiting = None
        return full


def _whole_request(data: bytes) -> tuple[str, str] | None:
    """(command, key) if ``data`` is exactly one text get or set the fast path answers."""
    if data.startswith(b"get "):
        match = _GET.fullmatch(data)
        return ("get", match.group(1).decode("ascii")) if match is not None else None
    if data.startswith(b"set "):
        match = _SET.match(data)
        if match is None:
            return None
        size = int(match.group(4))
        if len(data) != match.end() + size + 2 or not data.endswith(b"\r\n"):
            return None
        return "set", match.group(1).decode("ascii")
    return None

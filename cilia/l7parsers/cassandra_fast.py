"""A fast path in front of the Cassandra parser for the frames a session sends over and over.

After STARTUP, a CQL driver sends one whole QUERY, PREPARE, EXECUTE or BATCH per TCP read, most of
them the same few statements again, and the server answers each with one whole frame.
``FastCassandraConnection`` takes exactly that shape (a whole frame alone in its chunk, no frame
flags, the connection's version, a stream not in use): the body is checked by the parser's own
readers, but a statement's classification is kept per (query text, session keyspaces) and a
decision per list of accesses for as long as the policy (its ``check``) is the same, so a repeated
statement costs a dictionary lookup instead of the lexer and policy. Whole response frames to it
(anything but the RESULT kinds the parser reads: Set_keyspace, Prepared) pass straight through.

Everything else goes to the general parser (``CassandraConnection``), on the same connection
state, which the fast path leaves untouched whenever it declines: the handshake, flags (tracing,
custom payload, compression), partial or several frames in a chunk, a statement it cannot
classify, a prepared id it does not know, a denied request (the parser writes the denial), any
bytes the readers refuse. Decisions, records and bytes are the parser's own:
tests/l7parsers/test_cassandra_fast.py feeds both the same streams.
"""

from __future__ import annotations

import struct

from .base import DEFAULT_MAX_BUFFER, Check, Decision, Output, Record
from .cassandra import MAX_PREPARED, CassandraConnection, _Access, _InFlight
from .cql_frame import MAX_BODY, FrameError, Opcode, Reader, response_opcodes
from .cql_messages import RESULT_PREPARED, RESULT_SET_KEYSPACE, _batch, _query_parameters
from .cql_statement import StatementError, classify

_V12 = struct.Struct(">BbBi")  # flags, stream, opcode, body length after the version byte
_V34 = struct.Struct(">BhBi")
_I32 = struct.Struct(">i")
QUERY, PREPARE, EXECUTE, BATCH = Opcode.QUERY.value, Opcode.PREPARE.value, Opcode.EXECUTE.value, Opcode.BATCH.value
RESULT, EVENT = Opcode.RESULT.value, Opcode.EVENT.value
_NAMES = {op.value: op.name for op in Opcode}
_RESPONSES = {v: frozenset(op.value for op in response_opcodes(v)) for v in (1, 2, 3, 4)}
MEMO_SIZE = 4096  # entries of each memo before it starts over


class _Accesses:
    """A request's statements as policy sees them, with what a record and the forward need."""

    __slots__ = ("accesses", "actions", "tables", "use")

    def __init__(self, accesses: tuple[_Access, ...]) -> None:
        self.accesses = accesses
        self.actions = ",".join(a.action for a in accesses)
        self.tables = ",".join(a.table for a in accesses)
        self.use = next((a.table for a in accesses if a.action == "use"), None)


class FastCassandraConnection(CassandraConnection):
    """``CassandraConnection`` with the fast path in front of both directions."""

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER, max_prepared: int = MAX_PREPARED) -> None:
        self._decided: dict[tuple[_Access, ...], tuple[_Accesses, Decision]] = {}
        self._classified: dict[tuple[bytes | str, tuple[str | None, ...]], tuple[_Access, ...]] = {}
        super().__init__(check, max_buffer, max_prepared)

    @property
    def check(self) -> Check:
        return self._check

    @check.setter
    def check(self, check: Check) -> None:
        self._check = check
        self._decided.clear()  # decisions hold for one policy only

    def receive_client(self, data: bytes) -> Output:
        if data and self._failed is None and not self._client_buf and not self._client_closed \
                and data[0] == self._version:
            out = self._fast_request(data)
            if out is not None:
                return out
        return super().receive_client(data)

    def receive_server(self, data: bytes) -> Output:
        if data and self._failed is None and not self._server_buf and not self._streaming \
                and self._server_header is None and not self._server_closed and self._whole_response(data):
            return Output(to_client=data)
        return super().receive_server(data)

    # -- client to server ------------------------------------------------------------------

    def _fast_request(self, data: bytes) -> Output | None:
        """The output of a whole allowed request frame, or None (nothing changed: the parser's)."""
        version = data[0]
        size = 8 if version <= 2 else 9
        if len(data) < size:
            return None
        flags, stream, opcode, length = (_V12 if size == 8 else _V34).unpack_from(data, 1)
        if flags or length != len(data) - size or length > MAX_BODY or len(data) > self.max_buffer \
                or stream in self._in_flight:
            return None
        try:
            if opcode == QUERY or opcode == PREPARE:
                found = self._text_request(data, size, version, opcode == PREPARE)
            elif opcode == EXECUTE:
                found = self._execute(data, size, version)
            elif opcode == BATCH and version >= 2:
                found = self._batch(data, size, version)
            else:
                return None
        except (FrameError, StatementError, UnicodeDecodeError):
            return None
        if found is None:
            return None
        accesses, prepared_ids = found
        memo = self._decided.get(accesses)
        if memo is None:
            if len(self._decided) >= MEMO_SIZE:
                self._decided.clear()
            memo = self._decided[accesses] = (_Accesses(accesses), self._decide(list(accesses)))
        described, decision = memo
        if not decision.allowed:
            return None
        for prepared_id in prepared_ids:  # used now: the last to be forgotten, as in the parser
            self._prepared.move_to_end(prepared_id)
        self._in_flight[stream] = _InFlight(prepared=accesses if opcode == PREPARE else None, keyspace=described.use)
        record = Record({"opcode": _NAMES[opcode], "query_action": described.actions,
                         "query_table": described.tables, "stream": str(stream)}, decision)
        return Output(data, b"", (record,))

    def _text_request(self, data: bytes, size: int, version: int,
                      prepare: bool) -> tuple[tuple[_Access, ...], tuple[bytes, ...]] | None:
        if len(data) < size + 4:
            return None
        n = _I32.unpack_from(data, size)[0]
        end = size + 4 + n
        if n < 0 or end > len(data):
            return None
        if prepare:
            if end != len(data):
                return None
        elif version == 1:
            if len(data) - end < 2:  # the consistency; a v1 server reads no further
                return None
        else:
            r = Reader(data, end)
            _query_parameters(r, version)
            if r.remaining:
                return None
        return self._classify(data[size + 4:end]), ()

    def _execute(self, data: bytes, size: int, version: int) -> tuple[tuple[_Access, ...], tuple[bytes, ...]] | None:
        r = Reader(data, size)
        prepared_id = r.short_bytes()
        if version == 1:
            for _ in range(r.short()):
                r.value(version)
            r.short()  # consistency
        else:
            _query_parameters(r, version)
        known = self._prepared.get(prepared_id)
        if r.remaining or known is None:
            return None
        return known, (prepared_id,)

    def _batch(self, data: bytes, size: int, version: int) -> tuple[tuple[_Access, ...], tuple[bytes, ...]] | None:
        r = Reader(data, size)
        batch = _batch(r, version)
        if r.remaining:
            return None
        accesses: list[_Access] = []
        prepared_ids: list[bytes] = []
        for item in batch.statements:
            if isinstance(item, bytes):
                known = self._prepared.get(item)
                if known is None:
                    return None
                accesses += known
                prepared_ids.append(item)
            else:
                accesses += self._classify(item)
        return tuple(accesses), tuple(prepared_ids)

    def _classify(self, text: bytes | str) -> tuple[_Access, ...]:
        """A query string's accesses in the current session keyspaces (StatementError or
        UnicodeDecodeError when the parser would deny or refuse it)."""
        key = (text, tuple(self._session_keyspaces()))
        accesses = self._classified.get(key)
        if accesses is None:
            accesses = tuple(self._resolve(classify(text if isinstance(text, str) else text.decode("utf-8"))))
            if len(self._classified) >= MEMO_SIZE:
                self._classified.clear()
            self._classified[key] = accesses
        return accesses

    # -- server to client ------------------------------------------------------------------

    def _whole_response(self, data: bytes) -> bool:
        """``data`` is one whole, plain response frame the parser would pass unread: its request
        is answered (True), or the parser must read it (False, nothing changed)."""
        first = data[0]
        version = first & 0x7F
        if not first & 0x80 or version not in _RESPONSES:
            return False
        size = 8 if version <= 2 else 9
        if len(data) < size:
            return False
        flags, stream, opcode, length = (_V12 if size == 8 else _V34).unpack_from(data, 1)
        if flags or length != len(data) - size or length > MAX_BODY or opcode not in _RESPONSES[version]:
            return False
        if opcode == RESULT:
            if length < 4 or _I32.unpack_from(data, size)[0] in (RESULT_SET_KEYSPACE, RESULT_PREPARED):
                return False
        if opcode != EVENT:
            self._in_flight.pop(stream, None)
        return True


__all__ = ["FastCassandraConnection"]

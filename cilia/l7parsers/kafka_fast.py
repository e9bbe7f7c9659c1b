"""A fast path in front of the Kafka parser for the requests a client sends over and over.

Nearly all of a Kafka client's traffic is Produce, Fetch and ListOffsets, one request per TCP
read, each answered before the next (or a few in flight). Policy needs only the request's API
key, version, client id and topic names, not the decoded body that the schema-driven parser
(``KafkaConnection``) builds. ``FastKafkaConnection`` reads exactly those from a chunk that is one
whole frame of a Produce v3-12, Fetch v4-12 or ListOffsets v1-9 request (the classic encoding and
the flexible one, without tagged fields) with a hand-written reader that checks every length as
strictly as the parser's decoder, forwards it when policy allows, and passes a whole response
frame to such a request straight through.

Anything else goes to the general parser's own code, unchanged, on the same connection state:
another API or version, a chunk holding part of a frame or several, a denied request (its reply
is built from the decoded body), bytes the reader finds odd (a null where the parser might
accept or refuse one, a tagged field: the parser decides). Decisions, records and bytes are the
parser's own: tests/l7parsers/test_kafka_fast.py feeds both the same requests and streams.
"""

from __future__ import annotations

import struct

from cilia.policy.flows import KafkaRequest

from . import kafka_replies as replies
from .base import DEFAULT_MAX_BUFFER, Check, Decision, Output, Record, decide
from .kafka import MIN_REQUEST, KafkaConnection, _Pending, _summary

_HEAD = struct.Struct(">hhih")  # api_key, api_version, correlation_id, client_id length
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")
_SIZE_AND_CID = struct.Struct(">ii")

PRODUCE, FETCH, LIST_OFFSETS = 0, 1, 2
MEMO_SIZE = 4096  # decisions kept before starting over


class _Odd(Exception):
    """The frame is not the plain shape this reader knows: the general parser reads it."""


class _Cursor:
    """Reads one request frame (``data`` includes the size prefix) in the classic encoding, or
    the flexible one (``flexible``: unsigned-varint lengths, a tagged-field section closing every
    struct, which must be empty here: tags are the parser's to read)."""

    __slots__ = ("data", "pos", "end", "flexible")

    def __init__(self, data: bytes, pos: int, flexible: bool) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data)
        self.flexible = flexible

    def skip(self, n: int) -> None:
        if n > self.end - self.pos:
            raise _Odd
        self.pos += n

    def i16(self) -> int:
        pos = self.pos
        if pos + 2 > self.end:
            raise _Odd
        self.pos = pos + 2
        return int(_I16.unpack_from(self.data, pos)[0])

    def i32(self) -> int:
        pos = self.pos
        if pos + 4 > self.end:
            raise _Odd
        self.pos = pos + 4
        return int(_I32.unpack_from(self.data, pos)[0])

    def uvarint(self) -> int:
        result = 0
        for shift in (0, 7, 14, 21, 28):
            if self.pos >= self.end:
                raise _Odd
            b = self.data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                if result > 0xFFFFFFFF:
                    raise _Odd
                return result
        raise _Odd

    def length(self, wide: bool) -> int:
        """A length (-1: null) no longer than what is left."""
        n = self.uvarint() - 1 if self.flexible else (self.i32() if wide else self.i16())
        if n < -1 or n > self.end - self.pos:
            raise _Odd
        return n

    def count(self) -> int:
        """An array's length (a null array is the parser's to judge)."""
        n = self.length(wide=True)
        if n < 0:
            raise _Odd
        return n

    def name(self) -> str:
        """A non-nullable string."""
        n = self.length(wide=False)
        if n < 0:
            raise _Odd
        start = self.pos
        self.pos = start + n
        return self.data[start:self.pos].decode("utf-8")  # UnicodeDecodeError: the parser's to refuse

    def skip_nullable_string(self) -> None:
        """A nullable string: skipped, but it must be UTF-8 as for the parser."""
        n = self.length(wide=False)
        if n > 0:
            start = self.pos
            self.pos = start + n
            self.data[start:self.pos].decode("utf-8")

    def skip_nullable_bytes(self) -> None:
        n = self.length(wide=True)
        if n > 0:
            self.pos += n

    def end_struct(self) -> None:
        """A flexible struct's tagged fields: none."""
        if self.flexible:
            if self.pos >= self.end or self.data[self.pos] != 0:
                raise _Odd
            self.pos += 1

    def topics(self, found: dict[str, None], fixed: int, structs: bool = True) -> int:
        """An array of (topic name, array of ``fixed``-size partitions, structs or plain
        numbers); the array's length."""
        n = self.count()
        for _ in range(n):
            found[self.name()] = None
            partitions = self.count()
            if self.flexible and structs:
                for _ in range(partitions):
                    self.skip(fixed)
                    self.end_struct()
            else:
                self.skip(partitions * fixed)
            self.end_struct()
        return n


#: the requests read here: (api key, version) -> flexible encoding
FAST_VERSIONS = {**{(PRODUCE, v): v >= 9 for v in range(3, 13)}, **{(FETCH, v): v >= 12 for v in range(4, 13)},
                 **{(LIST_OFFSETS, v): v >= 6 for v in range(1, 10)}}
# Per Fetch version: bytes before the topics, and of each partition.
_FETCH_PREFIX = {v: 17 + (8 if v >= 7 else 0) for v in range(4, 13)}  # ReplicaId..IsolationLevel [+ session]
_FETCH_PARTITION = {v: 16 + (8 if v >= 5 else 0) + (4 if v >= 9 else 0) + (4 if v >= 12 else 0)
                    for v in range(4, 13)}  # [+ LogStartOffset] [+ CurrentLeaderEpoch] [+ LastFetchedEpoch]
_LIST_OFFSETS_PARTITION = {v: 12 + (4 if v >= 4 else 0) for v in range(1, 10)}  # [+ CurrentLeaderEpoch]


def read_request(frame: bytes) -> tuple[int, int, int, str, tuple[str, ...], bool, bool] | None:
    """(api_key, version, correlation_id, client_id, topics, answered, named) of one whole
    request frame (size prefix included) of a version this reader knows, exactly as the general
    parser finds them; None for anything else. ``answered``: the broker will reply (not Produce
    with acks=0); ``named``: the request has a non-empty ``Topics`` array."""
    if len(frame) < 4 + MIN_REQUEST:
        return None
    api_key, version, cid, n = _HEAD.unpack_from(frame, 4)
    flexible = FAST_VERSIONS.get((api_key, version))
    if flexible is None:
        return None
    r = _Cursor(frame, 14, flexible)
    found: dict[str, None] = {}
    answered, named = True, False
    try:
        if n < 0 or n > r.end - r.pos:  # a null client id, or an odd length: the parser's to read
            raise _Odd
        client_id = frame[14:14 + n].decode("utf-8")  # an int16 length in both header versions
        r.pos += n
        r.end_struct()  # header v2's tagged fields
        if api_key == PRODUCE:
            r.skip_nullable_string()  # TransactionalId
            answered = r.i16() != 0  # Acks
            r.skip(4)  # TimeoutMs
            for _ in range(r.count()):  # TopicData
                found[r.name()] = None
                for _ in range(r.count()):  # PartitionData: Index, Records
                    r.skip(4)
                    r.skip_nullable_bytes()
                    r.end_struct()
                r.end_struct()
        elif api_key == FETCH:
            r.skip(_FETCH_PREFIX[version])
            named = r.topics(found, _FETCH_PARTITION[version]) > 0
            if version >= 7:
                r.topics(found, 4, structs=False)  # ForgottenTopicsData: names and partition numbers
            if version >= 11:
                r.name()  # RackId
        else:
            r.skip(4 if version < 2 else 5)  # ReplicaId [IsolationLevel]
            named = r.topics(found, _LIST_OFFSETS_PARTITION[version]) > 0
        r.end_struct()
    except (_Odd, UnicodeDecodeError):
        return None
    if r.pos != r.end:
        return None  # bytes left over: the parser refuses them
    return api_key, version, cid, client_id, tuple(found), answered, named


class FastKafkaConnection(KafkaConnection):
    """``KafkaConnection`` with the fast path in front of both directions; each (API, version,
    client id, topics) decision is kept for as long as the policy (its ``check``) is the same."""

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER,
                 topic_ids: dict[bytes, str] | None = None) -> None:
        self._decided: dict[tuple[int, int, str, tuple[str, ...]], tuple[Decision, dict[str, str]]] = {}
        super().__init__(check, max_buffer, topic_ids)

    @property
    def check(self) -> Check:
        return self._check

    @check.setter
    def check(self, check: Check) -> None:
        self._check = check
        self._decided.clear()  # decisions hold for one policy only

    def receive_client(self, data: bytes) -> Output:
        if not self._requests and self._failed is None and len(data) >= 4:
            size = _I32.unpack_from(data, 0)[0]
            if len(data) == 4 + size and MIN_REQUEST <= size <= self.max_buffer:
                read = read_request(data)
                if read is not None:
                    api_key, version, cid, client_id, topics, answered, named = read
                    key = (api_key, version, client_id, topics)
                    memo = self._decided.get(key)
                    if memo is None:
                        if len(self._decided) >= MEMO_SIZE:
                            self._decided.clear()
                        memo = self._decided[key] = (
                            decide(self.check, [KafkaRequest(api_key, version, client_id, topics)]),
                            _summary(api_key, version, client_id, topics, 0))
                    decision, summary = memo
                    if decision.allowed:
                        if answered:
                            self._queue.forwarded()
                            self._pending.append(_Pending(cid, api_key, version, client_id, named))
                        return Output(data, b"", (Record({**summary, "correlation_id": str(cid)}, decision),))
        return super().receive_client(data)

    def receive_server(self, data: bytes) -> Output:
        pending = self._pending
        if (pending and not self._responses and not self._streaming and self._failed is None
                and len(data) >= 8 and pending[0].api_key not in (replies.API_VERSIONS, replies.METADATA)):
            size, cid = _SIZE_AND_CID.unpack_from(data, 0)
            if len(data) == 4 + size and cid == pending[0].correlation_id:
                pending.popleft()
                return Output(to_client=data + self._queue.replied())
        return super().receive_server(data)


__all__ = ["FastKafkaConnection", "read_request"]

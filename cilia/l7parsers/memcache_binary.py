"""Memcached's binary protocol: 24-byte headers (magic 0x80 for a request, 0x81 for a response;
opcode, key and extras lengths, vbucket or status, body length, opaque, CAS), then extras, key
and value.

A request's shape (extras length, key, value) is checked as memcached 1.6 checks it; one it
would refuse is a ProtocolError here. Opcodes are named for policy after the text command of
the same operation (``getkq`` is ``get``, ``setq`` is ``set``, ``flushq`` is ``flush_all``; Set,
Add and Replace with a CAS are ``cas``, as memcached runs them), the others by Cilium's names
(``noop``, ``sasl-auth``, ``rget``, ``tap-connect`` ...). The opcodes memcached does not implement
(Verbosity and 0x30-0x47) are answered by the parser itself with memcached's ``Unknown command``
when policy allows them: memcached 1.6 misreads their length, so forwarding one would let the
server run bytes nobody checked.

Responses echo the request's opcode and opaque. Quiet requests (GetQ, GetKQ, SetQ ... PrependQ,
GATQ, GATKQ) are answered only on a hit or a failure; any other response means every quiet one
before it is done. A denial that must wait behind a quiet request is preceded by a Noop of the
parser's own (its response is not passed on), so it goes out when the server has answered
everything before it.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass

from .base import DEFAULT_MAX_BUFFER, Check, FramedConnection, Output, ProtocolError, Record, ReplyQueue
from .memcache_framing import MAX_KEY, Answer, Buffer, decided, key_text

__all__ = [
    "OPCODES", "REQUEST_MAGIC", "RESPONSE_MAGIC", "BinaryRequest", "BinaryResponse", "Header",
    "MemcacheBinaryConnection", "Opcode", "RequestReader", "ResponseReader", "denial",
]

REQUEST_MAGIC = 0x80
RESPONSE_MAGIC = 0x81
HEADER_SIZE = 24
STATUS_AUTH_ERROR = 0x0008  # what Cilium answers a denied request with
STATUS_UNKNOWN_COMMAND = 0x0081
_HEADER = struct.Struct(">BBHBBHIIQ")
_BARRIER_OPAQUE = 0xC111A  # the parser's own Noop; matched by position, so any value works


@dataclass(frozen=True, slots=True)
class Header:
    """A request or response header; ``status`` is the vbucket id in a request."""

    magic: int
    opcode: int
    key_length: int
    extras_length: int
    data_type: int
    status: int
    body_length: int
    opaque: int
    cas: int

    @classmethod
    def parse(cls, data: bytes) -> Header:
        return cls(*_HEADER.unpack_from(data))

    def pack(self) -> bytes:
        return _HEADER.pack(self.magic, self.opcode, self.key_length, self.extras_length, self.data_type,
                            self.status, self.body_length, self.opaque, self.cas)


class Key(enum.Enum):
    REQUIRED = "required"
    FORBIDDEN = "forbidden"
    OPTIONAL = "optional"


@dataclass(frozen=True, slots=True)
class Shape:
    """The body a request must have: allowed extras lengths (None: any), its key, and whether a
    value may follow the key (else the body is exactly extras and key)."""

    extras: tuple[int, ...] | None
    key: Key
    value: bool


_NOTHING = Shape((0,), Key.FORBIDDEN, False)
_UNCHECKED = Shape(None, Key.OPTIONAL, True)


@dataclass(frozen=True, slots=True)
class Opcode:
    """One row of the opcode table."""

    code: int
    name: str  # memcached's name
    command: str  # the policy name
    shape: Shape = _UNCHECKED
    answer: Answer = Answer.ALWAYS
    item_key: bool = True  # the key names an item (not a stats group or a SASL mechanism)
    served: bool = True  # memcached 1.6 implements it


def _table() -> dict[int, Opcode]:
    store = Shape((8,), Key.REQUIRED, True)
    get = Shape((0,), Key.REQUIRED, False)
    arith = Shape((20,), Key.REQUIRED, False)
    concat = Shape((0,), Key.REQUIRED, True)
    touch = Shape((4,), Key.REQUIRED, False)
    flush = Shape((0, 4), Key.FORBIDDEN, False)
    q = Answer.MAYBE
    rows = [
        Opcode(0x00, "get", "get", get),
        Opcode(0x01, "set", "set", store),
        Opcode(0x02, "add", "add", store),
        Opcode(0x03, "replace", "replace", store),
        Opcode(0x04, "delete", "delete", get),
        Opcode(0x05, "increment", "incr", arith),
        Opcode(0x06, "decrement", "decr", arith),
        Opcode(0x07, "quit", "quit", _NOTHING),
        Opcode(0x08, "flush", "flush_all", flush),
        Opcode(0x09, "getq", "get", get, q),
        Opcode(0x0A, "noop", "noop", _NOTHING),
        Opcode(0x0B, "version", "version", _NOTHING),
        Opcode(0x0C, "getk", "get", get),
        Opcode(0x0D, "getkq", "get", get, q),
        Opcode(0x0E, "append", "append", concat),
        Opcode(0x0F, "prepend", "prepend", concat),
        Opcode(0x10, "stat", "stats", Shape((0,), Key.OPTIONAL, False), item_key=False),
        Opcode(0x11, "setq", "set", store, q),
        Opcode(0x12, "addq", "add", store, q),
        Opcode(0x13, "replaceq", "replace", store, q),
        Opcode(0x14, "deleteq", "delete", get, q),
        Opcode(0x15, "incrementq", "incr", arith, q),
        Opcode(0x16, "decrementq", "decr", arith, q),
        Opcode(0x17, "quitq", "quit", _NOTHING, Answer.NEVER),  # the server closes without a word
        Opcode(0x18, "flushq", "flush_all", flush, q),
        Opcode(0x19, "appendq", "append", concat, q),
        Opcode(0x1A, "prependq", "prepend", concat, q),
        Opcode(0x1B, "verbosity", "verbosity", Shape((4,), Key.FORBIDDEN, False), served=False),
        Opcode(0x1C, "touch", "touch", touch),
        Opcode(0x1D, "gat", "gat", touch),
        Opcode(0x1E, "gatq", "gat", touch, q),
        Opcode(0x20, "sasl_list_mechs", "sasl-list-mechs", _NOTHING),
        Opcode(0x21, "sasl_auth", "sasl-auth", Shape((0,), Key.REQUIRED, True), item_key=False),
        Opcode(0x22, "sasl_step", "sasl-step", Shape((0,), Key.REQUIRED, True), item_key=False),
        Opcode(0x23, "gatk", "gat", touch),
        Opcode(0x24, "gatkq", "gat", touch, q),
    ]
    # Range, vbucket and TAP opcodes: named as Cilium names them, not implemented by memcached.
    unserved = ["rget", "rset", "rsetq", "rappend", "rappendq", "rprepend", "rprependq", "rdelete", "rdeleteq",
                "rincr", "rincrq", "rdecr", "rdecrq", "set-vbucket", "get-vbucket", "del-vbucket",
                "tap-connect", "tap-mutation", "tap-delete", "tap-flush", "tap-opaque", "tap-vbucket-set",
                "tap-checkpoint-start", "tap-checkpoint-end"]
    rows += [Opcode(0x30 + i, name, name, served=False) for i, name in enumerate(unserved)]
    return {row.code: row for row in rows}


OPCODES: dict[int, Opcode] = _table()
_QUIET = frozenset(code for code, op in OPCODES.items() if op.answer is Answer.MAYBE)
_CAS_CAPABLE = frozenset({0x01, 0x02, 0x03, 0x11, 0x12, 0x13})  # memcached stores these as cas when CAS != 0


@dataclass(frozen=True, slots=True)
class BinaryRequest:
    """One request as read: its bytes and what policy needs."""

    frame: bytes
    header: Header
    opcode: Opcode
    commands: tuple[str, ...]
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BinaryResponse:
    frame: bytes
    header: Header


def _bad(message: str) -> ProtocolError:
    return ProtocolError("client", message)


def _check_lengths(side: str, header: Header, max_buffer: int) -> None:
    if header.data_type != 0:
        raise ProtocolError(side, f"data type {header.data_type} (only 0, raw bytes, exists)")
    if header.key_length > MAX_KEY:
        raise ProtocolError(side, f"a key of {header.key_length} bytes, over {MAX_KEY}")
    if header.key_length + header.extras_length > header.body_length:
        raise ProtocolError(side, "key and extras longer than the body")
    if HEADER_SIZE + header.body_length > max_buffer:
        raise ProtocolError(side, f"a body of {header.body_length} bytes, over the buffer limit")


def _check_shape(header: Header, op: Opcode) -> None:
    shape = op.shape
    fixed = header.extras_length + header.key_length
    if shape.extras is not None and header.extras_length not in shape.extras:
        raise _bad(f"{op.name} with {header.extras_length} bytes of extras")
    if shape.key is Key.REQUIRED and not header.key_length:
        raise _bad(f"{op.name} without a key")
    if shape.key is Key.FORBIDDEN and header.key_length:
        raise _bad(f"{op.name} with a key")
    if not shape.value and header.body_length != fixed:
        raise _bad(f"{op.name} with a value")


class RequestReader:
    """Frames a client's binary stream into requests: ``feed`` bytes, then ``next()`` until None."""

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self._buffer = Buffer("client", max_buffer)
        self._header: Header | None = None  # read, waiting for its body

    def feed(self, data: bytes) -> None:
        self._buffer.feed(data)

    def check_limit(self) -> None:
        self._buffer.check_limit()

    def next(self) -> BinaryRequest | None:
        if self._header is None:
            raw = self._buffer.take(HEADER_SIZE)
            if raw is None:
                return None
            header = Header.parse(raw)
            if header.magic != REQUEST_MAGIC:
                raise _bad(f"magic 0x{header.magic:02x} where a request (0x80) should start")
            op = OPCODES.get(header.opcode)
            if op is None:
                raise _bad(f"unknown opcode 0x{header.opcode:02x}")
            _check_lengths("client", header, self._buffer.max_buffer)
            _check_shape(header, op)
            self._header = header
        header = self._header
        body = self._buffer.take(header.body_length)
        if body is None:
            return None
        self._header = None
        op = OPCODES[header.opcode]
        key = body[header.extras_length:header.extras_length + header.key_length]
        keys = (key_text(key),) if op.item_key and key else ()
        command = "cas" if header.opcode in _CAS_CAPABLE and header.cas else op.command
        return BinaryRequest(header.pack() + body, header, op, (command,), keys)


class ResponseReader:
    """Frames the server's binary stream into responses."""

    def __init__(self, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self._buffer = Buffer("server", max_buffer)
        self._header: Header | None = None

    def feed(self, data: bytes) -> None:
        self._buffer.feed(data)

    def check_limit(self) -> None:
        self._buffer.check_limit()

    def next(self) -> BinaryResponse | None:
        if self._header is None:
            raw = self._buffer.take(HEADER_SIZE)
            if raw is None:
                return None
            header = Header.parse(raw)
            if header.magic != RESPONSE_MAGIC:
                raise ProtocolError("server", f"magic 0x{header.magic:02x} where a response (0x81) should start")
            _check_lengths("server", header, self._buffer.max_buffer)
            self._header = header
        header = self._header
        body = self._buffer.take(header.body_length)
        if body is None:
            return None
        self._header = None
        return BinaryResponse(header.pack() + body, header)


def _response(request: Header, status: int, body: bytes) -> bytes:
    return Header(RESPONSE_MAGIC, request.opcode, 0, 0, 0, status, len(body), request.opaque, 0).pack() + body


def denial(request: Header) -> bytes:
    """Cilium's answer to a denied request: its opcode and opaque, status 0x0008, ``access denied``."""
    return _response(request, STATUS_AUTH_ERROR, b"access denied")


_NOOP = Header(REQUEST_MAGIC, 0x0A, 0, 0, 0, 0, 0, _BARRIER_OPAQUE, 0)


@dataclass(frozen=True, slots=True)
class _Awaited:
    """A forwarded request whose response has not come yet."""

    opcode: int
    opaque: int
    quiet: bool
    own: bool = False  # the parser's Noop: its response is not passed on


class MemcacheBinaryConnection(FramedConnection):
    """The binary protocol both ways: requests checked and forwarded or denied, responses passed
    on unchanged with each denial put in its place."""

    protocol = "memcache"

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        super().__init__(check, max_buffer)
        self._requests = RequestReader(max_buffer)
        self._responses = ResponseReader(max_buffer)
        self._awaited: deque[_Awaited] = deque()
        self._queue = ReplyQueue()

    def _from_client(self, data: bytes) -> Output:
        self._requests.feed(data)
        to_server: list[bytes] = []
        to_client: list[bytes] = []
        records: list[Record] = []
        while (request := self._requests.next()) is not None:
            record = decided(self.check, request.commands, request.keys)
            records.append(record)
            if record.decision.allowed and request.opcode.served:
                to_server.append(request.frame)
                self._await(request)
                continue
            if record.decision.allowed:
                reply = _response(request.header, STATUS_UNKNOWN_COMMAND, b"Unknown command")
            else:
                reply = denial(request.header)
            to_server.append(self._barrier())
            to_client.append(self._queue.denied(reply))
        self._requests.check_limit()
        return Output(b"".join(to_server), b"".join(to_client), tuple(records))

    def _await(self, request: BinaryRequest) -> None:
        answer = request.opcode.answer
        if answer is Answer.NEVER:
            return
        header = request.header
        self._awaited.append(_Awaited(header.opcode, header.opaque, answer is Answer.MAYBE))
        if answer is Answer.ALWAYS:
            self._queue.forwarded()

    def _barrier(self) -> bytes:
        """A Noop of our own ahead of a reply made here, if the last forwarded request is quiet
        (a response to any later one would say that it is done)."""
        if not self._awaited or not self._awaited[-1].quiet:
            return b""
        self._awaited.append(_Awaited(_NOOP.opcode, _NOOP.opaque, False, own=True))
        self._queue.forwarded()
        return _NOOP.pack()

    def _from_server(self, data: bytes) -> Output:
        self._responses.feed(data)
        out: list[bytes] = []
        while (response := self._responses.next()) is not None:
            out.append(self._settle(response))
        self._responses.check_limit()
        return Output(to_client=b"".join(out))

    def _settle(self, response: BinaryResponse) -> bytes:
        """Credit a response to its request; returns what the client gets now."""
        header = response.header
        awaited = self._awaited
        # Quiet requests come first; the first one that is not quiet is the only one a non-quiet
        # response can answer.
        first = next((i for i, a in enumerate(awaited) if not a.quiet), len(awaited))
        if header.opcode in _QUIET:
            at = next((i for i in range(first) if (awaited[i].opcode, awaited[i].opaque)
                       == (header.opcode, header.opaque)), None)
            if at is None:
                raise ProtocolError("server", f"a 0x{header.opcode:02x} response to no such quiet request")
            for _ in range(at + 1):
                awaited.popleft()
            return response.frame
        if first == len(awaited):
            raise ProtocolError("server", f"a 0x{header.opcode:02x} response to no outstanding request")
        expected = awaited[first]
        if (expected.opcode, expected.opaque) != (header.opcode, header.opaque):
            raise ProtocolError("server", f"a 0x{header.opcode:02x} response (opaque {header.opaque}) where "
                                          f"0x{expected.opcode:02x} (opaque {expected.opaque}) was due")
        for _ in range(first):
            awaited.popleft()  # quiet requests the server passed over: no reply for them
        if header.opcode == 0x10 and header.status == 0 and header.key_length:
            return response.frame  # one stat of many; an empty key ends them
        awaited.popleft()
        due = self._queue.replied()
        return (b"" if expected.own else response.frame) + due

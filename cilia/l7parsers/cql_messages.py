"""The CQL message bodies the Cassandra parser reads, v1 to v4.

Requests are read whole: a request is forwarded only once every byte of its body has been
accounted for, so a body that is truncated, has bytes left over or uses a flag this version does
not define is a FrameError, never a guess. (The one exception is what follows a v1 QUERY's
consistency, which a v1 server never reads.) Responses are read only as far as policy needs: the
RESULT kinds Set_keyspace (the session keyspace) and Prepared (the id an EXECUTE names).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .cql_frame import (
    FLAG_CUSTOM_PAYLOAD,
    FLAG_TRACING,
    FLAG_WARNING,
    FrameError,
    Header,
    Opcode,
    Reader,
)


@dataclass(frozen=True, slots=True)
class Query:
    text: str


@dataclass(frozen=True, slots=True)
class Prepare:
    text: str


@dataclass(frozen=True, slots=True)
class Execute:
    prepared_id: bytes


@dataclass(frozen=True, slots=True)
class Batch:
    statements: tuple[str | bytes, ...]  # a query string, or the id of a prepared statement


@dataclass(frozen=True, slots=True)
class Startup:
    options: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Control:
    """OPTIONS, REGISTER, CREDENTIALS or AUTH_RESPONSE: passed without policy."""

    opcode: Opcode


Request = Query | Prepare | Execute | Batch | Startup | Control

# Query parameter flags (v2+): values, skip_metadata, page_size, paging_state, serial_consistency,
# then from v3 default_timestamp and names_for_values.
_VALUES, _PAGE_SIZE, _PAGING_STATE, _SERIAL, _TIMESTAMP, _NAMES = 0x01, 0x04, 0x08, 0x10, 0x20, 0x40
_QUERY_FLAGS = {2: 0x1F, 3: 0x7F, 4: 0x7F}
_BATCH_FLAGS = 0x70  # serial_consistency, default_timestamp, names (which Cassandra ignores: CASSANDRA-10246)

RESULT_SET_KEYSPACE = 3
RESULT_PREPARED = 4


def read_request(header: Header, body: bytes) -> Request:
    """Decode a whole request body (``header`` was already checked for version and opcode)."""
    r = Reader(body)
    if header.flags & FLAG_CUSTOM_PAYLOAD:
        r.bytes_map()
    version = header.version
    opcode = Opcode(header.opcode)
    request: Request
    if opcode is Opcode.QUERY:
        request = Query(r.long_string())
        if version == 1:
            r.short()  # consistency
            # A v1 server reads no further; cassandra-driver writes a v2 flags byte here anyway.
            r.skip_rest()
        else:
            _query_parameters(r, version)
    elif opcode is Opcode.PREPARE:
        request = Prepare(r.long_string())
    elif opcode is Opcode.EXECUTE:
        request = Execute(r.short_bytes())
        if version == 1:
            for _ in range(r.short()):
                r.value(version)
            r.short()  # consistency
        else:
            _query_parameters(r, version)
    elif opcode is Opcode.BATCH:
        request = _batch(r, version)
    elif opcode is Opcode.STARTUP:
        request = Startup(r.string_map())
    elif opcode is Opcode.CREDENTIALS:
        r.string_map()
        request = Control(opcode)
    elif opcode is Opcode.REGISTER:
        r.string_list()
        request = Control(opcode)
    elif opcode is Opcode.AUTH_RESPONSE:
        r.bytes_()
        request = Control(opcode)
    elif opcode is Opcode.OPTIONS:
        request = Control(opcode)
    else:  # the connection admits only request opcodes
        raise FrameError(f"{opcode.name} is not a request")
    r.end(f"{opcode.name} body")
    return request


def _query_parameters(r: Reader, version: int) -> None:
    r.short()  # consistency
    flags = r.byte()
    if flags & ~_QUERY_FLAGS[version]:
        raise FrameError(f"query flags 0x{flags:02X} not defined in protocol v{version}")
    if flags & _VALUES:
        for _ in range(r.short()):
            if flags & _NAMES:
                r.string()
            r.value(version)
    if flags & _PAGE_SIZE:
        r.int32()
    if flags & _PAGING_STATE:
        r.bytes_()
    if flags & _SERIAL:
        r.short()
    if flags & _TIMESTAMP:
        r.long()


def _batch(r: Reader, version: int) -> Batch:
    kind = r.byte()
    if kind > 2:
        raise FrameError(f"batch type {kind} (0 logged, 1 unlogged, 2 counter)")
    statements: list[str | bytes] = []
    for _ in range(r.short()):
        entry = r.byte()
        if entry == 0:
            statements.append(r.long_string())
        elif entry == 1:
            statements.append(r.short_bytes())
        else:
            raise FrameError(f"batch statement kind {entry} (0 query, 1 prepared id)")
        for _ in range(r.short()):
            r.value(version)
    r.short()  # consistency
    if version >= 3:
        flags = r.byte()
        if flags & ~_BATCH_FLAGS:
            raise FrameError(f"batch flags 0x{flags:02X} not defined in protocol v{version}")
        if flags & _SERIAL:
            r.short()
        if flags & _TIMESTAMP:
            r.long()
    return Batch(tuple(statements))


def result_kind(body: bytes | bytearray | memoryview, flags: int) -> tuple[int, int] | None:
    """A RESULT body's kind and the offset after it, or None while ``body`` (a prefix of the
    body) is too short to tell. The kind follows the tracing id, warnings and custom payload
    the flags announce, in that order (as the server writes and the driver reads them)."""
    r = Reader(memoryview(body))
    try:
        if flags & FLAG_TRACING:
            r.raw(16)
        if flags & FLAG_WARNING:
            r.string_list()
        if flags & FLAG_CUSTOM_PAYLOAD:
            r.bytes_map()
        return r.int32(), r.pos
    except FrameError:
        return None


def read_set_keyspace(body: bytes, offset: int) -> str:
    return Reader(body, offset).string()


def read_prepared_id(body: bytes, offset: int) -> bytes:
    return Reader(body, offset).short_bytes()

"""Kafka's wire encoding of a compiled ``Layout``: big-endian primitives, int16/int32-length
strings, bytes and arrays in the classic encoding; unsigned-varint lengths (n+1, 0 = null) and
tagged fields at the end of every struct in the flexible one. Request header v1/v2, response
header v0/v1 and the int32 size prefix.

Decoding is strict: a truncated field, a negative or oversized length, a varint longer than five
bytes, invalid UTF-8 or bytes left over raise ``CodecError``. Tagged fields the schema does not
know are kept raw (``UNKNOWN_TAGS``) so that a re-encoded message keeps them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .kafka_schema import UNKNOWN_TAGS, Field, Layout, Struct, Value, default_of

_I8, _I16, _U16, _I32, _I64, _F64 = (struct.Struct(f) for f in (">b", ">h", ">H", ">i", ">q", ">d"))
_FIXED = {"bool": 1, "int8": 1, "int16": 2, "uint16": 2, "int32": 4, "int64": 8, "float64": 8, "uuid": 16}
_INTS = {"int8": _I8, "int16": _I16, "uint16": _U16, "int32": _I32, "int64": _I64}


class CodecError(Exception):
    """Bytes that do not decode as the layout says, or a value that does not encode."""


class Reader:
    """A cursor over one frame's bytes."""

    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if n < 0 or n > self.end - self.pos:
            raise CodecError(f"truncated: {n} bytes wanted at offset {self.pos}, {self.end - self.pos} left")
        start = self.pos
        self.pos += n
        return self.data[start:self.pos]

    def unpack(self, s: struct.Struct) -> int:
        if s.size > self.end - self.pos:
            raise CodecError(f"truncated: {s.size} bytes wanted at offset {self.pos}, {self.end - self.pos} left")
        (value,) = s.unpack_from(self.data, self.pos)
        self.pos += s.size
        return int(value)

    def uvarint(self) -> int:
        result = 0
        for i in range(5):
            if self.pos >= self.end:
                raise CodecError("truncated varint")
            b = self.data[self.pos]
            self.pos += 1
            result |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if result > 0xFFFFFFFF:
                    raise CodecError("varint out of range")
                return result
        raise CodecError("varint longer than 5 bytes")

    def length(self, flexible: bool, wide: bool) -> int | None:
        """A string/bytes/array length: None for null. ``wide``: int32 (bytes, arrays) rather
        than int16 (strings) in the classic encoding."""
        if flexible:
            n = self.uvarint() - 1
        else:
            n = self.unpack(_I32 if wide else _I16)
        if n < -1:
            raise CodecError(f"negative length {n}")
        if n == -1:
            return None
        if n > self.left:
            raise CodecError(f"length {n} exceeds the {self.left} bytes left")
        return n


class Writer:
    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def pack(self, s: struct.Struct, value: Value) -> None:
        try:
            self.buf += s.pack(value)
        except (struct.error, TypeError) as e:
            raise CodecError(f"cannot encode {value!r}: {e}") from None

    def uvarint(self, n: int) -> None:
        if not 0 <= n <= 0xFFFFFFFF:
            raise CodecError(f"varint out of range: {n}")
        while n >= 0x80:
            self.buf.append((n & 0x7F) | 0x80)
            n >>= 7
        self.buf.append(n)

    def length(self, n: int | None, flexible: bool, wide: bool) -> None:
        if flexible:
            self.uvarint(0 if n is None else n + 1)
        else:
            self.pack(_I32 if wide else _I16, -1 if n is None else n)


# --- decoding -----------------------------------------------------------------


def _scalar(f: Field, r: Reader, flexible: bool) -> Value:
    t = f.type
    s = _INTS.get(t)
    if s is not None:
        return r.unpack(s)
    if t == "bool":
        return r.take(1) != b"\x00"
    if t == "uuid":
        return r.take(16)
    if t == "float64":
        return float(_F64.unpack(r.take(8))[0])
    n = r.length(flexible, wide=t != "string")
    if n is None:
        if not f.nullable:
            raise CodecError(f"{f.name}: null in a non-nullable field")
        return None
    raw = r.take(n)
    if t == "string":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{f.name}: invalid UTF-8") from None
    return raw


def _element(f: Field, r: Reader, flexible: bool) -> Value:
    return decode_struct(f.fields, r, flexible) if f.struct else _scalar(f, r, flexible)


def decode_field(f: Field, r: Reader, flexible: bool) -> Value:
    if f.array:
        n = r.length(flexible, wide=True)
        if n is None:
            if not f.nullable:
                raise CodecError(f"{f.name}: null array in a non-nullable field")
            return None
        # Every element takes at least one byte, so the length check above bounds the loop.
        return [_element(f, r, flexible) for _ in range(n)]
    if f.struct:
        if f.nullable:
            if r.unpack(_I8) < 0:
                return None
        return decode_struct(f.fields, r, flexible)
    return _scalar(f, r, flexible)


def decode_struct(fields: tuple[Field, ...], r: Reader, flexible: bool) -> Struct:
    out: Struct = {}
    tagged: dict[int, Field] = {}
    for f in fields:
        if f.tag is not None:
            tagged[f.tag] = f
            out[f.name] = default_of(f)
        else:
            out[f.name] = decode_field(f, r, flexible)
    if flexible:
        unknown = read_tags(r, tagged, out)
        if unknown:
            out[UNKNOWN_TAGS] = unknown
    return out


def read_tags(r: Reader, known: dict[int, Field], out: Struct) -> dict[str, Value]:
    """A tagged-field section: known tags decode into ``out``; the rest come back raw."""
    unknown: dict[str, Value] = {}
    for _ in range(r.uvarint()):
        tag = r.uvarint()
        size = r.uvarint()
        if size > r.left:
            raise CodecError(f"tagged field {tag}: size {size} exceeds the {r.left} bytes left")
        end = r.pos + size
        f = known.get(tag)
        if f is None:
            unknown[str(tag)] = r.take(size)
            continue
        sub = Reader(r.data, r.pos, end)
        out[f.name] = decode_field(f, sub, True)
        if sub.pos != end:
            raise CodecError(f"tagged field {f.name}: {end - sub.pos} bytes left over")
        r.pos = end
    return unknown


def decode_body(layout: Layout, data: bytes, pos: int) -> Struct:
    """The message body from ``pos`` to the end of ``data``, all of it."""
    r = Reader(data, pos)
    body = decode_struct(layout.fields, r, layout.flexible)
    if r.left:
        raise CodecError(f"{layout.name} v{layout.version}: {r.left} bytes left over")
    return body


# --- encoding -----------------------------------------------------------------


def _put_scalar(f: Field, value: Value, w: Writer, flexible: bool) -> None:
    t = f.type
    s = _INTS.get(t)
    if s is not None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CodecError(f"{f.name}: expected an integer, got {value!r}")
        w.pack(s, value)
        return
    if t == "bool":
        w.buf.append(1 if value else 0)
        return
    if t == "float64":
        w.pack(_F64, value)
        return
    if t == "uuid":
        if not isinstance(value, bytes) or len(value) != 16:
            raise CodecError(f"{f.name}: expected 16 bytes, got {value!r}")
        w.buf += value
        return
    if value is None:
        if not f.nullable:
            raise CodecError(f"{f.name}: null in a non-nullable field")
        w.length(None, flexible, wide=t != "string")
        return
    if t == "string":
        if not isinstance(value, str):
            raise CodecError(f"{f.name}: expected a string, got {value!r}")
        raw = value.encode("utf-8")
        if not flexible and len(raw) > 0x7FFF:
            raise CodecError(f"{f.name}: string too long")
    elif isinstance(value, bytes):
        raw = value
    else:
        raise CodecError(f"{f.name}: expected bytes, got {value!r}")
    w.length(len(raw), flexible, wide=t != "string")
    w.buf += raw


def encode_field(f: Field, value: Value, w: Writer, flexible: bool) -> None:
    if f.array:
        if value is None:
            if not f.nullable:
                raise CodecError(f"{f.name}: null array in a non-nullable field")
            w.length(None, flexible, wide=True)
            return
        if not isinstance(value, list):
            raise CodecError(f"{f.name}: expected a list, got {value!r}")
        w.length(len(value), flexible, wide=True)
        for item in value:
            if f.struct:
                encode_struct(f.fields, _as_struct(f, item), w, flexible)
            else:
                _put_scalar(f, item, w, flexible)
        return
    if f.struct:
        if f.nullable:
            if value is None:
                w.pack(_I8, -1)
                return
            w.pack(_I8, 1)
        encode_struct(f.fields, _as_struct(f, value), w, flexible)
        return
    _put_scalar(f, value, w, flexible)


def _as_struct(f: Field, value: Value) -> Struct:
    if not isinstance(value, dict):
        raise CodecError(f"{f.name}: expected a struct, got {value!r}")
    return value


def encode_struct(fields: tuple[Field, ...], value: Struct, w: Writer, flexible: bool) -> None:
    """Missing members take their defaults; tagged ones equal to their default are left out."""
    tags: list[tuple[int, bytes]] = []
    for f in fields:
        v = value[f.name] if f.name in value else default_of(f)
        if f.tag is None:
            encode_field(f, v, w, flexible)
        elif v != f.default:
            sub = Writer()
            encode_field(f, v, sub, True)
            tags.append((f.tag, bytes(sub.buf)))
    if not flexible:
        return
    unknown = value.get(UNKNOWN_TAGS)
    if isinstance(unknown, dict):
        tags += [(int(k), raw) for k, raw in unknown.items() if isinstance(raw, bytes)]
    tags.sort()
    w.uvarint(len(tags))
    for tag, raw in tags:
        w.uvarint(tag)
        w.uvarint(len(raw))
        w.buf += raw


def encode_body(layout: Layout, value: Struct) -> bytes:
    w = Writer()
    encode_struct(layout.fields, value, w, layout.flexible)
    return bytes(w.buf)


# --- headers and frames ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestHeader:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    body: int  # offset of the body in the frame's payload


def decode_request_header(payload: bytes, flexible: bool) -> RequestHeader:
    """Header v1 (``flexible`` False) or v2: client_id stays an int16-length nullable string in
    both; v2 adds a tagged-field section."""
    r = Reader(payload)
    api_key = r.unpack(_I16)
    api_version = r.unpack(_I16)
    correlation_id = r.unpack(_I32)
    n = r.length(False, wide=False)
    client_id: str | None = None
    if n is not None:
        try:
            client_id = r.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError("client_id: invalid UTF-8") from None
    if flexible:
        read_tags(r, {}, {})
    return RequestHeader(api_key, api_version, correlation_id, client_id, r.pos)


def peek_request_key(payload: bytes) -> tuple[int, int]:
    """(api_key, api_version): the first four bytes of every request header."""
    r = Reader(payload)
    return r.unpack(_I16), r.unpack(_I16)


def encode_request_header(api_key: int, api_version: int, correlation_id: int, client_id: str | None,
                          flexible: bool) -> bytes:
    w = Writer()
    w.pack(_I16, api_key)
    w.pack(_I16, api_version)
    w.pack(_I32, correlation_id)
    if client_id is None:
        w.pack(_I16, -1)
    else:
        raw = client_id.encode("utf-8")
        w.pack(_I16, len(raw))
        w.buf += raw
    if flexible:
        w.uvarint(0)
    return bytes(w.buf)


def response_header_size(payload: bytes, tagged: bool) -> int:
    """Length of a response header (v0: the correlation id; v1 adds tagged fields)."""
    r = Reader(payload)
    r.unpack(_I32)
    if tagged:
        read_tags(r, {}, {})
    return r.pos


def encode_response_header(correlation_id: int, tagged: bool) -> bytes:
    return _I32.pack(correlation_id) + (b"\x00" if tagged else b"")


def correlation_id_of(payload: bytes) -> int:
    return Reader(payload).unpack(_I32)


def frame(payload: bytes) -> bytes:
    return _I32.pack(len(payload)) + payload


def frame_size(data: bytes | bytearray) -> int:
    """The int32 size prefix at the start of ``data`` (which holds at least four bytes)."""
    return int(_I32.unpack_from(data, 0)[0])

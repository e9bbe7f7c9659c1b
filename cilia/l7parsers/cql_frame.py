"""CQL native protocol framing, v1 to v4: frame headers, the primitive types bodies are made of,
and the frames the proxy writes itself (errors on a request's stream).

v1 and v2 frames have an 8-byte header with a one-byte stream id; v3 and v4 a 9-byte header with
a two-byte stream id. v5 and DSE's private versions 0x41/0x42 open with a v4-style header (v5
adds checksummed segments only after STARTUP), which is enough to answer them with an error.
All integers are big-endian. Bad bytes raise ``FrameError``; the connection says whose they were.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum


class FrameError(Exception):
    """Bytes that are not a valid CQL frame or body."""


class Opcode(IntEnum):
    ERROR = 0x00
    STARTUP = 0x01
    READY = 0x02
    AUTHENTICATE = 0x03
    CREDENTIALS = 0x04  # v1 only
    OPTIONS = 0x05
    SUPPORTED = 0x06
    QUERY = 0x07
    RESULT = 0x08
    PREPARE = 0x09
    EXECUTE = 0x0A
    REGISTER = 0x0B
    EVENT = 0x0C
    BATCH = 0x0D
    AUTH_CHALLENGE = 0x0E
    AUTH_RESPONSE = 0x0F
    AUTH_SUCCESS = 0x10


_V1_REQUESTS = frozenset({Opcode.STARTUP, Opcode.CREDENTIALS, Opcode.OPTIONS, Opcode.QUERY, Opcode.PREPARE,
                          Opcode.EXECUTE, Opcode.REGISTER})
_V2_REQUESTS = frozenset({Opcode.STARTUP, Opcode.OPTIONS, Opcode.QUERY, Opcode.PREPARE, Opcode.EXECUTE,
                          Opcode.REGISTER, Opcode.BATCH, Opcode.AUTH_RESPONSE})
_V1_RESPONSES = frozenset({Opcode.ERROR, Opcode.READY, Opcode.AUTHENTICATE, Opcode.SUPPORTED, Opcode.RESULT,
                           Opcode.EVENT})
_V2_RESPONSES = _V1_RESPONSES | {Opcode.AUTH_CHALLENGE, Opcode.AUTH_SUCCESS}

SUPPORTED_VERSIONS = (1, 2, 3, 4)
#: Versions a client may offer first and must be told to lower: v5, v6 (beta) and DSE v1/v2.
REFUSED_VERSIONS = frozenset({5, 6, 0x41, 0x42})
#: The version our own answer to a refused version is written in: the highest one we speak.
REFUSAL_VERSION = 4

RESPONSE_BIT = 0x80
MAX_BODY = 256 << 20  # the protocol's limit on a frame body

FLAG_COMPRESSION = 0x01
FLAG_TRACING = 0x02
FLAG_CUSTOM_PAYLOAD = 0x04  # v4
FLAG_WARNING = 0x08  # v4
FLAG_USE_BETA = 0x10  # v4 (means something only for beta versions)

#: Flags a client may set, per version; any other bit is refused (how the server would read the body is unknown).
REQUEST_FLAGS = {1: 0x03, 2: 0x03, 3: 0x03, 4: 0x1F}

ERROR_PROTOCOL = 0x000A
ERROR_UNAUTHORIZED = 0x2100
ERROR_UNPREPARED = 0x2500


def request_opcodes(version: int) -> frozenset[Opcode]:
    return _V1_REQUESTS if version == 1 else _V2_REQUESTS


def response_opcodes(version: int) -> frozenset[Opcode]:
    return _V1_RESPONSES if version == 1 else _V2_RESPONSES


def opcode_name(opcode: int) -> str:
    try:
        return Opcode(opcode).name
    except ValueError:
        return f"0x{opcode:02X}"


def header_size(first_byte: int) -> int:
    """Header length given a frame's first (version) byte."""
    return 8 if (first_byte & 0x7F) in (1, 2) else 9


@dataclass(frozen=True, slots=True)
class Header:
    version: int  # without the direction bit
    response: bool
    flags: int
    stream: int
    opcode: int
    length: int  # body bytes
    size: int  # header bytes

    @property
    def total(self) -> int:
        return self.size + self.length


def parse_header(buf: bytes | bytearray | memoryview) -> Header:
    """The header at the start of ``buf``, which holds at least ``header_size(buf[0])`` bytes."""
    first = buf[0]
    size = header_size(first)
    if size == 8:
        flags, stream, opcode, length = struct.unpack_from(">BbBi", buf, 1)
    else:
        flags, stream, opcode, length = struct.unpack_from(">BhBi", buf, 1)
    if length < 0 or length > MAX_BODY:
        raise FrameError(f"frame body length {length} is outside 0..{MAX_BODY}")
    return Header(first & 0x7F, bool(first & RESPONSE_BIT), flags, stream, opcode, length, size)


class Reader:
    """Reads the protocol's primitive types from a body; running past its end is a FrameError."""

    __slots__ = ("_data", "pos")

    def __init__(self, data: bytes | memoryview, pos: int = 0) -> None:
        self._data = data
        self.pos = pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self.pos

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self._data):
            raise FrameError(f"body truncated: {n} bytes wanted at offset {self.pos}, {self.remaining} left")
        out = bytes(self._data[self.pos:self.pos + n])
        self.pos += n
        return out

    def byte(self) -> int:
        return self.raw(1)[0]

    def short(self) -> int:
        return int.from_bytes(self.raw(2), "big")

    def int32(self) -> int:
        return int.from_bytes(self.raw(4), "big", signed=True)

    def long(self) -> int:
        return int.from_bytes(self.raw(8), "big", signed=True)

    def _text(self, n: int) -> str:
        try:
            return self.raw(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise FrameError(f"string is not UTF-8: {e}") from None

    def string(self) -> str:
        return self._text(self.short())

    def long_string(self) -> str:
        n = self.int32()
        if n < 0:
            raise FrameError(f"negative [long string] length {n}")
        return self._text(n)

    def short_bytes(self) -> bytes:
        return self.raw(self.short())

    def bytes_(self) -> bytes | None:
        """[bytes]: a negative length is null."""
        n = self.int32()
        return None if n < 0 else self.raw(n)

    def value(self, version: int) -> None:
        """Skip a bound [value]: in v4, -1 is null and -2 unset; earlier, any negative is null."""
        n = self.int32()
        if n >= 0:
            self.raw(n)
        elif version >= 4 and n < -2:
            raise FrameError(f"invalid value length {n}")

    def string_list(self) -> list[str]:
        return [self.string() for _ in range(self.short())]

    def string_map(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for _ in range(self.short()):
            key = self.string()
            out[key] = self.string()
        return out

    def bytes_map(self) -> None:
        for _ in range(self.short()):
            self.string()
            self.bytes_()

    def skip_rest(self) -> None:
        self.pos = len(self._data)

    def end(self, what: str) -> None:
        if self.remaining:
            raise FrameError(f"{self.remaining} unread bytes after the {what}")


def encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def encode_short_bytes(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def encode_frame(version: int, stream: int, opcode: int, body: bytes, *, response: bool = True,
                 flags: int = 0) -> bytes:
    first = (RESPONSE_BIT if response else 0) | version
    if header_size(version) == 8:
        head = struct.pack(">BBbBi", first, flags, stream, opcode, len(body))
    else:
        head = struct.pack(">BBhBi", first, flags, stream, opcode, len(body))
    return head + body


def error_frame(version: int, stream: int, code: int, message: str, extra: bytes = b"") -> bytes:
    """An ERROR response on ``stream``: ``<code int32><message [string]>`` and the code's fields."""
    body = code.to_bytes(4, "big") + encode_string(message) + extra
    return encode_frame(version, stream, Opcode.ERROR, body)

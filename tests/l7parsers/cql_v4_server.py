"""A CQL native protocol v4 TEST SERVER (asyncio, stdlib only) for the Cassandra parser tests.

It exists because no real v4 server can run here: the only real Cassandra available is 1.2.0,
which speaks v1 only. It is not Cassandra. It answers what
cassandra-driver 3.30.1 asks while connecting (OPTIONS, STARTUP, REGISTER, system.local,
system.peers_v2 refused so the driver reads system.peers, system_schema.* empty) and keeps an
in-memory store of text columns for INSERT and SELECT [WHERE col = value], with USE, PREPARE,
EXECUTE and BATCH. Every statement it executes is logged in ``executed``, so a test can show a
denied statement never arrived.

It speaks v4 only and does not negotiate: a frame of any other version closes the connection
unanswered (and is logged in ``other_versions``). A driver, which opens with DSE v2, DSE v1 and
v5, therefore connects to it only through something that refuses those for it: the parser.
Its encoding is written here, independently of the parser's code.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import struct
import threading
import uuid
from dataclasses import dataclass, field

VERSION = 4
RESPONSE = 0x84
ERROR, STARTUP, READY, OPTIONS, SUPPORTED, QUERY, RESULT, PREPARE, EXECUTE, REGISTER, BATCH = (
    0x00, 0x01, 0x02, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0D)
VARCHAR, UUID_TYPE, INET, SET = 0x000D, 0x000C, 0x0010, 0x0022
VOID, ROWS, SET_KEYSPACE, PREPARED = 1, 2, 3, 4
INVALID, UNPREPARED, PROTOCOL = 0x2200, 0x2500, 0x000A

_NAME = r'(?:"(?:[^"]|"")+"|\w+)'
_TABLE = rf"({_NAME}(?:\s*\.\s*{_NAME})?)"
_USE = re.compile(rf"^\s*use\s+({_NAME})\s*;?\s*$", re.I)
_SELECT = re.compile(rf"^\s*select\s+.*?\sfrom\s+{_TABLE}(?:\s+where\s+(\w+)\s*=\s*(\?|'[^']*'))?", re.I | re.S)
_INSERT = re.compile(rf"^\s*insert\s+into\s+{_TABLE}\s*\(([^)]*)\)\s*values\s*\(([^)]*)\)", re.I | re.S)
_CREATE_TABLE = re.compile(rf"^\s*create\s+table\s+(?:if\s+not\s+exists\s+)?{_TABLE}\s*\((.*)\)", re.I | re.S)


_Type = int | tuple[int, int]  # a type option: simple, or a collection of one simple type
_PEERS_COLUMNS: list[tuple[str, _Type]] = [
    ("peer", INET), ("data_center", VARCHAR), ("host_id", UUID_TYPE), ("rack", VARCHAR), ("release_version", VARCHAR),
    ("rpc_address", INET), ("schema_version", UUID_TYPE), ("tokens", (SET, VARCHAR))]


class CQLError(Exception):
    def __init__(self, code: int, message: str, extra: bytes = b"") -> None:
        super().__init__(message)
        self.code, self.message, self.extra = code, message, extra


def _short(n: int) -> bytes:
    return struct.pack(">H", n)


def _int(n: int) -> bytes:
    return struct.pack(">i", n)


def _string(s: str) -> bytes:
    data = s.encode()
    return _short(len(data)) + data


def _value(v: bytes | None) -> bytes:
    return _int(-1) if v is None else _int(len(v)) + v


def _unquote(name: str) -> str:
    return name[1:-1].replace('""', '"') if name.startswith('"') else name.lower()


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CQLError(PROTOCOL, "truncated body")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def short(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def int(self) -> int:
        return int(struct.unpack(">i", self.take(4))[0])

    def string(self) -> str:
        return self.take(self.short()).decode()

    def long_string(self) -> str:
        return self.take(self.int()).decode()

    def value(self) -> bytes | None:
        n = self.int()
        return None if n < 0 else self.take(n)

    def values(self) -> list[bytes | None]:
        return [self.value() for _ in range(self.short())]

    def params(self) -> list[bytes | None]:
        self.short()  # consistency
        flags = self.take(1)[0]
        values: list[bytes | None] = []
        if flags & 0x01:
            for _ in range(self.short()):
                if flags & 0x40:
                    self.string()
                values.append(self.value())
        return values  # page size, paging state, serial consistency, timestamp: ignored


@dataclass
class _Table:
    columns: list[str] = field(default_factory=list)
    rows: list[dict[str, bytes | None]] = field(default_factory=list)


@dataclass
class _Session:
    keyspace: str | None = None


class CQLv4TestServer:
    """``start()`` listens on 127.0.0.1 (``port``) in a thread of its own; ``stop()`` ends it."""

    def __init__(self) -> None:
        self.port = 0
        self.executed: list[tuple[str, str]] = []  # (opcode name, statement) in arrival order
        self.other_versions: list[int] = []
        self.tables: dict[str, _Table] = {}
        self.prepared: dict[bytes, str] = {}
        self.host_id = uuid.uuid4()
        self.schema_version = uuid.uuid4()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> CQLv4TestServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop)
        self._server = future.result(5)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()
            for w in list(self._writers):
                w.close()
            await self._server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def statements(self) -> list[str]:
        return [text for _, text in self.executed]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        session = _Session()
        try:
            while True:
                head = await reader.readexactly(9)
                if head[0] != VERSION:
                    self.other_versions.append(head[0])
                    return
                flags, stream, opcode, length = struct.unpack(">BhBi", head[1:])
                body = await reader.readexactly(length)
                try:
                    if flags & 0x01:
                        raise CQLError(PROTOCOL, "compression was not negotiated")
                    reply_op, reply = self._handle(session, opcode, _Body(body))
                except CQLError as e:
                    reply_op, reply = ERROR, _int(e.code) + _string(e.message) + e.extra
                writer.write(struct.pack(">BBhBi", RESPONSE, 0, stream, reply_op, len(reply)) + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def _handle(self, session: _Session, opcode: int, body: _Body) -> tuple[int, bytes]:
        if opcode == OPTIONS:
            supported = {"CQL_VERSION": ["3.4.5"], "COMPRESSION": [], "PROTOCOL_VERSIONS": ["4/v4"]}
            out = _short(len(supported))
            for key, values in supported.items():
                out += _string(key) + _short(len(values)) + b"".join(_string(v) for v in values)
            return SUPPORTED, out
        if opcode == STARTUP:
            options = {}
            for _ in range(body.short()):
                key = body.string()
                options[key] = body.string()
            if "COMPRESSION" in options:
                raise CQLError(PROTOCOL, "compression is not supported")
            return READY, b""
        if opcode == REGISTER:
            return READY, b""
        if opcode == QUERY:
            text = body.long_string()
            return RESULT, self._run(session, "QUERY", text, body.params())
        if opcode == PREPARE:
            text = body.long_string()
            query_id = hashlib.md5(text.encode()).digest()
            self.prepared[query_id] = text
            self.executed.append(("PREPARE", text))
            return RESULT, self._prepared_result(session, query_id, text)
        if opcode == EXECUTE:
            text = self._lookup(body.take(body.short()))
            return RESULT, self._run(session, "EXECUTE", text, body.params())
        if opcode == BATCH:
            body.take(1)  # type
            items: list[tuple[str, list[bytes | None]]] = []
            for _ in range(body.short()):
                kind = body.take(1)[0]
                text = body.long_string() if kind == 0 else self._lookup(body.take(body.short()))
                items.append((text, body.values()))
            for text, bound in items:
                self._run(session, "BATCH", text, bound)
            return RESULT, _int(VOID)
        raise CQLError(PROTOCOL, f"unexpected opcode 0x{opcode:02X}")

    def _lookup(self, query_id: bytes) -> str:
        if query_id not in self.prepared:
            raise CQLError(UNPREPARED, "unknown prepared id", _short(len(query_id)) + query_id)
        return self.prepared[query_id]

    def _table_name(self, session: _Session, name: str) -> str:
        parts = [_unquote(p.strip()) for p in re.findall(_NAME, name)]
        if len(parts) == 1:
            if session.keyspace is None:
                raise CQLError(INVALID, "No keyspace has been specified")
            parts.insert(0, session.keyspace)
        return ".".join(parts)

    def _run(self, session: _Session, opcode: str, text: str, values: list[bytes | None]) -> bytes:
        self.executed.append((opcode, text))
        bound = iter(values)
        if m := _USE.match(text):
            session.keyspace = _unquote(m.group(1))
            return _int(SET_KEYSPACE) + _string(session.keyspace)
        if m := _SELECT.match(text):
            name = self._table_name(session, m.group(1))
            if name == "system.local":
                return self._local()
            if name == "system.peers_v2":
                raise CQLError(INVALID, "unconfigured table peers_v2")
            ks, _, cf = name.partition(".")
            if name == "system.peers":
                return self._rows(ks, cf, _PEERS_COLUMNS, [])
            if ks in ("system", "system_schema"):  # no schema here: every other system table is empty
                return self._rows(ks, cf, [("keyspace_name", VARCHAR)], [])
            table = self.tables.get(name)
            if table is None:
                raise CQLError(INVALID, f"unconfigured table {name}")
            rows = table.rows
            if m.group(2):
                want = next(bound) if m.group(3) == "?" else m.group(3)[1:-1].encode()
                rows = [r for r in rows if r.get(m.group(2).lower()) == want]
            columns: list[tuple[str, _Type]] = [(c, VARCHAR) for c in table.columns]
            return self._rows(ks, cf, columns, [[r.get(c) for c, _ in columns] for r in rows])
        if m := _INSERT.match(text):
            name = self._table_name(session, m.group(1))
            table = self.tables.setdefault(name, _Table())
            row: dict[str, bytes | None] = {}
            for col, literal in zip(m.group(2).split(","), m.group(3).split(",")):
                col, literal = col.strip().lower(), literal.strip()
                row[col] = next(bound) if literal == "?" else literal.strip("'").encode()
                if col not in table.columns:
                    table.columns.append(col)
            table.rows.append(row)
            return _int(VOID)
        if m := _CREATE_TABLE.match(text):
            name = self._table_name(session, m.group(1))
            names = [c.split()[0].lower() for c in m.group(2).split(",") if c.split() and "(" not in c]
            self.tables.setdefault(name, _Table(columns=[c for c in names if c != "primary"]))
        return _int(VOID)

    def _prepared_result(self, session: _Session, query_id: bytes, text: str) -> bytes:
        names = [f"v{i}" for i in range(text.count("?"))]
        if m := _INSERT.match(text):
            names = [c.strip().lower() for c, v in zip(m.group(2).split(","), m.group(3).split(",")) if "?" in v]
        elif (m := _SELECT.match(text)) and m.group(3) == "?":
            names = [m.group(2).lower()]
        ks = session.keyspace or "ks"
        out = _int(PREPARED) + _short(len(query_id)) + query_id
        out += _int(0x0001) + _int(len(names)) + _int(0) + _string(ks) + _string("t")  # global spec, no pk
        out += b"".join(_string(n) + _short(VARCHAR) for n in names)
        return out + _int(0x0004) + _int(0)  # result metadata: none (rows carry theirs)

    def _rows(self, ks: str, table: str, columns: list[tuple[str, _Type]],
              rows: list[list[bytes | None]]) -> bytes:
        out = _int(ROWS) + _int(0x0001) + _int(len(columns)) + _string(ks) + _string(table)
        for name, kind in columns:
            out += _string(name) + (_short(kind[0]) + _short(kind[1]) if isinstance(kind, tuple) else _short(kind))
        out += _int(len(rows))
        return out + b"".join(_value(cell) for row in rows for cell in row)

    def _local(self) -> bytes:
        tokens = _int(1) + _value(b"0")
        cells: list[tuple[str, _Type, bytes]] = [
            ("key", VARCHAR, b"local"), ("bootstrapped", VARCHAR, b"COMPLETED"),
            ("broadcast_address", INET, bytes([127, 0, 0, 1])), ("cluster_name", VARCHAR, b"cql-v4-test-server"),
            ("cql_version", VARCHAR, b"3.4.5"), ("data_center", VARCHAR, b"dc1"),
            ("host_id", UUID_TYPE, self.host_id.bytes), ("listen_address", INET, bytes([127, 0, 0, 1])),
            ("native_protocol_version", VARCHAR, b"4"),
            ("partitioner", VARCHAR, b"org.apache.cassandra.dht.Murmur3Partitioner"),
            ("rack", VARCHAR, b"rack1"), ("release_version", VARCHAR, b"3.11.16"),
            ("rpc_address", INET, bytes([127, 0, 0, 1])), ("schema_version", UUID_TYPE, self.schema_version.bytes),
            ("tokens", (SET, VARCHAR), tokens),
        ]
        return self._rows("system", "local", [(n, k) for n, k, _ in cells], [[v for _, _, v in cells]])

"""Cassandra: the CQL native protocol (v1 to v4) under Cilium's ``l7proto: cassandra`` rules, sans-I/O.

Requests policy sees, one ``{"query_action", "query_table"}`` per statement (cql_statement):

* QUERY and PREPARE: the statements of the query string (``BEGIN BATCH`` may hold several).
* EXECUTE: the statements of the prepared query, remembered per connection when the server's
  RESULT Prepared answers a PREPARE we forwarded; an id we have not seen prepared here gets
  ERROR Unprepared (0x2500) with the id, so the driver prepares it again on this connection.
* BATCH: every statement, query strings and prepared ids alike; the batch passes only whole.

A table without a keyspace is qualified by the session keyspace: the one the server last
named in a RESULT Set_keyspace (the answer to a successful USE). While a USE is unanswered the
server may run a statement in either keyspace, so both must be allowed. As in Cilium, ``use``
itself is never denied, and STARTUP, OPTIONS, REGISTER, AUTH_RESPONSE (and v1 CREDENTIALS) pass
without policy. A denial is Cilium's: ERROR 0x2100 "Request Unauthorized" on the request's stream
in its version; a statement that cannot be classified is denied the same way. Stream ids make
reply order irrelevant, so a denial is written at once, unless the client has part of a server
frame: then right after that frame.

Versions: v5, v6 and DSE's 0x41/0x42 are refused with the ERROR the drivers look for (0x000A,
"unsupported protocol version", on the request's stream, written as v4) so that they fall back;
those frames are never forwarded. Compression: a compressed frame cannot be read, so it is never
negotiated: a STARTUP asking for COMPRESSION and any frame with the compression flag are answered
with ERROR 0x000A and not forwarded (stripping COMPRESSION from STARTUP would not do: drivers
compress once the server says READY). Clients must connect without compression.

Each request yields one Record: ``{"opcode", "query_action", "query_table", "stream"}``, a batch's
statements joined with commas.

Client frames are forwarded only once read whole and allowed; a bad header, a truncated body,
bytes left over, an opcode or flag the version does not define, or a frame over ``max_buffer``
raise ProtocolError. Server frames pass unchanged and are streamed, except the RESULT kinds
the parser reads (Set_keyspace, Prepared), which are held until whole.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

from cilia.policy.flows import GenericL7Request

from .base import (
    DEFAULT_MAX_BUFFER,
    NO_POLICY_DECISION,
    Check,
    Decision,
    L7Connection,
    Output,
    ProtocolError,
    Record,
    decide,
)
from .cql_frame import (
    ERROR_PROTOCOL,
    ERROR_UNAUTHORIZED,
    ERROR_UNPREPARED,
    FLAG_COMPRESSION,
    REFUSAL_VERSION,
    REFUSED_VERSIONS,
    REQUEST_FLAGS,
    RESPONSE_BIT,
    SUPPORTED_VERSIONS,
    FrameError,
    Header,
    Opcode,
    encode_short_bytes,
    error_frame,
    header_size,
    opcode_name,
    parse_header,
    request_opcodes,
    response_opcodes,
)
from .cql_messages import (
    RESULT_PREPARED,
    RESULT_SET_KEYSPACE,
    Batch,
    Control,
    Execute,
    Prepare,
    Query,
    Startup,
    read_prepared_id,
    read_request,
    read_set_keyspace,
    result_kind,
)
from .cql_statement import Statement, StatementError, classify

UNAUTHORIZED_MESSAGE = "Request Unauthorized"
MAX_PREPARED = 10_000  # prepared ids remembered per connection; the oldest is forgotten (and re-prepared)

_PEEK = 4096  # bytes of a RESULT body looked at first for its kind

USE_DECISION = Decision(True, "", "use is not subject to policy (as in Cilium)")
# Drivers fall back on "unsupported protocol version"; the rest is Cassandra's wording.
_REFUSAL = ("Invalid or unsupported protocol version (%d); supported versions are ("
            + ", ".join(f"{v}/v{v}" for v in SUPPORTED_VERSIONS) + ")")
_NO_COMPRESSED_FRAMES = "Compressed frames cannot be inspected by the network policy proxy; connect without compression"
_NO_COMPRESSION = ("Compression is not supported through the network policy proxy (compressed frames cannot be "
                   "inspected); connect without compression")
_UNPREPARED = "Prepared query with ID %s not found on this connection (prepare it again)"


@dataclass(frozen=True, slots=True)
class _Access:
    """One statement as policy sees it."""

    action: str
    table: str

    def request(self) -> GenericL7Request:
        return GenericL7Request.of("cassandra", {"query_action": self.action, "query_table": self.table})


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A forwarded request the server has not answered yet."""

    prepared: tuple[_Access, ...] | None = None  # a PREPARE: what the id in its answer will stand for
    keyspace: str | None = None  # a USE: the keyspace the session may be in already


class CassandraConnection(L7Connection):
    protocol = "cassandra"

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER, max_prepared: int = MAX_PREPARED) -> None:
        super().__init__(check, max_buffer)
        self.max_prepared = max_prepared
        self._failed: ProtocolError | None = None
        self._version: int | None = None  # the client's, fixed by its first frame of a version we speak
        self._keyspace: str | None = None  # the session keyspace, as the server last named it
        self._in_flight: dict[int, _InFlight] = {}  # by stream id
        self._prepared: OrderedDict[bytes, tuple[_Access, ...]] = OrderedDict()
        self._client_buf = bytearray()
        self._client_closed = False
        self._server_buf = bytearray()
        self._server_closed = False
        self._server_header: Header | None = None  # of the frame at the start of _server_buf
        self._server_result: tuple[int, int] | None = None  # its RESULT kind and where the kind ends
        self._streaming = 0  # body bytes still to pass of a server frame already forwarded in part
        self._held = bytearray()  # our replies, waiting for the end of that server frame

    @property
    def keyspace(self) -> str | None:
        """The session keyspace (None before a successful USE)."""
        return self._keyspace

    def receive_client(self, data: bytes) -> Output:
        return self._guard("client", data)

    def receive_server(self, data: bytes) -> Output:
        return self._guard("server", data)

    def _guard(self, side: str, data: bytes) -> Output:
        if self._failed is not None:
            raise self._failed
        try:
            return self._from_client(data) if side == "client" else self._from_server(data)
        except FrameError as e:
            self._failed = ProtocolError(side, str(e))
            raise self._failed from None
        except ProtocolError as e:
            self._failed = e
            raise

    # -- client to server ------------------------------------------------------------------

    def _from_client(self, data: bytes) -> Output:
        if not data:
            if not self._client_closed and self._client_buf:
                raise ProtocolError("client", f"closed inside a frame ({len(self._client_buf)} bytes unread)")
            self._client_closed = True
            return Output()
        if self._client_closed:
            raise ProtocolError("client", "data after the end of the stream")
        buf = self._client_buf
        buf += data
        to_server, to_client = bytearray(), bytearray()
        records: list[Record] = []
        pos = 0
        while pos < len(buf):
            first = buf[pos]
            if first & RESPONSE_BIT:
                raise ProtocolError("client", f"a response frame (version byte 0x{first:02X}) from the client")
            if first not in SUPPORTED_VERSIONS and first not in REFUSED_VERSIONS:
                raise ProtocolError("client", f"unknown protocol version {first}")
            size = header_size(first)
            if len(buf) - pos < size:
                break
            header = parse_header(bytes(buf[pos:pos + size]))
            if header.total > self.max_buffer:
                raise ProtocolError("client", f"a {header.total}-byte frame is over the {self.max_buffer}-byte limit")
            if len(buf) - pos < header.total:
                break
            frame = bytes(buf[pos:pos + header.total])
            pos += header.total
            records.append(self._request(header, frame, to_server, to_client))
        del buf[:pos]
        return Output(bytes(to_server), bytes(to_client), tuple(records))

    def _request(self, header: Header, frame: bytes, to_server: bytearray, to_client: bytearray) -> Record:
        """Decide one whole client frame: forward it, or answer it ourselves."""
        version, stream = header.version, header.stream
        if version in REFUSED_VERSIONS:
            record = self._answer(header, error_frame(REFUSAL_VERSION, stream, ERROR_PROTOCOL, _REFUSAL % version),
                                  [], Decision(False, "", f"protocol version {version} is refused so that the "
                                                          "client falls back to v4 or lower"), to_client)
            return replace(record, handshake=True)  # version negotiation, not policy
        if self._version is None:
            self._version = version
        elif version != self._version:
            raise ProtocolError("client", f"a v{version} frame on a v{self._version} connection")
        if header.flags & ~REQUEST_FLAGS[version]:
            raise ProtocolError("client", f"frame flags 0x{header.flags:02X} not defined in protocol v{version}")
        if header.opcode not in request_opcodes(version):
            raise ProtocolError("client", f"opcode {opcode_name(header.opcode)} is not a protocol v{version} request")
        if header.flags & FLAG_COMPRESSION:
            return self._answer(header, error_frame(version, stream, ERROR_PROTOCOL, _NO_COMPRESSED_FRAMES), [],
                                Decision(False, "", "a compressed frame cannot be read"), to_client)
        if stream in self._in_flight:
            raise ProtocolError("client", f"stream {stream} reused while its request is unanswered")
        request = read_request(header, frame[header.size:])
        if isinstance(request, Startup) and any(key.upper() == "COMPRESSION" for key in request.options):
            return self._answer(header, error_frame(version, stream, ERROR_PROTOCOL, _NO_COMPRESSION), [],
                                Decision(False, "", "STARTUP asked for compression"), to_client)
        if isinstance(request, Startup | Control):
            return self._forward(header, frame, _InFlight(), [], NO_POLICY_DECISION, to_server)
        return self._statements(header, frame, request, to_server, to_client)

    def _statements(self, header: Header, frame: bytes, request: Query | Prepare | Execute | Batch,
                    to_server: bytearray, to_client: bytearray) -> Record:
        """A request carrying statements: forwarded only if every one of them is allowed."""
        version, stream = header.version, header.stream
        items: tuple[str | bytes, ...]
        if isinstance(request, Batch):
            items = request.statements
        else:
            items = (request.prepared_id if isinstance(request, Execute) else request.text,)
        accesses: list[_Access] = []
        for item in items:
            if isinstance(item, bytes):  # a prepared id
                known = self._prepared.get(item)
                if known is None:
                    reply = error_frame(version, stream, ERROR_UNPREPARED, _UNPREPARED % item.hex(),
                                        encode_short_bytes(item))
                    return self._answer(header, reply, accesses, Decision(
                        False, "", f"prepared statement {item.hex()} is unknown on this connection"), to_client)
                self._prepared.move_to_end(item)
                accesses += known
                continue
            try:
                statements = classify(item)
            except StatementError as e:
                return self._answer(header, _unauthorized(version, stream), accesses,
                                    Decision(False, "", f"cannot classify the statement: {e}"), to_client)
            accesses += self._resolve(statements)
        decision = self._decide(accesses)
        if not decision.allowed:
            return self._answer(header, _unauthorized(version, stream), accesses, decision, to_client)
        use = next((a.table for a in accesses if a.action == "use"), None)
        entry = _InFlight(prepared=tuple(accesses) if isinstance(request, Prepare) else None, keyspace=use)
        return self._forward(header, frame, entry, accesses, decision, to_server)

    def _forward(self, header: Header, frame: bytes, entry: _InFlight, accesses: list[_Access],
                 decision: Decision, to_server: bytearray) -> Record:
        to_server += frame
        self._in_flight[header.stream] = entry
        return _record(header, accesses, decision)

    def _answer(self, header: Header, reply: bytes, accesses: list[_Access], decision: Decision,
                to_client: bytearray) -> Record:
        """Not forwarded: ``reply`` is the client's answer."""
        if self._streaming:  # never inside a server frame the client has part of
            self._held += reply
        else:
            to_client += reply
        return _record(header, accesses, decision)

    def _resolve(self, statements: tuple[Statement, ...]) -> list[_Access]:
        out: list[_Access] = []
        for st in statements:
            if st.needs_keyspace:
                out += (_Access(st.action, st.query_table(ks)) for ks in self._session_keyspaces())
            else:
                out.append(_Access(st.action, st.query_table()))
        return out

    def _session_keyspaces(self) -> list[str | None]:
        """The keyspaces an unqualified table may be in: the session's and any a USE in flight names."""
        out: list[str | None] = [self._keyspace]
        for entry in self._in_flight.values():
            if entry.keyspace is not None and entry.keyspace not in out:
                out.append(entry.keyspace)
        return out

    def _decide(self, accesses: list[_Access]) -> Decision:
        policed = list(dict.fromkeys(a.request() for a in accesses if a.action != "use"))
        if accesses and not policed:
            return USE_DECISION
        return decide(self.check, policed)

    # -- server to client ------------------------------------------------------------------

    def _from_server(self, data: bytes) -> Output:
        if not data:
            if not self._server_closed and (self._server_buf or self._streaming):
                raise ProtocolError("server", "closed inside a frame")
            self._server_closed = True
            return Output()
        if self._server_closed:
            raise ProtocolError("server", "data after the end of the stream")
        out = bytearray()
        start = 0
        if self._streaming:
            start = min(self._streaming, len(data))
            out += data[:start]
            self._streaming -= start
            if not self._streaming:
                out += self._held
                self._held.clear()
        buf = self._server_buf
        buf += data[start:]
        pos = 0
        while not self._streaming and pos < len(buf):
            done = self._response(buf, pos, out)
            if done is None:
                break
            pos = done
        del buf[:pos]
        return Output(to_client=bytes(out))

    def _response(self, buf: bytearray, pos: int, out: bytearray) -> int | None:
        """Pass on the server frame at ``pos``: the offset after it when whole, None when more is
        needed (having forwarded what may go already, if it is streamed)."""
        header = self._server_header
        if header is None:
            first = buf[pos]
            if not first & RESPONSE_BIT:
                raise ProtocolError("server", f"a request frame (version byte 0x{first:02X}) from the server")
            version = first & 0x7F
            if version not in SUPPORTED_VERSIONS:
                raise ProtocolError("server", f"protocol version {version} from the server")
            size = header_size(first)
            if len(buf) - pos < size:
                return None
            header = parse_header(bytes(buf[pos:pos + size]))
            if header.opcode not in response_opcodes(version):
                raise ProtocolError("server", f"opcode {opcode_name(header.opcode)} is not a v{version} response")
            if header.flags & FLAG_COMPRESSION:
                raise ProtocolError("server", "a compressed frame, but compression is never negotiated here")
            self._server_header = header
            self._server_result = None
        end = pos + header.total
        have = min(len(buf), end)
        if header.opcode == Opcode.RESULT:
            if self._server_result is None:
                start = pos + header.size
                # The kind is near the start: do not copy a large body to find it.
                found = result_kind(bytes(buf[start:min(have, start + _PEEK)]), header.flags)
                if found is None and have > start + _PEEK:  # long warnings before it
                    found = result_kind(bytes(buf[start:have]), header.flags)
                self._server_result = found
                if self._server_result is None:
                    if have == end:
                        raise ProtocolError("server", "a RESULT too short to hold its kind")
                    if have - pos >= self.max_buffer:
                        raise ProtocolError("server", f"a RESULT prefix over the {self.max_buffer}-byte limit")
                    return None
            kind, offset = self._server_result
            if kind in (RESULT_SET_KEYSPACE, RESULT_PREPARED):
                if header.total > self.max_buffer:
                    raise ProtocolError("server", f"a {header.total}-byte RESULT is over the "
                                                  f"{self.max_buffer}-byte limit")
                if have < end:
                    return None
                body = bytes(buf[pos + header.size:end])
                self._answered(header, kind, body, offset)
                out += buf[pos:end]
                self._server_header = None
                return end
        self._answered(header, None, b"", 0)
        self._server_header = None
        out += buf[pos:have]
        if have < end:
            self._streaming = end - have
            return have
        return end

    def _answered(self, header: Header, kind: int | None, body: bytes, offset: int) -> None:
        """The server answers the request on the header's stream (body: a Set_keyspace or Prepared RESULT)."""
        if header.opcode == Opcode.EVENT:
            return
        entry = self._in_flight.pop(header.stream, None)
        if kind == RESULT_SET_KEYSPACE:
            self._keyspace = read_set_keyspace(body, offset)
        elif kind == RESULT_PREPARED:
            prepared_id = read_prepared_id(body, offset)
            if entry is not None and entry.prepared is not None:
                self._prepared[prepared_id] = entry.prepared
                self._prepared.move_to_end(prepared_id)
                while len(self._prepared) > self.max_prepared:
                    self._prepared.popitem(last=False)


def _unauthorized(version: int, stream: int) -> bytes:
    return error_frame(version, stream, ERROR_UNAUTHORIZED, UNAUTHORIZED_MESSAGE)


def _record(header: Header, accesses: list[_Access], decision: Decision) -> Record:
    return Record({
        "opcode": opcode_name(header.opcode),
        "query_action": ",".join(a.action for a in accesses),
        "query_table": ",".join(a.table for a in accesses),
        "stream": str(header.stream),
    }, decision)

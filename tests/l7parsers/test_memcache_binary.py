"""The memcached binary-protocol parser, sans I/O: every opcode's shape and policy name, denials
(Cilium's status 0x0008 ``access denied``) in reply order, quiet opcodes, bad input from either
side, and Hypothesis over splits and garbage. Policies are real CiliumNetworkPolicies."""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.l7parsers.byte_feed import chunked, feed, splits
from tests.l7parsers.memcache_support import (
    ALLOW_ALL, DENY_ALL, binary_request, binary_response, example_check, rules_check,
)

from cilia.l7parsers.base import Check, Output, ProtocolError
from cilia.l7parsers.memcache import MemcacheConnection
from cilia.l7parsers.memcache_binary import OPCODES, Header, MemcacheBinaryConnection, RequestReader, denial

req = binary_request
resp = binary_response
A_WING = example_check("app=a-wing")
FLEET = example_check("name=fleet-tracker")
JUNK = b"\x00" * 24  # a header whose magic is not 0x80
SET_EXTRAS = struct.pack(">II", 0, 0)  # flags, expiration
INCR_EXTRAS = struct.pack(">QQI", 1, 0, 0)  # delta, initial, expiration
TTL = struct.pack(">I", 30)
NOOP_BARRIER = req(0x0A, opaque=0xC111A)  # the parser's own Noop


def conn(check: Check = ALLOW_ALL, **kwargs: int) -> MemcacheConnection:
    return MemcacheConnection(check, **kwargs)


def denied(opcode: int, opaque: int = 0) -> bytes:
    return struct.pack(">BBHBBHIIQ", 0x81, opcode, 0, 0, 0, 0x0008, 13, opaque, 0) + b"access denied"


def unknown(opcode: int, opaque: int = 0) -> bytes:
    return struct.pack(">BBHBBHIIQ", 0x81, opcode, 0, 0, 0, 0x0081, 15, opaque, 0) + b"Unknown command"


# frame, the record's command and key, whether the server answers
FORMS: list[tuple[bytes, str, str | None, str]] = [
    (req(0x00, b"k", opaque=1), "get", "k", "always"),
    (req(0x01, b"k", SET_EXTRAS, b"v"), "set", "k", "always"),
    (req(0x01, b"k", SET_EXTRAS, b"v", cas=5), "cas", "k", "always"),  # memcached stores it as a cas
    (req(0x02, b"k", SET_EXTRAS, b""), "add", "k", "always"),
    (req(0x02, b"k", SET_EXTRAS, b"v", cas=5), "cas", "k", "always"),
    (req(0x03, b"k", SET_EXTRAS, b"v"), "replace", "k", "always"),
    (req(0x04, b"k"), "delete", "k", "always"),
    (req(0x04, b"k", cas=9), "delete", "k", "always"),
    (req(0x05, b"k", INCR_EXTRAS), "incr", "k", "always"),
    (req(0x06, b"k", INCR_EXTRAS), "decr", "k", "always"),
    (req(0x07), "quit", None, "always"),
    (req(0x08), "flush_all", None, "always"),
    (req(0x08, extras=TTL), "flush_all", None, "always"),
    (req(0x09, b"k"), "get", "k", "maybe"),
    (req(0x0A, opaque=77), "noop", None, "always"),
    (req(0x0B), "version", None, "always"),
    (req(0x0C, b"k"), "get", "k", "always"),
    (req(0x0D, b"k"), "get", "k", "maybe"),
    (req(0x0E, b"k", value=b"v"), "append", "k", "always"),
    (req(0x0F, b"k", value=b"v"), "prepend", "k", "always"),
    (req(0x10), "stats", None, "always"),
    (req(0x10, b"items"), "stats", None, "always"),  # a stats group, not an item key
    (req(0x11, b"k", SET_EXTRAS, b"v"), "set", "k", "maybe"),
    (req(0x11, b"k", SET_EXTRAS, b"v", cas=1), "cas", "k", "maybe"),
    (req(0x12, b"k", SET_EXTRAS, b"v"), "add", "k", "maybe"),
    (req(0x13, b"k", SET_EXTRAS, b"v"), "replace", "k", "maybe"),
    (req(0x14, b"k"), "delete", "k", "maybe"),
    (req(0x15, b"k", INCR_EXTRAS), "incr", "k", "maybe"),
    (req(0x16, b"k", INCR_EXTRAS), "decr", "k", "maybe"),
    (req(0x17), "quit", None, "never"),
    (req(0x18), "flush_all", None, "maybe"),
    (req(0x19, b"k", value=b"v"), "append", "k", "maybe"),
    (req(0x1A, b"k", value=b"v"), "prepend", "k", "maybe"),
    (req(0x1B, extras=struct.pack(">I", 1)), "verbosity", None, "always"),
    (req(0x1C, b"k", TTL), "touch", "k", "always"),
    (req(0x1D, b"k", TTL), "gat", "k", "always"),
    (req(0x1E, b"k", TTL), "gat", "k", "maybe"),
    (req(0x20), "sasl-list-mechs", None, "always"),
    (req(0x21, b"PLAIN", value=b"\0u\0p"), "sasl-auth", None, "always"),
    (req(0x22, b"PLAIN", value=b"x"), "sasl-step", None, "always"),
    (req(0x23, b"k", TTL), "gat", "k", "always"),
    (req(0x24, b"k", TTL), "gat", "k", "maybe"),
    (req(0x30, b"k"), "rget", "k", "always"),
    (req(0x40, value=b"x"), "tap-connect", None, "always"),
    (req(0x47), "tap-checkpoint-end", None, "always"),
    (req(0x00, b"k" * 250), "get", "k" * 250, "always"),
    (req(0x00, b"\xc3\xa9"), "get", "\u00e9", "always"),
    (req(0x00, b"a b\x00"), "get", "a b\x00", "always"),  # binary keys may hold anything
]
UNSERVED = {0x1B} | set(range(0x30, 0x48))


def _summary(command: str, key: str | None) -> dict[str, str]:
    return {"command": command} if key is None else {"command": command, "key": key}


@pytest.mark.parametrize(("frame", "command", "key", "answer"), FORMS)
@pytest.mark.parametrize("chunk", [0, 1])
def test_allowed_forms(frame: bytes, command: str, key: str | None, answer: str, chunk: int) -> None:
    c = conn()
    out = feed(c, chunked(frame, chunk))
    assert [dict(r.summary) for r in out.records] == [_summary(command, key)]
    assert out.records[0].decision.allowed
    assert c.dialect == "binary"
    opcode, opaque = frame[1], struct.unpack_from(">I", frame, 12)[0]
    if opcode in UNSERVED:  # memcached misreads these: answered here as memcached would
        assert (out.to_server, out.to_client) == (b"", unknown(opcode, opaque))
    else:
        assert (out.to_server, out.to_client) == (frame, b"")


@pytest.mark.parametrize(("frame", "command", "key", "answer"), FORMS)
@pytest.mark.parametrize("chunk", [0, 1])
def test_denied_forms(frame: bytes, command: str, key: str | None, answer: str, chunk: int) -> None:
    out = feed(conn(DENY_ALL), chunked(frame, chunk))
    assert out.to_server == b""
    assert out.to_client == denied(frame[1], struct.unpack_from(">I", frame, 12)[0])  # quiet ones too
    assert not out.records[0].decision.allowed


@pytest.mark.parametrize(("frame", "command", "key", "answer"), FORMS)
def test_request_events(frame: bytes, command: str, key: str | None, answer: str) -> None:
    reader = RequestReader()
    reader.feed(frame)
    request = reader.next()
    assert request is not None and reader.next() is None
    assert (request.frame, request.commands, request.opcode.answer.value) == (frame, (command,), answer)
    assert request.opcode is OPCODES[frame[1]]


@pytest.mark.parametrize(("frame", "command", "key", "answer"), FORMS)
def test_junk_after_a_form(frame: bytes, command: str, key: str | None, answer: str) -> None:
    with pytest.raises(ProtocolError) as e:
        conn().receive_client(frame + JUNK)
    assert e.value.side == "client"


def test_many_frames_per_chunk_and_byte_by_byte() -> None:
    frames = [f for f, *_ in FORMS if f[1] not in UNSERVED]
    stream = b"".join(frames)
    for chunk in (0, 1, 5):
        out = feed(conn(), chunked(stream, chunk))
        assert out.to_server == stream
        assert len(out.records) == len(frames)


def test_denial_bytes_are_ciliums() -> None:
    header = Header.parse(req(0x0C, b"xwing-coord", opaque=0x01020304, cas=7))
    assert denial(header) == bytes.fromhex(
        "81 0c 0000 00 00 0008 0000000d 01020304 0000000000000000") + b"access denied"


BAD = [
    req(0x00, b"k", magic=0x81),  # a response from the client
    req(0x1F),  # no such opcode
    req(0x25),
    req(0x48),
    req(0xFF),
    req(0x00, b"k", data_type=1),
    req(0x00, b"k" * 251),
    req(0x00),  # get without a key
    req(0x00, b"k", value=b"v"),
    req(0x00, b"k", TTL),
    req(0x01, b"k", b"", b"v"),  # set without its 8 bytes of extras
    req(0x01, b"", SET_EXTRAS, b"v"),
    req(0x04, b"k", value=b"v"),
    req(0x05, b"k", TTL),
    req(0x05, b"k", INCR_EXTRAS, b"v"),
    req(0x07, b"k"),
    req(0x08, extras=b"12"),
    req(0x0A, value=b"v"),
    req(0x0B, b"k"),
    req(0x0E, b"k", TTL, b"v"),
    req(0x0E, value=b"v"),
    req(0x10, extras=TTL),
    req(0x10, b"items", value=b"v"),
    req(0x1B),
    req(0x1C, b"k"),
    req(0x1D, b"", TTL),
    req(0x20, b"k"),
    req(0x21, value=b"x"),
    # key and extras longer than the body
    struct.pack(">BBHBBHIIQ", 0x80, 0x00, 5, 0, 0, 0, 3, 0, 0) + b"abc",
    struct.pack(">BBHBBHIIQ", 0x80, 0x01, 1, 8, 0, 0, 4, 0, 0) + b"abcd",
]


@pytest.mark.parametrize("data", BAD)
@pytest.mark.parametrize("chunk", [0, 1])
def test_bad_requests_are_protocol_errors(data: bytes, chunk: int) -> None:
    c = MemcacheBinaryConnection(ALLOW_ALL)
    with pytest.raises(ProtocolError) as e:
        feed(c, chunked(data, chunk))
    assert e.value.side == "client"
    with pytest.raises(ProtocolError):
        c.receive_client(req(0x0A))


def test_a_header_is_judged_before_its_body_arrives() -> None:
    with pytest.raises(ProtocolError, match="key of 251 bytes"):
        conn().receive_client(req(0x00, b"k" * 251)[:24])


def test_buffer_limit() -> None:
    with pytest.raises(ProtocolError, match="over the buffer limit"):
        conn(max_buffer=1000).receive_client(req(0x01, b"k", SET_EXTRAS, b"v" * 1000)[:24])
    frame = req(0x01, b"k", SET_EXTRAS, b"v" * 900)
    assert conn(max_buffer=1000).receive_client(frame).to_server == frame


# --- policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(("check", "frame", "allowed"), [
    (A_WING, req(0x00, b"awing-coord"), True),
    (A_WING, req(0x0D, b"awing-coord"), True),
    (A_WING, req(0x01, b"awing-coord", SET_EXTRAS, b"1,2"), True),
    (A_WING, req(0x11, b"awing-coord", SET_EXTRAS, b"1,2"), True),
    (A_WING, req(0x00, b"xwing-coord"), False),
    (A_WING, req(0x01, b"xwing-coord", SET_EXTRAS, b"1,2"), False),
    (A_WING, req(0x01, b"awing-coord", SET_EXTRAS, b"1,2", cas=3), False),  # a cas, not a set
    (A_WING, req(0x04, b"awing-coord"), False),
    (A_WING, req(0x1D, b"awing-coord", TTL), False),
    (A_WING, req(0x0A), False),
    (A_WING, req(0x0B), False),
    (FLEET, req(0x0C, b"xwing-coord"), True),
    (FLEET, req(0x01, b"xwing-coord", SET_EXTRAS, b"v"), False),
    (rules_check({"command": "stats"}), req(0x10, b"slabs"), True),
    (rules_check({"command": "sasl-auth"}), req(0x21, b"PLAIN", value=b"x"), True),
    (rules_check({"command": "writeGroup", "keyPrefix": "s/"}), req(0x14, b"s/1"), True),
    (rules_check({"command": "writeGroup", "keyPrefix": "s/"}), req(0x1C, b"s/1", TTL), True),
    (rules_check({"command": "writeGroup", "keyPrefix": "s/"}), req(0x1C, b"t/1", TTL), False),
    (rules_check({"command": "gat"}), req(0x24, b"k", TTL), True),
    (rules_check({"command": "flush_all"}), req(0x18), True),
    (rules_check({"command": "verbosity"}), req(0x1B, extras=TTL), True),
])
def test_policy(check: Check, frame: bytes, allowed: bool) -> None:
    out = conn(check).receive_client(frame)
    assert out.records[0].decision.allowed is allowed
    if not allowed:
        assert (out.to_server, out.to_client) == (b"", denied(frame[1]))
    elif frame[1] not in UNSERVED:
        assert (out.to_server, out.to_client) == (frame, b"")


# --- reply order ---------------------------------------------------------------------------

HIT = struct.pack(">I", 0) + b"1,2"  # flags and value


def test_get_multi_with_a_denied_key() -> None:
    """bmemcached's get_multi: GetKQ for all keys but the last, then a GetK."""
    frames = req(0x0D, b"awing-coord", opaque=1) + req(0x0D, b"xwing-coord", opaque=2) + \
        req(0x0C, b"awing-coord", opaque=3)
    for hit in (resp(0x0D, key=b"awing-coord", extras=HIT[:4], value=HIT[4:], opaque=1), b""):
        c = conn(A_WING)
        out = c.receive_client(frames)
        # The denial comes after the first GetKQ's answer, if any: a Noop of ours finds out when.
        assert out.to_server == req(0x0D, b"awing-coord", opaque=1) + NOOP_BARRIER + \
            req(0x0C, b"awing-coord", opaque=3)
        assert out.to_client == b""
        last = resp(0x0C, key=b"awing-coord", extras=HIT[:4], value=HIT[4:], opaque=3)
        server = hit + resp(0x0A, opaque=0xC111A) + last
        assert feed(c, chunked(server, 1), "server").to_client == hit + denied(0x0D, 2) + last


def test_denial_behind_a_definite_request_needs_no_noop() -> None:
    c = conn(A_WING)
    out = c.receive_client(req(0x09, b"awing-coord", opaque=1) + req(0x00, b"awing-coord", opaque=2) +
                           req(0x00, b"xwing-coord", opaque=3))
    assert out.to_server == req(0x09, b"awing-coord", opaque=1) + req(0x00, b"awing-coord", opaque=2)
    miss = resp(0x00, status=1, value=b"Not found", opaque=2)
    assert c.receive_server(miss).to_client == miss + denied(0x00, 3)  # the GetQ missed: no answer


def test_quiet_failures_stats_and_a_clients_noop() -> None:
    c = conn()
    frames = (req(0x11, b"a", SET_EXTRAS, b"v", opaque=1) + req(0x12, b"a", SET_EXTRAS, b"v", opaque=2) +
              req(0x10, opaque=3) + req(0x0A, opaque=4))
    assert c.receive_client(frames).to_server == frames
    replies = (resp(0x12, status=2, value=b"Data exists for key.", opaque=2) +
               resp(0x10, key=b"pid", value=b"1", opaque=3) + resp(0x10, key=b"uptime", value=b"2", opaque=3) +
               resp(0x10, opaque=3) + resp(0x0A, opaque=4))
    assert feed(c, chunked(replies, 7), "server").to_client == replies
    with pytest.raises(ProtocolError, match="no outstanding"):
        c.receive_server(resp(0x0A, opaque=4))


def test_denial_waits_for_stats_to_end() -> None:
    c = conn(rules_check({"command": "stats"}))
    out = c.receive_client(req(0x10, opaque=1) + req(0x0B, opaque=2))
    assert (out.to_server, out.to_client) == (req(0x10, opaque=1), b"")
    one = resp(0x10, key=b"pid", value=b"1", opaque=1)
    assert c.receive_server(one).to_client == one
    end = resp(0x10, opaque=1)
    assert c.receive_server(end).to_client == end + denied(0x0B, 2)


def test_unserved_opcode_reply_keeps_its_place() -> None:
    c = conn()
    out = c.receive_client(req(0x00, b"k", opaque=1) + req(0x1B, extras=TTL, opaque=2) + req(0x0A, opaque=3))
    assert out.to_server == req(0x00, b"k", opaque=1) + req(0x0A, opaque=3)
    miss = resp(0x00, status=1, value=b"Not found", opaque=1)
    assert c.receive_server(miss + resp(0x0A, opaque=3)).to_client == miss + unknown(0x1B, 2) + resp(0x0A, opaque=3)


def test_quitq_awaits_nothing() -> None:
    c = conn()
    assert c.receive_client(req(0x17)).to_server == req(0x17)
    with pytest.raises(ProtocolError):
        c.receive_server(resp(0x17))


BAD_RESPONSES = [
    (req(0x00, b"k", opaque=1), resp(0x00, opaque=2)),  # wrong opaque
    (req(0x00, b"k", opaque=1), resp(0x0C, opaque=1)),  # wrong opcode
    (req(0x00, b"k", opaque=1), req(0x00, b"k", opaque=1)),  # request magic
    (req(0x00, b"k", opaque=1), resp(0x09, opaque=1)),  # a quiet response to no quiet request
    (req(0x09, b"k", opaque=1), resp(0x0D, opaque=1)),
    (req(0x09, b"k", opaque=1), resp(0x0A)),  # a Noop nobody sent
    (req(0x00, b"k", opaque=1), struct.pack(">BBHBBHIIQ", 0x81, 0, 5, 0, 0, 0, 3, 1, 0) + b"abc"),
    (req(0x00, b"k", opaque=1), resp(0x00, key=b"k" * 251, opaque=1)),
    (req(0x0A), b"\x81" + b"\x00" * 23 + JUNK),
]


@pytest.mark.parametrize(("request_", "response"), BAD_RESPONSES)
def test_bad_responses_are_protocol_errors(request_: bytes, response: bytes) -> None:
    c = conn()
    c.receive_client(request_)
    with pytest.raises(ProtocolError) as e:
        feed(c, chunked(response, 1), "server")
    assert e.value.side == "server"


def test_server_buffer_limit() -> None:
    c = conn(max_buffer=1000)
    c.receive_client(req(0x00, b"k"))
    with pytest.raises(ProtocolError, match="over the buffer limit"):
        c.receive_server(resp(0x00, value=b"v" * 1000)[:24])


# --- Hypothesis ----------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.data())
def test_fuzz_random_bytes(data: st.DataObject) -> None:
    prefix = data.draw(st.sampled_from([b"", req(0x0D, b"a"), req(0x01, b"a", SET_EXTRAS, b"v")]))
    garbage = data.draw(st.one_of(st.binary(max_size=100),
                                  st.binary(min_size=23, max_size=60).map(lambda b: b"\x80" + b)))
    c = conn()
    sent = feed(c, prefix).to_server
    assert sent == prefix
    try:
        for piece in data.draw(splits(garbage)):
            out = c.receive_client(piece)
            sent += out.to_server
    except ProtocolError as e:
        assert e.side == "client"
    assert (prefix + garbage).startswith(sent)


@FUZZ
@given(st.binary(min_size=1, max_size=100))
def test_fuzz_random_responses(garbage: bytes) -> None:
    c = conn()
    c.receive_client(req(0x0D, b"a", opaque=1) + req(0x10, opaque=2))
    try:
        out = c.receive_server(b"\x81" + garbage)
    except ProtocolError as e:
        assert e.side == "server"
    else:
        assert (b"\x81" + garbage).startswith(out.to_client)


@dataclass(frozen=True)
class Req:
    frame: bytes
    command: str
    key: str | None
    answer: str


KEYS = st.sampled_from(["a", "ab", "b", "bz"])
FUZZ_POLICY = rules_check(*[{"command": c, "keyPrefix": "a"} for c in ("get", "set", "delete", "incr")],
                          {"command": "noop"}, {"command": "version"})


@st.composite
def requests(draw: st.DrawFn) -> Req:
    key = draw(KEYS)
    k = key.encode()
    opaque = draw(st.integers(0, 3))
    op, command, answer = draw(st.sampled_from([
        (0x00, "get", "always"), (0x09, "get", "maybe"), (0x0C, "get", "always"), (0x0D, "get", "maybe"),
        (0x01, "set", "always"), (0x11, "set", "maybe"), (0x04, "delete", "always"), (0x14, "delete", "maybe"),
        (0x05, "incr", "always"), (0x15, "incr", "maybe"), (0x0A, "noop", "always"), (0x0B, "version", "always"),
        (0x10, "stats", "always"), (0x1C, "touch", "always"),
    ]))
    extras = {0x01: SET_EXTRAS, 0x11: SET_EXTRAS, 0x05: INCR_EXTRAS, 0x15: INCR_EXTRAS, 0x1C: TTL}.get(op, b"")
    value = draw(st.binary(max_size=4)) if op in (0x01, 0x11) else b""
    if op in (0x0A, 0x0B, 0x10):
        return Req(req(op, opaque=opaque), command, None, answer)
    return Req(req(op, k, extras, value, opaque), command, key, answer)


def _allowed(r: Req) -> bool:
    if r.key is None:
        return r.command in ("noop", "version")
    return r.command in ("get", "set", "delete", "incr") and r.key.startswith("a")


def expected_output(reqs: list[Req]) -> tuple[bytes, bytes]:
    """The rule, as a model: allowed frames go on; a denial is answered at once if nothing
    forwarded awaits a sure response, and gets our Noop ahead of it if the last forwarded
    request is quiet."""
    to_server, to_client = b"", b""
    awaiting = last_quiet = False
    for r in reqs:
        if _allowed(r):
            to_server += r.frame
            last_quiet = r.answer == "maybe"
            awaiting = awaiting or r.answer == "always"
        else:
            if last_quiet:
                to_server += NOOP_BARRIER
                awaiting, last_quiet = True, False
            if not awaiting:
                to_client += denied(r.frame[1], struct.unpack_from(">I", r.frame, 12)[0])
    return to_server, to_client


@FUZZ
@given(st.lists(requests(), max_size=12), st.data())
def test_fuzz_valid_streams_in_random_splits(reqs: list[Req], data: st.DataObject) -> None:
    stream = b"".join(r.frame for r in reqs)
    c = conn(FUZZ_POLICY)
    out = Output()
    for piece in data.draw(splits(stream)):
        out = out + c.receive_client(piece)
    assert (out.to_server, out.to_client) == expected_output(reqs)
    assert [r.decision.allowed for r in out.records] == [_allowed(r) for r in reqs]


@FUZZ
@given(st.data())
def test_fuzz_response_splits(data: st.DataObject) -> None:
    """Responses split anywhere reach the client unchanged, each denial after the response of
    the request before it (quiet misses get no response, and our Noop's is kept back)."""
    check = rules_check({"command": "get", "keyPrefix": "a"})
    keys = data.draw(st.lists(st.sampled_from([b"a1", b"a2", b"b"]), min_size=1, max_size=8))
    quiet = data.draw(st.lists(st.booleans(), min_size=len(keys), max_size=len(keys)))
    hits = data.draw(st.lists(st.booleans(), min_size=len(keys), max_size=len(keys)))
    c = conn(check)
    frames = b"".join(req(0x0D if q else 0x0C, k, opaque=i) for i, (k, q) in enumerate(zip(keys, quiet)))
    out = c.receive_client(frames)
    client = out.to_client
    expected = b""
    server = b""
    for i, (k, q, hit) in enumerate(zip(keys, quiet, hits)):
        if k == b"b":
            expected += denied(0x0D if q else 0x0C, i)
            continue
        if hit:
            r = resp(0x0D if q else 0x0C, key=k, extras=b"\0\0\0\0", value=b"v", opaque=i)
        elif not q:
            r = resp(0x0C, status=1, value=b"Not found", opaque=i)
        else:
            r = b""
        expected += r
        server += r
        # our Noop follows a quiet request the parser forwarded right before a denial
        if q and i + 1 < len(keys) and keys[i + 1] == b"b":
            server += resp(0x0A, opaque=0xC111A)
    assert out.to_server.count(NOOP_BARRIER) == server.count(resp(0x0A, opaque=0xC111A))
    for piece in data.draw(splits(server)):
        client += c.receive_server(piece).to_client
    assert client == expected


def test_every_opcode_name_is_a_policy_command() -> None:
    from cilia.policy.l7.memcache import COMMANDS

    assert {op.command for op in OPCODES.values()} | {"cas"} <= set(COMMANDS)

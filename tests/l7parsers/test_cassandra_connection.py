"""CassandraConnection, frame by frame: client frames written by cassandra-driver's own encoder,
the parser's replies read back by the driver's decoder, policy from a real CiliumNetworkPolicy."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from cassandra.protocol import PreparedQueryNotFound, ProtocolException, UnauthorizedErrorMessage

from cilia.l7parsers.base import Check, Decision, Output, ProtocolError
from cilia.l7parsers.cassandra import CassandraConnection
from cilia.policy.flows import L7Request

from cassandra_support import (
    SHOP_POLICY,
    batch,
    decode_reply,
    encode,
    event,
    execute,
    frame,
    options,
    prepare,
    prepared,
    query,
    ready,
    register,
    rows,
    server_error,
    set_keyspace,
    startup,
    supported,
    void,
)
from policy_support import check_from_policy

CHECK = check_from_policy(SHOP_POLICY, "app=shop-frontend", "app=shop-db", 9042)
QID = bytes(range(16))


def conn(check: Check = CHECK, **kwargs: int) -> CassandraConnection:
    return CassandraConnection(check, **kwargs)


def deny_all() -> Check:
    seen: list[L7Request] = []

    def check(request: L7Request) -> Decision:
        seen.append(request)
        return Decision(False, "deny-all", "test")

    check.seen = seen  # type: ignore[attr-defined]
    return check


def assert_unauthorized(out: Output, version: int, stream: int) -> None:
    assert out.to_server == b""
    first, got_stream, message = decode_reply(out.to_client)
    assert (first, got_stream) == (0x80 | version, stream)
    assert isinstance(message, UnauthorizedErrorMessage)
    assert message.message == "Request Unauthorized"


# -- versions and frames ---------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_allowed_query_is_forwarded_unchanged(version: int) -> None:
    c = conn()
    text = "SELECT * FROM shop.orders"
    data = query(text, version, stream=7)
    # header (8 bytes with a one-byte stream in v1/v2), [long string], consistency and flags
    assert data[0] == version and len(data) == (8 if version < 3 else 9) + 4 + len(text) + 3
    out = c.receive_client(data)
    assert out.to_server == data and out.to_client == b""
    (record,) = out.records
    assert dict(record.summary) == {"opcode": "QUERY", "query_action": "select", "query_table": "shop.orders",
                                    "stream": "7"}
    assert record.decision.allowed and "policy.yaml:19" in record.decision.rule


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_denied_query_gets_unauthorized_on_its_stream(version: int) -> None:
    c = conn()
    stream = 100 if version < 3 else 30000
    out = c.receive_client(query("SELECT * FROM shop.secrets", version, stream=stream))
    assert_unauthorized(out, version, stream)
    assert len(out.to_client) == (8 if version < 3 else 9) + 4 + 2 + 20
    (record,) = out.records
    assert not record.decision.allowed and record.decision.rule.startswith("default deny")
    assert record.summary["query_table"] == "shop.secrets"
    # the connection stays usable
    assert c.receive_client(query("SELECT * FROM shop.orders", version, stream=1)).to_server


def test_unauthorized_bytes_are_ciliums() -> None:
    out = conn().receive_client(query("SELECT * FROM shop.secrets", 4, stream=5))
    assert out.to_client == b"\x84\x00\x00\x05\x00\x00\x00\x00\x1a\x00\x00\x21\x00\x00\x14Request Unauthorized"


@pytest.mark.parametrize("version", [5, 6, 0x41, 0x42])
def test_newer_versions_are_refused_so_the_driver_falls_back(version: int) -> None:
    c = conn()
    data = frame(version, 3, 0x05, b"", response=False)  # OPTIONS, as the driver opens
    out = c.receive_client(data + frame(version, 4, 0x01, b"\x00\x00", response=False))
    assert out.to_server == b""
    first = out.to_client[0]
    assert first == 0x84
    replies = [out.to_client[:len(out.to_client) // 2], out.to_client[len(out.to_client) // 2:]]
    for stream, reply in zip((3, 4), replies):
        _, got_stream, message = decode_reply(reply)
        assert got_stream == stream
        assert isinstance(message, ProtocolException)
        assert "unsupported protocol version" in message.message
    assert [r.decision.allowed for r in out.records] == [False, False]
    assert [r.handshake for r in out.records] == [True, True]  # negotiation: a flow, not a policy drop
    assert out.records[0].summary["opcode"] == "OPTIONS"


def test_unknown_versions_and_response_frames_from_the_client_are_protocol_errors() -> None:
    for data in (b"\x00", b"\x07", b"\x40", b"\x43", b"\x84", b"\x81"):
        with pytest.raises(ProtocolError) as e:
            conn().receive_client(data + bytes(8))
        assert e.value.side == "client"


def test_version_is_fixed_by_the_first_frame() -> None:
    c = conn()
    c.receive_client(options(4))
    with pytest.raises(ProtocolError, match="v3 frame on a v4 connection"):
        c.receive_client(options(3, stream=1))


def test_v1_query_may_carry_the_drivers_flags_byte() -> None:
    data = query("SELECT * FROM shop.orders", 1)
    assert data.endswith(b"\x00\x01\x00")  # consistency ONE, then a flags byte v1 does not have
    assert conn().receive_client(data).to_server == data


def test_custom_payload_flag_v4_only() -> None:
    msg_frame = query("SELECT * FROM shop.orders", 4)
    payload = struct.pack(">H", 1) + struct.pack(">H", 1) + b"k" + struct.pack(">i", 1) + b"v"
    body = payload + msg_frame[9:]
    data = frame(4, 0, 0x07, body, flags=0x04, response=False)
    assert conn().receive_client(data).to_server == data
    with pytest.raises(ProtocolError, match="flags 0x04"):
        conn().receive_client(frame(3, 0, 0x07, body, flags=0x04, response=False))


def test_tracing_and_beta_flags() -> None:
    body = query("SELECT * FROM shop.orders", 4)[9:]
    for flags in (0x02, 0x10):
        data = frame(4, 0, 0x07, body, flags=flags, response=False)
        assert conn().receive_client(data).to_server == data
    with pytest.raises(ProtocolError):
        conn().receive_client(frame(4, 0, 0x07, body, flags=0x20, response=False))


# -- non-query opcodes -------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_non_query_opcodes_pass_without_policy(version: int) -> None:
    check = deny_all()
    c = conn(check)
    frames = [options(version, 0), startup(version, 1), register(version, 2)]
    if version == 1:
        frames.append(frame(1, 3, 0x04, struct.pack(">H", 0), response=False))  # CREDENTIALS
    else:
        frames.append(frame(version, 3, 0x0F, struct.pack(">i", 2) + b"\x00u", response=False))  # AUTH_RESPONSE
    out = c.receive_client(b"".join(frames))
    assert out.to_server == b"".join(frames) and out.to_client == b""
    assert [r.summary["opcode"] for r in out.records] == ["OPTIONS", "STARTUP", "REGISTER",
                                                          "CREDENTIALS" if version == 1 else "AUTH_RESPONSE"]
    assert all(r.decision.allowed for r in out.records)
    assert check.seen == []  # type: ignore[attr-defined]


def test_options_body_must_be_empty() -> None:
    with pytest.raises(ProtocolError, match="unread"):
        conn().receive_client(frame(4, 0, 0x05, b"x", response=False))


def test_opcodes_outside_the_version_are_protocol_errors() -> None:
    batch_v2 = batch(["INSERT INTO shop.orders (k) VALUES (?)"], 2)
    with pytest.raises(ProtocolError, match="BATCH is not a protocol v1 request"):
        conn().receive_client(bytes([1]) + batch_v2[1:])
    for opcode in (0x00, 0x02, 0x08, 0x0C, 0x11, 0xFF):
        with pytest.raises(ProtocolError, match="not a protocol v4 request"):
            conn().receive_client(frame(4, 0, opcode, b"", response=False))


# -- compression ---------------------------------------------------------------------------------


def test_startup_asking_for_compression_is_refused() -> None:
    c = conn()
    for key in ("COMPRESSION", "compression"):
        out = c.receive_client(startup(4, 1, **{key: "lz4"}))
        assert out.to_server == b""
        _, stream, message = decode_reply(out.to_client)
        assert stream == 1 and isinstance(message, ProtocolException) and "compression" in message.message.lower()
        assert not out.records[0].decision.allowed
    # the connection stays usable: a STARTUP without compression goes through
    assert c.receive_client(startup(4, 2)).to_server == startup(4, 2)


@pytest.mark.parametrize("version", [1, 4])
def test_compressed_frames_are_answered_never_forwarded(version: int) -> None:
    c = conn()
    body = b"\x00\x00\x00\x05lz4!!"  # whatever it is, it cannot be read
    out = c.receive_client(frame(version, 9, 0x07, body, flags=0x01, response=False))
    assert out.to_server == b""
    first, stream, message = decode_reply(out.to_client)
    assert (first, stream) == (0x80 | version, 9) and isinstance(message, ProtocolException)
    assert out.records[0].decision.reason == "a compressed frame cannot be read"
    assert c.receive_client(query("SELECT * FROM shop.orders", version, 1)).to_server


def test_compressed_server_frame_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError) as e:
        conn().receive_server(frame(4, 0, 0x08, b"\x00\x00\x00\x01", flags=0x01))
    assert e.value.side == "server"


# -- prepared statements ------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_prepare_then_execute(version: int) -> None:
    c = conn()
    out = c.receive_client(prepare("INSERT INTO shop.orders (k) VALUES (?)", version, 3))
    assert out.to_server and out.records[0].summary["opcode"] == "PREPARE"
    reply = prepared(QID, version, 3)
    assert c.receive_server(reply).to_client == reply
    data = execute(QID, [b"x"], version, 4)
    out = c.receive_client(data)
    assert out.to_server == data
    assert dict(out.records[0].summary) == {"opcode": "EXECUTE", "query_action": "insert",
                                            "query_table": "shop.orders", "stream": "4"}


@pytest.mark.parametrize("version", [1, 4])
def test_execute_of_an_unknown_id_gets_unprepared(version: int) -> None:
    c = conn()
    out = c.receive_client(execute(QID, [], version, 5))
    assert out.to_server == b""
    first, stream, message = decode_reply(out.to_client)
    assert (first, stream) == (0x80 | version, 5)
    assert isinstance(message, PreparedQueryNotFound) and message.info == QID
    assert not out.records[0].decision.allowed and "unknown" in out.records[0].decision.reason


def test_denied_prepare_is_never_learned() -> None:
    c = conn()
    assert_unauthorized(c.receive_client(prepare("SELECT * FROM shop.secrets", 4, 1)), 4, 1)
    c.receive_server(prepared(QID, 4, 1))  # a server answering a PREPARE it never got
    assert decode_reply(c.receive_client(execute(QID, [], 4, 2)).to_client)[2].error_code == 0x2500


def test_prepared_id_is_learned_only_from_the_prepares_stream() -> None:
    c = conn()
    c.receive_client(prepare("SELECT * FROM shop.orders", 4, 1))
    c.receive_client(query("SELECT * FROM system.local", 4, 2))
    c.receive_server(prepared(QID, 4, 2))  # stream 2 was a QUERY
    assert decode_reply(c.receive_client(execute(QID, [], 4, 3)).to_client)[2].error_code == 0x2500


def test_prepared_id_through_tracing_and_warnings() -> None:
    c = conn()
    c.receive_client(prepare("SELECT * FROM shop.orders", 4, 1))
    warnings = struct.pack(">H", 1) + struct.pack(">H", 4) + b"warn"
    custom = struct.pack(">H", 1) + struct.pack(">H", 1) + b"k" + struct.pack(">i", -1)
    reply = prepared(QID, 4, 1, prefix=bytes(16) + warnings + custom, flags=0x02 | 0x08 | 0x04)
    assert c.receive_server(reply).to_client == reply
    assert c.receive_client(execute(QID, [], 4, 2)).to_server


def test_prepared_id_after_long_warnings_in_pieces() -> None:
    c = conn()
    c.receive_client(prepare("SELECT * FROM shop.orders", 4, 1))
    warnings = struct.pack(">H", 1) + struct.pack(">H", 6000) + b"w" * 6000
    reply = prepared(QID, 4, 1, prefix=warnings, flags=0x08)
    out = Output()
    for i in range(0, len(reply), 1000):
        out = out + c.receive_server(reply[i:i + 1000])
        assert out.to_client in (b"", reply)  # held whole: the parser reads it
    assert out.to_client == reply
    assert c.receive_client(execute(QID, [], 4, 2)).to_server


def test_execute_is_checked_against_what_was_prepared() -> None:
    """A prepared statement keeps the keyspace it was prepared in, and policy is checked again."""
    c = conn()
    c.receive_client(query("USE shop", 4, 1))
    c.receive_server(set_keyspace("shop", 4, 1))
    c.receive_client(prepare("SELECT * FROM orders", 4, 2))
    c.receive_server(prepared(QID, 4, 2))
    c.receive_client(query("USE other", 4, 3))
    c.receive_server(set_keyspace("other", 4, 3))
    out = c.receive_client(execute(QID, [], 4, 4))
    assert out.to_server and out.records[0].summary["query_table"] == "shop.orders"


def test_prepared_ids_are_bounded() -> None:
    c = conn(max_prepared=2)
    ids = [bytes([i]) * 16 for i in range(3)]
    for i, qid in enumerate(ids):
        c.receive_client(prepare("SELECT * FROM shop.orders", 4, i))
        c.receive_server(prepared(qid, 4, i))
    assert decode_reply(c.receive_client(execute(ids[0], [], 4, 9)).to_client)[2].error_code == 0x2500
    assert c.receive_client(execute(ids[2], [], 4, 10)).to_server


# -- batches ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3, 4])
def test_batch_passes_only_whole(version: int) -> None:
    c = conn()
    c.receive_client(prepare("INSERT INTO shop.orders (k) VALUES (?)", version, 1))
    c.receive_server(prepared(QID, version, 1))
    good = batch(["INSERT INTO shop.orders (k) VALUES (?)", QID], version, 2)
    out = c.receive_client(good)
    assert out.to_server == good
    assert dict(out.records[0].summary) == {"opcode": "BATCH", "query_action": "insert,insert",
                                            "query_table": "shop.orders,shop.orders", "stream": "2"}
    bad = batch(["INSERT INTO shop.orders (k) VALUES (?)", QID, "INSERT INTO shop.secrets (k) VALUES (?)"],
                version, 3)
    out = c.receive_client(bad)
    assert_unauthorized(out, version, 3)
    assert out.records[0].summary["query_table"] == "shop.orders,shop.orders,shop.secrets"


def test_batch_with_a_denied_prepared_statement() -> None:
    c = conn()
    c.receive_client(query("USE shop", 4, 1))
    c.receive_server(set_keyspace("shop", 4, 1))
    out = c.receive_client(prepare("INSERT INTO secrets (k) VALUES (?)", 4, 2))
    assert_unauthorized(out, 4, 2)  # so it never gets an id; one of another connection is unknown here
    out = c.receive_client(batch(["INSERT INTO orders (k) VALUES (?)", QID], 4, 3))
    assert decode_reply(out.to_client)[2].info == QID


def test_batch_with_an_unclassifiable_statement_is_denied() -> None:
    out = conn().receive_client(batch(["INSERT INTO shop.orders (k) VALUES (?)", "FROB shop.orders"], 4, 3))
    assert_unauthorized(out, 4, 3)
    assert "cannot classify" in out.records[0].decision.reason


def test_begin_batch_in_a_query_string() -> None:
    c = conn()
    ok = query("BEGIN BATCH INSERT INTO shop.orders (k) VALUES (1); INSERT INTO shop.orders (k) VALUES (2); "
               "APPLY BATCH", 4, 1)
    assert c.receive_client(ok).to_server == ok
    bad = query("BEGIN BATCH INSERT INTO shop.orders (k) VALUES (1) DELETE FROM shop.orders WHERE k = 1 "
                "APPLY BATCH", 4, 2)
    assert_unauthorized(c.receive_client(bad), 4, 2)


# -- keyspace -----------------------------------------------------------------------------------


def test_use_sets_the_keyspace_once_the_server_agrees() -> None:
    c = conn()
    out = c.receive_client(query("USE shop", 4, 1))
    assert out.to_server and out.records[0].summary["query_action"] == "use"
    # unanswered: the server may run the next statement in either keyspace, so both must be allowed
    out = c.receive_client(query("SELECT * FROM orders", 4, 2))
    assert out.records[0].summary["query_table"] == ".orders,shop.orders"
    assert not out.records[0].decision.allowed
    c.receive_server(set_keyspace("shop", 4, 1))
    assert c.keyspace == "shop"
    out = c.receive_client(query("SELECT * FROM orders", 4, 3))
    assert out.to_server and out.records[0].summary["query_table"] == "shop.orders"
    assert_unauthorized(c.receive_client(query("INSERT INTO secrets (k) VALUES (1)", 4, 4)), 4, 4)


def test_failed_use_keeps_the_keyspace() -> None:
    c = conn()
    c.receive_client(query("USE shop", 4, 1))
    c.receive_server(set_keyspace("shop", 4, 1))
    c.receive_client(query('USE "Nope"', 4, 2))
    c.receive_server(server_error(0x2200, "Keyspace 'Nope' does not exist", 4, 2))
    assert c.keyspace == "shop"
    assert c.receive_client(query("SELECT * FROM orders", 4, 3)).records[0].summary["query_table"] == "shop.orders"


def test_set_keyspace_from_an_executed_use() -> None:
    c = conn()
    c.receive_client(prepare("USE shop", 4, 1))
    c.receive_server(prepared(QID, 4, 1))
    assert c.receive_client(execute(QID, [], 4, 2)).to_server
    c.receive_server(set_keyspace("shop", 4, 2))
    assert c.keyspace == "shop"


def test_use_is_never_denied() -> None:
    check = deny_all()
    c = conn(check)
    out = c.receive_client(query("USE anything", 4, 1))
    assert out.to_server and out.records[0].decision.allowed and "use" in out.records[0].decision.reason
    assert check.seen == []  # type: ignore[attr-defined]


def test_unclassifiable_statements_are_denied_not_passed() -> None:
    for text in ("SELECT * FROM t WHERE a = 'oops", "DROP TABLE shop.orders; SELECT * FROM shop.orders",
                 "CALL something()"):
        out = conn(lambda _r: Decision(True)).receive_client(query(text, 4, 1))
        assert_unauthorized(out, 4, 1)
        assert "cannot classify" in out.records[0].decision.reason


# -- framing ------------------------------------------------------------------------------------


def test_pipelined_frames_in_one_chunk() -> None:
    c = conn()
    frames = [query("SELECT * FROM shop.orders", 4, i) if i % 2 == 0 else query("SELECT * FROM shop.secrets", 4, i)
              for i in range(10)]
    out = c.receive_client(b"".join(frames))
    assert out.to_server == b"".join(frames[::2])
    assert [decode_reply(out.to_client[i * 35:(i + 1) * 35])[1] for i in range(5)] == [1, 3, 5, 7, 9]
    assert [r.summary["stream"] for r in out.records] == [str(i) for i in range(10)]


def test_partial_frames_are_held_until_whole() -> None:
    c = conn()
    data = query("SELECT * FROM shop.orders", 4, 1)
    for i in range(len(data) - 1):
        assert c.receive_client(data[i:i + 1]) == Output()
    assert c.receive_client(data[-1:]).to_server == data


@pytest.mark.parametrize("junk", [
    struct.pack(">BBhBi", 4, 0, 0, 0x07, -1),  # negative length
    struct.pack(">BBhBi", 4, 0, 0, 0x07, (256 << 20) + 1),  # over the protocol's limit
    frame(4, 0, 0x07, struct.pack(">i", 100) + b"short", response=False),  # long string past the body
    frame(4, 0, 0x07, query("SELECT * FROM shop.orders")[9:] + b"extra", response=False),  # bytes left over
    frame(4, 0, 0x07, query("SELECT * FROM shop.orders")[9:-1], response=False),  # no flags byte
    frame(4, 0, 0x07, struct.pack(">i", 2) + b"\xff\xfe\x00\x01\x00", response=False),  # not UTF-8
    frame(4, 0, 0x0A, struct.pack(">H", 20) + b"id", response=False),  # short bytes past the body
    frame(4, 0, 0x0D, b"\x07\x00\x00\x00\x01\x00", response=False),  # batch type 7
    frame(4, 0, 0x0D, b"\x00\x00\x01\x02", response=False),  # batch kind 2
    frame(4, 0, 0x07, query("SELECT 1", 4, values=[b"x"])[9:-6] + struct.pack(">i", -3) + b"\x00", response=False),
])
def test_unparseable_client_frames_are_protocol_errors(junk: bytes) -> None:
    c = conn()
    with pytest.raises(ProtocolError) as e:
        c.receive_client(junk)
    assert e.value.side == "client"
    with pytest.raises(ProtocolError):  # a failed connection stays failed
        c.receive_client(query("SELECT * FROM shop.orders"))


def test_frames_over_max_buffer() -> None:
    c = conn(max_buffer=100)
    with pytest.raises(ProtocolError, match="limit"):
        c.receive_client(query("SELECT * FROM shop.orders WHERE k = '" + "x" * 100 + "'")[:9])
    c = conn(max_buffer=100)
    c.receive_client(prepare("SELECT * FROM shop.orders"))
    with pytest.raises(ProtocolError, match="limit"):
        c.receive_server(prepared(b"x" * 200))


def test_stream_reuse_while_unanswered_is_a_protocol_error() -> None:
    c = conn()
    c.receive_client(query("SELECT * FROM shop.orders", 4, 1))
    with pytest.raises(ProtocolError, match="stream 1 reused"):
        c.receive_client(query("SELECT * FROM shop.orders", 4, 1))
    c = conn()
    c.receive_client(query("SELECT * FROM shop.orders", 4, 1))
    c.receive_server(void(4, 1))
    assert c.receive_client(query("SELECT * FROM shop.orders", 4, 1)).to_server
    # a stream we answered ourselves is free at once
    c = conn()
    assert c.receive_client(query("SELECT * FROM shop.secrets", 4, 2)).to_client
    assert c.receive_client(query("SELECT * FROM shop.orders", 4, 2)).to_server


def test_end_of_stream() -> None:
    c = conn()
    assert c.receive_client(b"") == Output()
    with pytest.raises(ProtocolError, match="after the end"):
        c.receive_client(options())
    c = conn()
    c.receive_client(options()[:4])
    with pytest.raises(ProtocolError, match="inside a frame"):
        c.receive_client(b"")
    c = conn()
    c.receive_server(rows(100)[:20])
    with pytest.raises(ProtocolError, match="inside a frame"):
        c.receive_server(b"")
    c = conn()
    c.receive_server(b"")
    with pytest.raises(ProtocolError, match="after the end"):
        c.receive_server(ready())


# -- server frames ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3, 4])
def test_server_frames_pass_unchanged(version: int) -> None:
    c = conn()
    c.receive_client(options(version, 0) + startup(version, 1) + query("SELECT * FROM shop.orders", version, 2))
    frames = supported(version, 0) + ready(version, 1) + rows(10, version, 2) + event(version)
    out = c.receive_server(frames)
    assert out == Output(to_client=frames)


def test_big_server_frames_stream_and_denials_wait_for_their_end() -> None:
    c = conn(max_buffer=1000)
    c.receive_client(query("SELECT * FROM shop.orders", 4, 1))
    big = rows(5000, 4, 1)  # over max_buffer: streamed, not held
    out = c.receive_server(big[:2000])
    assert out.to_client == big[:2000]
    denied = c.receive_client(query("SELECT * FROM shop.secrets", 4, 2))
    assert denied.to_client == b"" and not denied.records[0].decision.allowed  # held: mid-frame
    out = c.receive_server(big[2000:4000])
    assert out.to_client == big[2000:4000]
    tail = void(4, 3)
    out = c.receive_server(big[4000:] + tail[:3])
    assert out.to_client[:len(big) - 4000] == big[4000:]
    _, stream, message = decode_reply(out.to_client[len(big) - 4000:])  # right after the frame, before tail
    assert stream == 2 and isinstance(message, UnauthorizedErrorMessage)
    # between server frames our replies go at once
    assert c.receive_client(query("SELECT * FROM shop.secrets", 4, 4)).to_client


@pytest.mark.parametrize("data", [
    b"\x04" + bytes(8),  # a request frame
    b"\x85" + bytes(8),  # a version we never let through
    frame(4, 0, 0x07, b""),  # QUERY is not a response
    frame(1, 0, 0x0E, b""),  # AUTH_CHALLENGE is not v1
    frame(4, 0, 0x08, b"\x00\x00"),  # RESULT without a kind
    frame(4, 0, 0x08, struct.pack(">iH", 4, 10) + b"short"),  # Prepared id past the body
    frame(4, 0, 0x08, struct.pack(">iH", 3, 10) + b"short"),  # Set_keyspace past the body
    struct.pack(">BBhBi", 0x84, 0, 0, 0x08, -5),
])
def test_unparseable_server_frames_are_protocol_errors(data: bytes) -> None:
    c = conn()
    c.receive_client(prepare("SELECT * FROM shop.orders", 4, 0))
    with pytest.raises(ProtocolError) as e:
        c.receive_server(data)
    assert e.value.side == "server"


# -- whole, byte by byte, and with junk after it --------------------------------------------------

Step = tuple[str, bytes]

FIXTURES: dict[str, list[Step]] = {
    "v4 handshake": [
        ("client", options(4, 0)), ("server", supported(4, 0)),
        ("client", startup(4, 1)), ("server", ready(4, 1)),
        ("client", register(4, 2)), ("server", ready(4, 2)),
        ("client", query("SELECT * FROM system.local WHERE key='local'", 4, 3) + query("SELECT * FROM system.peers",
                                                                                    4, 4)),
        ("server", rows(3, 4, 4) + rows(7, 4, 3) + event(4)),
    ],
    "v4 prepare, execute, batch": [
        ("client", prepare("INSERT INTO shop.orders (k) VALUES (?)", 4, 1)), ("server", prepared(QID, 4, 1)),
        ("client", execute(QID, [b"a"], 4, 2) + execute(b"other", [], 4, 3)), ("server", void(4, 2)),
        ("client", batch([QID, "INSERT INTO shop.orders (k) VALUES (?)"], 4, 4)), ("server", void(4, 4)),
        ("client", batch([QID, "INSERT INTO shop.secrets (k) VALUES (?)"], 4, 5)),
    ],
    "v3 use and unqualified tables": [
        ("client", query("USE shop", 3, 1)), ("server", set_keyspace("shop", 3, 1)),
        ("client", query("INSERT INTO orders (k) VALUES ('a')", 3, 2)), ("server", void(3, 2)),
        ("client", query("SELECT * FROM secrets", 3, 3)),
    ],
    "v2 batch": [
        ("client", batch(["INSERT INTO shop.orders (k) VALUES (?)"], 2, 1)), ("server", void(2, 1)),
        ("client", batch(["DELETE FROM shop.orders WHERE k = ?"], 2, 2)),
    ],
    "v1 as Cassandra 1.2": [
        ("client", options(1, 0)), ("server", supported(1, 0)),
        ("client", startup(1, 1)), ("server", ready(1, 1)),
        ("client", prepare("SELECT * FROM shop.orders WHERE k = ?", 1, 2)), ("server", prepared(QID, 1, 2)),
        ("client", execute(QID, [b"k"], 1, 3) + query("SELECT * FROM shop.secrets", 1, 4)),
        ("server", rows(20, 1, 3)),
    ],
    "refusals": [
        ("client", frame(0x42, 0, 0x05, b"", response=False)),
        ("client", frame(0x41, 0, 0x05, b"", response=False)),
        ("client", frame(5, 0, 0x05, b"", response=False)),
    ],
    "compression": [
        ("client", startup(4, 0, COMPRESSION="snappy")),
        ("client", frame(4, 1, 0x07, b"\x01\x02", flags=0x01, response=False)),
        ("client", startup(4, 2)), ("server", ready(4, 2)),
    ],
}

JUNK = [b"\xffjunk", b"\x09", b"\x04\x00\x00\x00\x33\x00\x00\x00\x00", b"\x04\x00\x00\x00\x07\x80\x00\x00\x00"]


def run(steps: list[Step], split: Callable[[bytes], list[bytes]]) -> tuple[list[Output], CassandraConnection]:
    c = conn()
    outs = []
    for side, data in steps:
        receive = c.receive_client if side == "client" else c.receive_server
        out = Output()
        for piece in split(data):
            out = out + receive(piece)
        outs.append(out)
    return outs, c


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_whole_bytewise_and_with_junk(name: str) -> None:
    steps = FIXTURES[name]
    expected, _ = run(steps, whole)
    got, _ = run(steps, bytewise)
    assert got == expected
    assert any(out.records for out in expected)
    for out in expected:  # every forwarded byte is a complete client frame
        assert out.to_server in b"".join(d for s, d in steps if s == "client")
    for junk in JUNK:
        _, c = run(steps, whole)
        with pytest.raises(ProtocolError) as e:
            c.receive_client(junk + bytes(16))
        assert e.value.side == "client"


def test_cilium_example_policy() -> None:
    """examples/cilium/cass-sw-security-policy.yaml, unchanged."""
    from helpers import cilium_examples_dir

    text = (cilium_examples_dir() / "cass-sw-security-policy.yaml").read_text()
    outpost = conn(check_from_policy(text, "app=empire-outpost", "app=cass-server", 9042))
    hq = conn(check_from_policy(text, "app=empire-hq", "app=cass-server", 9042))
    allowed = [query("SELECT * FROM system.local", 4, 1), query("SELECT * FROM system_schema.tables", 4, 2),
               query("INSERT INTO attendance.daily_records (a) VALUES ('x')", 4, 3)]
    denied = [query("SELECT * FROM attendance.daily_records", 4, 4), query("DROP TABLE attendance.daily_records", 4, 5),
              query("INSERT INTO deathstar.scrum_notes (a) VALUES ('x')", 4, 6)]
    assert outpost.receive_client(b"".join(allowed)).to_server == b"".join(allowed)
    out = outpost.receive_client(b"".join(denied))
    assert out.to_server == b"" and [decode_reply(out.to_client[i * 35:(i + 1) * 35])[1] for i in range(3)] == [4, 5, 6]
    assert hq.receive_client(b"".join(allowed + denied)).to_server == b"".join(allowed + denied)


def test_named_values_serial_consistency_and_flags_per_version() -> None:
    text = "SELECT * FROM shop.orders WHERE k = :k"
    head = struct.pack(">i", len(text)) + text.encode() + struct.pack(">H", 1)
    named = head + b"\x41" + struct.pack(">H", 1) + struct.pack(">H", 1) + b"k" + struct.pack(">i", 1) + b"v"
    for version in (3, 4):
        data = frame(version, 0, 0x07, named, response=False)
        assert conn().receive_client(data).to_server == data
    with pytest.raises(ProtocolError, match="query flags 0x41 not defined in protocol v2"):
        conn().receive_client(frame(2, 0, 0x07, named, response=False))
    with pytest.raises(ProtocolError, match="negative"):
        conn().receive_client(frame(4, 0, 0x07, struct.pack(">i", -1) + bytes(3), response=False))
    from cassandra.protocol import BatchMessage
    from cassandra.query import BatchType

    msg = BatchMessage(BatchType.UNLOGGED, [(False, "INSERT INTO shop.orders (k) VALUES (1)", [])], 1,
                       serial_consistency_level=8, timestamp=5)
    data = encode(msg, 4, 1)
    assert conn().receive_client(data).to_server == data
    with pytest.raises(ProtocolError, match="batch flags 0x01"):
        conn().receive_client(frame(4, 1, 0x0D, data[9:-11] + b"\x01", response=False))  # flags 0x01, nothing after


def test_driver_encodes_what_we_parse() -> None:
    """Sanity for the fixtures: the driver writes named values with flag 0x40 and a timestamp."""
    from cassandra.protocol import QueryMessage

    msg = QueryMessage("SELECT * FROM shop.orders", 1, timestamp=123, fetch_size=10, paging_state=b"p",
                       serial_consistency_level=8)
    msg.query_params = [b"a", None]
    data = encode(msg, 4, 1)
    assert conn().receive_client(data).to_server == data

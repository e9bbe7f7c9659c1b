"""Hypothesis against CassandraConnection: whatever the bytes and however they are split, only
ProtocolError escapes, and what reaches the server is always whole allowed frames."""

from __future__ import annotations

import struct

from tests.l7parsers.cassandra_support import (
    SHOP_POLICY,
    batch,
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
    set_keyspace,
    startup,
    void,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.l7parsers.byte_feed import cut, feed
from tests.l7parsers.policy_support import check_from_policy

from cilia.l7parsers.base import Output, ProtocolError
from cilia.l7parsers.cassandra import CassandraConnection

CHECK = check_from_policy(SHOP_POLICY, "app=shop-frontend", "app=shop-db", 9042)
QID = b"q" * 16


def _client_pool(version: int) -> list[tuple[bytes, bool]]:
    """(frame on stream 0, forwarded?) for a fresh connection; the stream is rewritten per use."""
    pool = [
        (options(version), True), (startup(version), True), (register(version), True),
        (query("SELECT * FROM shop.orders WHERE k = 'FROM shop.secrets'", version), True),
        (query("INSERT INTO shop.orders (k) VALUES (1) -- shop.secrets", version), True),
        (query("SELECT * FROM shop.secrets", version), False),
        (query("SELECT * FROM \"shop\".orders; DROP TABLE shop.orders", version), False),
        (prepare("SELECT * FROM shop.orders", version), True),
        (prepare("DELETE FROM shop.orders WHERE k = ?", version), False),
        (execute(QID, [b"x"], version), False),  # never prepared here: Unprepared
        (startup(version, COMPRESSION="lz4"), False),
        (frame(version, 0, 0x07, b"\x00\x01", flags=0x01, response=False), False),  # compressed
    ]
    if version >= 2:
        pool += [(batch(["INSERT INTO shop.orders (k) VALUES (?)"] * 2, version), True),
                 (batch(["INSERT INTO shop.orders (k) VALUES (?)", "UPDATE shop.secrets SET v = ? WHERE k = 1"],
                        version), False)]
    return pool


POOLS = {v: _client_pool(v) for v in (1, 2, 3, 4)}


def with_stream(data: bytes, stream: int) -> bytes:
    if data[0] in (1, 2):
        return data[:2] + struct.pack(">b", stream) + data[3:]
    return data[:2] + struct.pack(">h", stream) + data[4:]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
def test_random_client_bytes(data: bytes, cuts: list[int]) -> None:
    c = CassandraConnection(CHECK)
    try:
        out = feed(c, cut(data, cuts))
    except ProtocolError as e:
        assert e.side == "client"
        return
    assert data.startswith(out.to_server)  # a prefix of the input at most, never a byte made up


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=10))
def test_random_server_bytes(data: bytes, cuts: list[int]) -> None:
    c = CassandraConnection(CHECK)
    c.receive_client(prepare("SELECT * FROM shop.orders", 4, 0))
    try:
        out = feed(c, cut(data, cuts), "server")
    except ProtocolError as e:
        assert e.side == "server"
        return
    assert out.to_client == data[:len(out.to_client)]


@settings(max_examples=150, deadline=None)
@given(st.sampled_from([1, 2, 3, 4]), st.data())
def test_random_splits_of_valid_streams(version: int, data: st.DataObject) -> None:
    pool = POOLS[version]
    picks = data.draw(st.lists(st.integers(0, len(pool) - 1), min_size=1, max_size=12))
    frames = [(with_stream(pool[i][0], n), pool[i][1]) for n, i in enumerate(picks)]
    junk_at = data.draw(st.none() | st.integers(0, len(frames)))
    junk = data.draw(st.sampled_from([b"\x99", b"\x00", b"\x07\x00", struct.pack(">BBhBi", version, 0, 99, 0x33, 0),
                                      struct.pack(">BBhBi", version if version > 2 else 3, 0, 99, 0x07, -7)]))
    stream = b"".join(f for f, _ in frames)
    if junk_at is not None:
        offset = sum(len(f) for f, _ in frames[:junk_at])
        stream = stream[:offset] + junk + bytes(12) + stream[offset:]
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=20))
    c = CassandraConnection(CHECK)
    out = Output()
    points = sorted(set(cuts) | {0, len(stream)})
    try:
        for a, b in zip(points, points[1:]):
            out = out + c.receive_client(stream[a:b])
    except ProtocolError as e:
        assert junk_at is not None and e.side == "client"
        before = frames[:junk_at]
        # everything forwarded is whole allowed frames from before the junk, in order
        allowed = [f for f, ok in before if ok]
        assert any(out.to_server == b"".join(allowed[:k]) for k in range(len(allowed) + 1))
        return
    assert junk_at is None, "junk was accepted"
    assert out.to_server == b"".join(f for f, ok in frames if ok)
    assert len(out.records) == len(frames)
    assert [r.decision.allowed for r in out.records] == [ok for _, ok in frames]


SERVER_POOL = [ready(4, 1), void(4, 2), rows(50, 4, 3), event(4), set_keyspace("shop", 4, 4), prepared(QID, 4, 5),
               void(4, 6, prefix=bytes(16), flags=0x02)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(SERVER_POOL), min_size=1, max_size=10), st.lists(st.integers(0, 2000), max_size=20),
       st.integers(60, 2000))  # a Prepared RESULT (51 bytes) is held whole; Rows stream
def test_server_frames_pass_unchanged_however_split(frames: list[bytes], cuts: list[int], limit: int) -> None:
    c = CassandraConnection(CHECK, max_buffer=limit)
    c.receive_client(prepare("SELECT * FROM shop.orders", 4, 5))
    data = b"".join(frames)
    out = feed(c, cut(data, cuts), "server")
    assert out.to_client == data


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.binary(max_size=40) | st.sampled_from(
    [options(4), query("USE shop", 4, 1), set_keyspace("shop", 4, 1), prepare("SELECT * FROM orders", 4, 2),
     prepared(QID, 4, 2), execute(QID, [], 4, 3), void(4, 3), rows(5, 4, 9)])), max_size=12))
def test_interleaved_sides_only_protocol_error_escapes(steps: list[tuple[bool, bytes]]) -> None:
    c = CassandraConnection(CHECK)
    for is_client, data in steps:
        try:
            (c.receive_client if is_client else c.receive_server)(data)
        except ProtocolError:
            return

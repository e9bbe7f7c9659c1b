"""The Cassandra fast path against the general parser: every frame-by-frame parser test runs again
with ``FastCassandraConnection`` in place of ``CassandraConnection``, and Hypothesis feeds both
the same sessions (every protocol version; queries allowed, denied, unclassifiable and USE;
PREPARE, EXECUTE of known and unknown ids, BATCH; answers of every kind on right and wrong
streams; frames whole, cut and glued, some damaged) and wants the same bytes to each side, the
same records and the same errors, also across a policy change."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from tests.l7parsers import test_cassandra_connection as general
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.l7parsers.cassandra_support import (
    SHOP_POLICY,
    batch,
    event,
    execute,
    prepare,
    prepared,
    query,
    ready,
    rows,
    server_error,
    set_keyspace,
    startup,
    void,
)
from tests.l7parsers.policy_support import check_from_policy
from tests.l7parsers.test_cassandra_connection import *  # noqa: F403 (every general test, collected again here)

from cilia.l7parsers.base import Check, L7Connection, Output, ProtocolError
from cilia.l7parsers.cassandra import CassandraConnection
from cilia.l7parsers.cassandra_fast import FastCassandraConnection


def fast_conn(check: Check = general.CHECK, **kwargs: int) -> FastCassandraConnection:
    return FastCassandraConnection(check, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def _fast_connections() -> Iterator[None]:
    saved = general.conn
    general.conn = fast_conn  # type: ignore[assignment]
    yield
    general.conn = saved


SHOP = general.CHECK
ORDERS_ONLY = check_from_policy(SHOP_POLICY.replace("^system(_schema)?\\\\.", "^nothing$"), "app=shop-frontend",
                                "app=shop-db", 9042)
TEXTS = ["SELECT * FROM shop.orders", "SELECT key FROM system.local", "INSERT INTO shop.orders (a) VALUES (1)",
         "SELECT * FROM orders", "DELETE FROM shop.orders WHERE a = 1", "USE shop", "USE other",
         "SELECT * FROM shop.secrets", "CREATE TABLE shop.t (a int PRIMARY KEY)", "not cql at all",
         "BEGIN BATCH INSERT INTO shop.orders (a) VALUES (1); APPLY BATCH"]
IDS = [b"\x01" * 16, b"\x02" * 16, b"\x03" * 4]


def _client_frame(version: int, stream: int, rnd: random.Random) -> bytes:
    kind = rnd.randrange(6)
    if kind <= 1:
        return query(rnd.choice(TEXTS), version, stream)
    if kind == 2:
        return prepare(rnd.choice(TEXTS), version, stream)
    if kind == 3:
        return execute(rnd.choice(IDS), [b"v"] if rnd.random() < 0.5 else None, version, stream)
    if kind == 4 and version >= 2:
        return batch([rnd.choice(TEXTS + IDS) for _ in range(rnd.randint(1, 3))], version, stream)
    return query(rnd.choice(TEXTS), version, stream, fetch_size=rnd.choice([None, 100]) if version >= 2 else None,
                 timestamp=rnd.choice([None, 1700000000]) if version >= 3 else None)


def _server_frame(version: int, stream: int, rnd: random.Random) -> bytes:
    kind = rnd.randrange(7)
    if kind == 0:
        return set_keyspace(rnd.choice(["shop", "other"]), version, stream)
    if kind == 1:
        return prepared(rnd.choice(IDS), version, stream)
    if kind == 2:
        return void(version, stream)
    if kind == 3:
        return server_error(0x2200, "no", version, stream)
    if kind == 4 and version >= 2:
        return event(version)
    return rows(rnd.randint(0, 40), version, stream)


def _damaged(data: bytes, rnd: random.Random) -> bytes:
    out = bytearray(data)
    at = rnd.randrange(len(out))
    out[at] = rnd.choice([0x00, 0x01, 0x02, 0x7F, 0x80, 0xFF, rnd.randrange(256)])
    return bytes(out)


def _run(conn: L7Connection, events: list[tuple[str, bytes]]) -> list[Output | str]:
    out: list[Output | str] = []
    for side, data in events:
        if side == "p":  # a policy change, as the host makes one
            conn.check = ORDERS_ONLY
            continue
        try:
            out.append(conn.receive_client(data) if side == "c" else conn.receive_server(data))
        except ProtocolError as e:
            out.append(f"error: {e}")
    return out


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([1, 2, 3, 4]), st.integers(0, 1 << 30), st.integers(1, 24))
def test_same_as_the_general_parser(version: int, seed: int, steps: int) -> None:
    rnd = random.Random(seed)
    events: list[tuple[str, bytes]] = [("c", startup(version, 0)), ("s", ready(version, 0))]
    outstanding: list[int] = []
    for _ in range(steps):
        roll = rnd.random()
        if roll < 0.45:  # a request, on a fresh stream (sometimes one in use)
            stream = rnd.choice(outstanding) if outstanding and rnd.random() < 0.05 else rnd.randint(1, 100)
            events.append(("c", _client_frame(version, stream, rnd)))
            outstanding.append(stream)
        elif roll < 0.9:  # an answer, mostly to an outstanding stream
            stream = outstanding.pop(rnd.randrange(len(outstanding))) if outstanding and rnd.random() < 0.9 \
                else rnd.randint(1, 100)
            events.append(("s", _server_frame(version, stream, rnd)))
        elif roll < 0.93:
            events.append(("p", b""))
        else:  # something damaged, from either side
            side = rnd.choice("cs")
            good = _client_frame(version, 7, rnd) if side == "c" else _server_frame(version, 7, rnd)
            events.append((side, _damaged(good, rnd)))
    chunks: list[tuple[str, bytes]] = []
    at = 0
    while at < len(events):  # TCP reads: most whole, some cut, some glued to the next
        side, payload = events[at]
        roll = rnd.random()
        if side != "p" and roll < 0.1 and len(payload) > 1:
            cut = rnd.randrange(1, len(payload))
            chunks += [(side, payload[:cut]), (side, payload[cut:])]
        elif side != "p" and roll < 0.2 and at + 1 < len(events) and events[at + 1][0] == side:
            chunks.append((side, payload + events[at + 1][1]))
            at += 1
        else:
            chunks.append((side, payload))
        at += 1
    assert _run(FastCassandraConnection(SHOP), chunks) == _run(CassandraConnection(SHOP), chunks)


@pytest.mark.parametrize("version", [1, 3, 4])
def test_a_remembered_statement_meets_the_session_keyspace(version: int) -> None:
    # the same unqualified statement, allowed in one keyspace, denied once the session moved on
    events = [("c", startup(version, 0)), ("s", ready(version, 0))]
    for stream, keyspace in ((1, "shop"), (3, "other")):
        events += [("c", query(f"USE {keyspace}", version, stream)), ("s", set_keyspace(keyspace, version, stream)),
                   ("c", query("SELECT * FROM orders", version, stream + 1)), ("s", rows(1, version, stream + 1))]
    fast = _run(FastCassandraConnection(SHOP), events)
    assert fast == _run(CassandraConnection(SHOP), events)
    allowed, denied = fast[4], fast[8]
    assert isinstance(allowed, Output) and allowed.records[0].summary["query_table"] == "shop.orders"
    assert isinstance(denied, Output) and not denied.records[0].decision.allowed and not denied.to_server


def test_the_common_shape_takes_the_fast_path() -> None:
    conn = FastCassandraConnection(SHOP)
    conn.receive_client(startup(1, 0))
    conn.receive_server(ready(1, 0))
    request, response = query("SELECT key FROM system.local", 1, 1), rows(20, 1, 1)
    for _ in range(2):  # the second time from the memos
        out = conn.receive_client(request)
        assert out.to_server == request and out.records[0].decision.allowed
        assert conn.receive_server(response).to_client == response
    assert not conn._client_buf and not conn._server_buf and not conn._in_flight
    assert len(conn._classified) == 1 and len(conn._decided) == 1


def test_the_general_tests_here_run_on_the_fast_path() -> None:
    assert isinstance(general.conn(), FastCassandraConnection)

"""The memcache fast path against the general parser: every text-protocol parser test runs again
with ``FastMemcacheConnection`` in place of ``MemcacheConnection``, and Hypothesis feeds both the
same pipelined, split and interleaved streams (gets and sets in the fast shape, other commands,
replies of every kind) and wants the same bytes to each side, the same records and the same
errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import test_memcache_text as general
from hypothesis import given, settings
from hypothesis import strategies as st
from memcache_support import ALLOW_ALL, example_check
from test_memcache_text import *  # noqa: F403 (every general test, collected again here)

from cilia.l7parsers.base import Check, L7Connection, Output, ProtocolError
from cilia.l7parsers.memcache import MemcacheConnection
from cilia.l7parsers.memcache_fast import FastMemcacheConnection


def fast_conn(check: Check = ALLOW_ALL, **kwargs: Any) -> FastMemcacheConnection:
    return FastMemcacheConnection(check, **kwargs)


@pytest.fixture(autouse=True, scope="module")
def _fast_connections() -> Iterator[None]:
    saved = general.conn
    general.conn = fast_conn  # type: ignore[assignment]
    yield
    general.conn = saved


A_WING = example_check("app=a-wing")
KEYS = ["awing-coord", "xwing-coord", "k", "bench-key"]
requests = st.one_of(
    st.builds(lambda k: f"get {k}\r\n".encode(), st.sampled_from(KEYS)),
    st.builds(lambda k, v: f"set {k} 0 0 {len(v)}\r\n".encode() + v + b"\r\n", st.sampled_from(KEYS),
              st.binary(max_size=8)),
    st.sampled_from([b"get a b\r\n", b"delete awing-coord\r\n", b"gets awing-coord\r\n", b"version\r\n",
                     b"set awing-coord 0 0 1 noreply\r\nx\r\n", b"mn\r\n", b"get  awing-coord\r\n"]),
)
replies = st.sampled_from([b"END\r\n", b"VALUE awing-coord 0 3\r\nabc\r\nEND\r\n", b"STORED\r\n", b"NOT_STORED\r\n",
                           b"DELETED\r\n", b"VERSION 1.6.18\r\n", b"MN\r\n", b"SERVER_ERROR out of memory\r\n",
                           b"VALUE awing-coord 0 3 9\r\nabc\r\nEND\r\n", b"VALUE x 0 1\r\nab\r\nEND\r\n", b"junk\r\n"])


def _run(conn: L7Connection, events: list[tuple[str, bytes]]) -> list[Output | str]:
    out: list[Output | str] = []
    for side, data in events:
        try:
            out.append(conn.receive_client(data) if side == "c" else conn.receive_server(data))
        except ProtocolError as e:
            out.append(f"error: {e}")
    return out


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("cs"), st.one_of(requests, replies, st.binary(max_size=6))), max_size=14),
       st.data())
def test_same_as_the_general_parser(events: list[tuple[str, bytes]], data: st.DataObject) -> None:
    # side "c" sends requests; "s" replies; chunks are sometimes split or glued, as TCP reads are
    chunks: list[tuple[str, bytes]] = []
    for side, payload in events:
        if payload and data.draw(st.booleans()):
            cut = data.draw(st.integers(0, len(payload)))
            chunks += [(side, payload[:cut]), (side, payload[cut:])]
        else:
            chunks.append((side, payload))
    assert _run(FastMemcacheConnection(A_WING), chunks) == _run(MemcacheConnection(A_WING), chunks)


def test_the_common_shape_takes_the_fast_path() -> None:
    c = FastMemcacheConnection(A_WING)
    assert c.receive_client(b"get awing-coord\r\n").to_server == b"get awing-coord\r\n"
    assert c.receive_server(b"VALUE awing-coord 0 3\r\nabc\r\nEND\r\n").to_client.endswith(b"END\r\n")
    assert c.receive_client(b"get xwing-coord\r\n").to_client == general.DENIED
    assert c.receive_client(b"set awing-coord 0 0 1\r\nx\r\n").to_server
    assert c.receive_server(b"STORED\r\n").to_client == b"STORED\r\n"
    assert c._full is None  # never needed the general parser
    c.receive_client(b"get a")  # a partial request: the general parser has it from here
    assert c._full is not None and c.dialect == "text"


def test_the_general_tests_here_run_on_the_fast_path() -> None:
    assert isinstance(general.conn(), FastMemcacheConnection)

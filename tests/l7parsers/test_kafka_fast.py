"""The Kafka fast path against the general parser: every Kafka parser test runs again with
``FastKafkaConnection`` in place of ``KafkaConnection``; Hypothesis makes requests of every
version the fast reader knows (and others), from random field values, and damages some of them,
and wants the reader to find exactly what the general parser finds (or to leave the frame to
it); streams of such requests and responses, whole or cut, give the same bytes, records and
errors through both."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from tests.l7parsers import test_kafka_parser as general
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.l7parsers.kafka_support import kafka_policy, kp_request, kp_response, sample
from tests.l7parsers.test_kafka_parser import *  # noqa: F403 (every general test, collected again here)

from cilia.l7parsers import kafka_schema as schema
from cilia.l7parsers.base import Check, L7Connection, Output, ProtocolError
from cilia.l7parsers.kafka import KafkaConnection
from cilia.l7parsers.kafka_codec import CodecError, decode_body, decode_request_header, encode_body, \
    encode_request_header, frame
from cilia.l7parsers import kafka_fast
from cilia.l7parsers.kafka_fast import FastKafkaConnection, read_request
from cilia.l7parsers.kafka_schema import Field, default_of
from cilia.l7parsers.kafka_topics import request_topics


@pytest.fixture(autouse=True, scope="module")
def _fast_connections() -> Iterator[None]:
    saved = general.KafkaConnection
    general.KafkaConnection = FastKafkaConnection  # type: ignore[misc]
    yield
    general.KafkaConnection = saved  # type: ignore[misc]


FAST_VERSIONS = sorted(kafka_fast.FAST_VERSIONS)
OTHER_VERSIONS = [(0, 13), (1, 13), (1, 15), (2, 10), (3, 1), (3, 4), (3, 12), (8, 2), (9, 5)]
ALLOW_T1 = kafka_policy('- topic: "t1"\n')
TOPICS = ["t1", "t1", "t1", "t2", "", "grüß"]  # mostly allowed, so streams go on


def _request(api_key: int, version: int, seed: int, cid: int, client_id: str | None, tags: bool = True) -> bytes:
    """A request frame of random field values (topic names from ``TOPICS``, acks as clients set
    them; ``tags``: tagged fields too, where the version has them), encoded by the parser's own
    codec."""
    rnd = random.Random(seed)
    layout = schema.request_layout(api_key, version)
    assert layout is not None
    body = sample(layout.fields, rnd)
    _name_topics(body, rnd)
    if not tags:
        _untag(layout.fields, body)
    return frame(encode_request_header(api_key, version, cid, client_id, layout.flexible) + encode_body(layout, body))


def _name_topics(value: object, rnd: random.Random) -> None:
    if isinstance(value, list):
        for item in value:
            _name_topics(item, rnd)
    elif isinstance(value, dict):
        for key, item in value.items():
            if key in ("Name", "Topic") and isinstance(item, str):
                value[key] = rnd.choice(TOPICS)
            elif key == "Acks":
                value[key] = rnd.choice([-1, 0, 1])
            else:
                _name_topics(item, rnd)


def _untag(fields: tuple[Field, ...], value: object) -> None:
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict):
            continue
        for f in fields:
            if f.tag is not None:
                item[f.name] = default_of(f)
            elif f.struct:
                _untag(f.fields, item.get(f.name))


def _general_reading(data: bytes) -> tuple[int, int, int, str, tuple[str, ...], bool, bool] | str:
    """What the general parser finds in one whole frame: the fast reader's fields, or why not."""
    payload = data[4:]
    try:
        api_key, version = int.from_bytes(payload[:2], "big", signed=True), int.from_bytes(payload[2:4], "big")
        layout = schema.request_layout(api_key, version)
        if layout is None:
            return "no layout"
        header = decode_request_header(payload, layout.flexible)
        body = decode_body(layout, payload, header.body)
    except CodecError as e:
        return f"error: {e}"
    topics = request_topics(layout, body, {})
    named = isinstance(body.get("Topics"), list) and bool(body["Topics"])
    return (api_key, version, header.correlation_id, header.client_id or "", topics,
            not (api_key == 0 and body.get("Acks") == 0), named)


def _damaged(data: bytes, rnd: random.Random) -> bytes:
    """``data`` with a byte changed, a tail cut or bytes added, its size prefix kept right."""
    payload = bytearray(data[4:])
    how = rnd.randrange(3)
    if how == 0 and payload:
        payload[rnd.randrange(len(payload))] = rnd.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, rnd.randrange(256)])
    elif how == 1:
        del payload[rnd.randrange(len(payload) + 1):]
    else:
        payload += rnd.randbytes(rnd.randint(1, 4))
    return frame(bytes(payload))


@st.composite
def request_frames(draw: st.DrawFn, damage: bool = True) -> bytes:
    api_key, version = draw(st.sampled_from(FAST_VERSIONS + OTHER_VERSIONS))
    data = _request(api_key, version, draw(st.integers(0, 1 << 30)), draw(st.integers(-(1 << 31), (1 << 31) - 1)),
                    draw(st.sampled_from(["c", "", None, "grüß"])))
    if damage and draw(st.integers(0, 3)) == 0:
        data = _damaged(data, random.Random(draw(st.integers(0, 1 << 30))))
    return data


@settings(max_examples=1500, deadline=None)
@given(request_frames())
def test_the_reader_finds_what_the_parser_finds(data: bytes) -> None:
    fast = read_request(data)
    if fast is not None:  # the reader only answers for frames the parser reads, and alike
        assert fast == _general_reading(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(FAST_VERSIONS), st.integers(0, 1 << 30))
def test_the_reader_takes_every_plain_request_it_knows(key_version: tuple[int, int], seed: int) -> None:
    # every frame the parser reads (with a client id and no tagged field: those are left to the parser)
    data = _request(*key_version, seed, 7, "c", tags=False)
    assert not isinstance(_general_reading(data), str)
    assert read_request(data) == _general_reading(data)


def _run(conn: L7Connection, events: list[tuple[str, bytes]]) -> list[Output | str]:
    out: list[Output | str] = []
    for side, data in events:
        try:
            out.append(conn.receive_client(data) if side == "c" else conn.receive_server(data))
        except ProtocolError as e:
            out.append(f"error: {e}")
    return out


def _response_to(request: bytes, rnd: random.Random) -> bytes:
    """A response frame for ``request``'s correlation id (sometimes another id), of any size."""
    cid = int.from_bytes(request[8:12], "big")
    if rnd.random() < 0.1:
        cid = (cid + 1) & 0xFFFFFFFF
    return frame(cid.to_bytes(4, "big") + rnd.randbytes(rnd.randint(0, 12)))


@settings(max_examples=400, deadline=None)
@given(st.lists(request_frames(damage=False), min_size=1, max_size=6), st.data())
def test_same_as_the_general_parser(frames: list[bytes], data: st.DataObject) -> None:
    # requests one after the other, each answered (in order) or left outstanding; some cut in two
    rnd = random.Random(data.draw(st.integers(0, 1 << 30)))
    events: list[tuple[str, bytes]] = []
    outstanding: list[bytes] = []
    for f in frames:
        events.append(("c", f))
        outstanding.append(f)
        while outstanding and data.draw(st.booleans()):
            events.append(("s", _response_to(outstanding.pop(0), rnd)))
    chunks: list[tuple[str, bytes]] = []
    for side, payload in events:
        if data.draw(st.integers(0, 4)) == 0:
            cut = data.draw(st.integers(0, len(payload)))
            chunks += [(side, payload[:cut]), (side, payload[cut:])]
        else:
            chunks.append((side, payload))
    assert _run(FastKafkaConnection(ALLOW_T1), chunks) == _run(KafkaConnection(ALLOW_T1), chunks)


def test_the_common_shape_takes_the_fast_path() -> None:
    check: Check = ALLOW_T1
    conn = FastKafkaConnection(check)
    request = kp_request("ListOffsetsRequest", 1, 7, "bench", replica_id=-1, topics=[
        {"name": "t1", "partitions": [{"partition_index": 0, "timestamp": -1}]}])
    assert read_request(request) == (2, 1, 7, "bench", ("t1",), True, True)
    response = kp_response("ListOffsetsResponse", 1, 7, topics=[
        {"name": "t1", "partitions": [{"partition_index": 0, "error_code": 0, "timestamp": -1, "offset": 3}]}])
    assert conn.receive_client(request).to_server == request
    assert conn.receive_server(response).to_client == response
    assert not conn._requests and not conn._responses and not conn._pending  # no buffering was needed


def test_a_policy_change_meets_remembered_decisions() -> None:
    conn = FastKafkaConnection(ALLOW_T1)
    request = kp_request("FetchRequest", 4, 1, "c", replica_id=-1, max_wait_ms=1, min_bytes=1, max_bytes=1,
                         isolation_level=0, topics=[{"topic": "t1", "partitions": []}])
    assert conn.receive_client(request).to_server == request
    conn.receive_server(frame(b"\x00\x00\x00\x01"))
    conn.check = kafka_policy('- topic: "t2"\n')  # as the host does when the policy changes
    out = conn.receive_client(request)
    assert not out.to_server and out.to_client and not out.records[0].decision.allowed


def test_the_general_tests_here_run_on_the_fast_path() -> None:
    assert general.KafkaConnection is FastKafkaConnection

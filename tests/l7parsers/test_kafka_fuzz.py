"""Hypothesis against KafkaConnection: garbage only ever raises ProtocolError, chunk boundaries
never change what comes out, and what reaches the broker is always whole frames that policy
allows (requests are never rewritten, so those are the client's own frames)."""

from __future__ import annotations

import os
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.l7parsers.byte_feed import cut, feed
from tests.l7parsers.kafka_support import kafka_policy, kp_request, kp_response

from cilia.l7parsers import kafka_schema as schema
from cilia.l7parsers.base import ProtocolError
from cilia.l7parsers.kafka import KafkaConnection

ONLY_T1 = kafka_policy('- topic: "t1"\n')
WITH_METADATA = kafka_policy('- topic: "t1"\n- apiKey: "metadata"\n')
# KAFKA_FUZZ_EXAMPLES=5000 for a longer run.
FUZZ = settings(max_examples=int(os.environ.get("KAFKA_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

PRODUCE = {"transactional_id": None, "acks": 1, "timeout_ms": 100}


def _produce(cid: int, topic: str, version: int = 9, acks: int = 1) -> bytes:
    return kp_request("ProduceRequest", version, cid, "fuzz", **{**PRODUCE, "acks": acks}, topic_data=[
        {"name": topic, "partition_data": [{"index": 0, "records": b"r" * cid}]}])


REQUESTS = [
    _produce(1, "t1"), _produce(2, "secret"), _produce(3, "t1", 3), _produce(4, "x", 7, acks=0),
    kp_request("MetadataRequest", 12, 5, "fuzz", topics=[{"name": "t1"}]),
    kp_request("MetadataRequest", 5, 6, "fuzz", topics=None),
    kp_request("ApiVersionsRequest", 3, 7, "fuzz", client_software_name="f", client_software_version="1"),
    kp_request("FetchRequest", 12, 8, "fuzz", replica_id=-1, max_wait_ms=1, min_bytes=1, topics=[
        {"topic": "t1", "partitions": [{"partition": 0, "fetch_offset": 0, "partition_max_bytes": 10}]}],
        forgotten_topics_data=[], rack_id=""),
    kp_request("JoinGroupRequest", 7, 9, "fuzz", group_id="g", session_timeout_ms=1, member_id="",
               protocol_type="consumer", protocols=[]),
    kp_request("OffsetFetchRequest", 8, 10, "fuzz", groups=[{"group_id": "g", "topics": None}]),
]


def frames(data: bytes) -> list[bytes]:
    out = []
    while data:
        size = int.from_bytes(data[:4], "big")
        assert len(data) >= 4 + size, "a partial frame was forwarded"
        out.append(data[:4 + size])
        data = data[4 + size:]
    return out


def assert_forwarded_frames_are_allowed(to_server: bytes) -> None:
    for f in frames(to_server):
        again = KafkaConnection(ONLY_T1).receive_client(f)
        assert again.to_server == f and again.records[0].decision.allowed


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8))
def test_random_bytes_raise_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    conn = KafkaConnection(ONLY_T1)
    try:
        out = feed(conn, cut(data, cuts))
    except ProtocolError as e:
        assert e.side == "client"
        return
    assert_forwarded_frames_are_allowed(out.to_server)


@st.composite
def framed_garbage(draw: st.DrawFn) -> bytes:
    """A frame with a real API key and version and a random body: it gets past the framing."""
    key = draw(st.sampled_from(schema.api_keys()))
    known = schema.request_versions(key)
    version = draw(st.integers(known.lo, known.hi))
    payload = key.to_bytes(2, "big") + version.to_bytes(2, "big") + draw(st.binary(min_size=6, max_size=120))
    return len(payload).to_bytes(4, "big") + payload


@FUZZ
@given(st.lists(framed_garbage(), min_size=1, max_size=4), st.lists(st.integers(0, 600), max_size=6))
def test_framed_garbage_raises_only_protocol_errors(garbage: list[bytes], cuts: list[int]) -> None:
    conn = KafkaConnection(ONLY_T1)
    try:
        out = feed(conn, cut(b"".join(garbage), cuts))
    except ProtocolError:
        return
    assert_forwarded_frames_are_allowed(out.to_server)


@FUZZ
@given(st.lists(st.sampled_from(range(len(REQUESTS))), min_size=1, max_size=8),
       st.lists(st.integers(0, 5000), max_size=20))
def test_chunk_boundaries_do_not_matter(picks: list[int], cuts: list[int]) -> None:
    stream = b"".join(REQUESTS[i] for i in picks)
    whole = KafkaConnection(ONLY_T1).receive_client(stream)
    split = feed(KafkaConnection(ONLY_T1), cut(stream, cuts))
    assert split == whole
    allowed = [REQUESTS[i] for i, r in zip(picks, whole.records) if r.decision.allowed]
    assert whole.to_server == b"".join(allowed)


@FUZZ
@given(st.lists(st.sampled_from(range(len(REQUESTS))), min_size=1, max_size=6),
       st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), min_size=1, max_size=4),
       st.lists(st.integers(0, 5000), max_size=10))
def test_corrupted_streams_forward_only_allowed_frames(picks: list[int], flips: list[tuple[int, int]],
                                                       cuts: list[int]) -> None:
    stream = bytearray(b"".join(REQUESTS[i] for i in picks))
    for at, value in flips:
        stream[at % len(stream)] = value
    conn = KafkaConnection(ONLY_T1)
    try:
        out = feed(conn, cut(bytes(stream), cuts))
    except ProtocolError:
        return
    assert_forwarded_frames_are_allowed(out.to_server)


def _metadata_response(cid: int) -> bytes:
    return kp_response("MetadataResponse", 12, cid, brokers=[{"node_id": 1, "host": "h", "port": 1}],
                       cluster_id=None, controller_id=1, topics=[
                           {"error_code": 0, "name": n, "topic_id": uuid.UUID(int=i + 1), "partitions": []}
                           for i, n in enumerate(("t1", "secret"))])


@FUZZ
@given(st.lists(st.integers(0, 3000), max_size=12), st.binary(max_size=60))
def test_server_side_boundaries_and_garbage(cuts: list[int], junk: bytes) -> None:
    """Responses split anywhere read the same; anything after them that is not a response to an
    outstanding request is the server's ProtocolError."""
    requests = [_produce(1, "t1"), kp_request("MetadataRequest", 12, 2, "fuzz", topics=None),
                kp_request("ApiVersionsRequest", 0, 3, "fuzz"), _produce(4, "secret")]
    responses = (kp_response("ProduceResponse", 9, 1, responses=[]) + _metadata_response(2)
                 + kp_response("ApiVersionsResponse", 0, 3, error_code=0,
                               api_keys=[{"api_key": 1, "min_version": 0, "max_version": 17}]))
    outs = []
    for pieces in ([], cuts):
        conn = KafkaConnection(WITH_METADATA)
        for r in requests:
            conn.receive_client(r)
        outs.append(feed(conn, cut(responses, pieces), "server"))
        if junk:
            try:
                conn.receive_server(junk)
            except ProtocolError as e:
                assert e.side == "server"
    assert outs[0] == outs[1]
    assert len(frames(outs[0].to_client)) == 4  # three responses and the queued denial

"""The Kafka schemas and wire codec, checked against kafka-python's independent implementation:
every API, every version the schemas know, requests and responses, flexible and classic."""

from __future__ import annotations

import random

import pytest
from tests.l7parsers.kafka_support import kp_build, kp_classes, sample

from cilia.l7parsers import kafka_schema as schema
from cilia.l7parsers.kafka_codec import (
    CodecError,
    Reader,
    decode_body,
    decode_request_header,
    encode_body,
    encode_request_header,
)
from cilia.l7parsers.kafka_schema import UNKNOWN_TAGS, Versions

API_KEYS = schema.api_keys()


def test_schemas_cover_the_apis_clients_use() -> None:
    assert len(API_KEYS) >= 50
    for key in (0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18, 19, 20, 22):
        assert not schema.request_versions(key).empty


def test_every_known_version_compiles() -> None:
    for key in API_KEYS:
        known = schema.request_versions(key)
        for v in range(known.lo, known.hi + 1):
            assert schema.request_layout(key, v) is not None, (key, v)
            assert schema.response_layout(key, v) is not None, (key, v)


def test_versions_outside_the_schema_are_unknown() -> None:
    assert schema.request_layout(0, 2) is None  # Produce v0-2 were removed in Kafka 4
    assert schema.request_layout(0, 14) is None
    assert schema.request_layout(1, 3) is None
    assert schema.request_layout(999, 0) is None
    # InitProducerId's newest version is marked unstable: its format may still change.
    assert schema.request_versions(22).hi == 5
    assert schema.request_layout(22, 6) is None


def test_topic_id_only_versions_are_capped() -> None:
    assert schema.named_versions(0) == Versions(3, 12)   # Produce v13 has topic ids only
    assert schema.named_versions(1) == Versions(4, 12)   # Fetch v13+
    assert schema.named_versions(8) == Versions(2, 9)    # OffsetCommit v10
    assert schema.named_versions(9) == Versions(1, 9)    # OffsetFetch v10
    assert schema.named_versions(3) == schema.request_versions(3)  # Metadata keeps names
    assert schema.named_versions(20) == schema.request_versions(20)  # DeleteTopics v6: name or id


def test_flexible_versions_follow_the_schemas() -> None:
    produce9 = schema.request_layout(0, 9)
    produce8 = schema.request_layout(0, 8)
    assert produce9 is not None and produce8 is not None
    assert produce9.flexible and not produce8.flexible
    fetch = schema.request_layout(1, 15)
    assert fetch is not None
    tagged = {f.name: f.tag for f in fetch.fields if f.tag is not None}
    assert tagged == {"ClusterId": 0, "ReplicaState": 1}


def _versions(key: int) -> range:
    known = schema.request_versions(key)
    return range(known.lo, known.hi + 1)


@pytest.mark.parametrize("key", API_KEYS)
def test_codec_agrees_with_kafka_python(key: int) -> None:
    """Encode a value of every field, let kafka-python decode and re-encode it: the bytes are
    the same; and our decoder gives back the value."""
    classes = kp_classes()
    for version in _versions(key):
        for kind in ("request", "response"):
            layout = (schema.request_layout if kind == "request" else schema.response_layout)(key, version)
            assert layout is not None
            for seed in range(3):
                value = sample(layout.fields, random.Random(f"{key}/{version}/{kind}/{seed}"))
                if key == 18 and kind == "response":
                    value["ErrorCode"] = 0  # kafka-python reads any error response as v0
                data = encode_body(layout, value)
                assert decode_body(layout, data, 0) == value
                theirs = classes[layout.name].decode(data, version=version)
                theirs._header = None  # their encode() touches it
                assert bytes(theirs.encode()) == data, (layout.name, version, seed)


@pytest.mark.parametrize(("version", "flexible"), [(1, False), (8, False), (9, True), (12, True)])
@pytest.mark.parametrize("client_id", ["producer-1", "", None])
def test_request_header_matches_kafka_python(version: int, flexible: bool, client_id: str | None) -> None:
    msg = kp_build(kp_classes()["MetadataRequest"], topics=[{"name": "t"}])
    msg.with_header(correlation_id=77, client_id=client_id)
    theirs = bytes(msg.encode(version=version, header=True))
    ours = encode_request_header(3, version, 77, client_id, flexible)
    assert theirs.startswith(ours)
    header = decode_request_header(theirs, flexible)
    assert (header.api_key, header.api_version, header.correlation_id, header.client_id) == \
        (3, version, 77, client_id)
    assert header.body == len(ours)


def _produce_v9() -> schema.Layout:
    layout = schema.request_layout(0, 9)
    assert layout is not None
    return layout


def test_unknown_tagged_fields_survive_a_round_trip() -> None:
    layout = _produce_v9()
    body = {"TransactionalId": None, "Acks": 1, "TimeoutMs": 5, "TopicData": [],
            UNKNOWN_TAGS: {"7": b"\x01\x02", "3": b""}}
    data = encode_body(layout, body)
    assert data.endswith(b"\x02\x03\x00\x07\x02\x01\x02")  # two tags, ascending
    assert decode_body(layout, data, 0) == body


@pytest.mark.parametrize(("data", "why"), [
    (b"\xff\xff\x00\x01\x00\x00", "truncated"),  # TimeoutMs cut short
    (b"\xff\xff\x00\x01\x00\x00\x00\x05\x00\x00\x00\x01\xff\xff", "null"),  # a topic named null
    (b"\xff\xff\x00\x01\x00\x00\x00\x05\x00\x00\x00\x00\x00", "left over"),
])
def test_classic_decoding_errors(data: bytes, why: str) -> None:
    layout = schema.request_layout(0, 3)
    assert layout is not None
    with pytest.raises(CodecError, match=why):
        decode_body(layout, data, 0)


@pytest.mark.parametrize("data", [
    b"",                                             # nothing
    b"\x00\x00\x01\x00\x00\x00\x05",                 # truncated TimeoutMs
    b"\x00\x00\x01\x00\x00\x00\x05\x80\x80\x80\x80\x80\x01\x00",  # a six-byte varint
    b"\x00\x00\x01\x00\x00\x00\x05\x05",             # array of 4 with nothing after it
    b"\x00\x00\x01\x00\x00\x00\x05\x01\x00\x00",     # a byte left over
    b"\x00\x00\x01\x00\x00\x00\x05\x01\x01\x05\x00\x01\x00",  # a tagged field longer than what is left
    b"\x03\xff\xfe\x00\x01\x00\x00\x00\x05\x01\x00",  # invalid UTF-8 in TransactionalId
    b"\x00\x00\x01\x00\x00\x00\x05\x02\x00\x00",     # a topic with a null (non-nullable) name
])
def test_flexible_decoding_errors(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_body(_produce_v9(), data, 0)


def test_negative_lengths_are_errors() -> None:
    layout = schema.request_layout(0, 3)
    assert layout is not None
    # TransactionalId null (-1) is fine, -2 is not; an array of -5 is not.
    ok = b"\xff\xff" + b"\x00\x01" + b"\x00\x00\x00\x05" + b"\x00\x00\x00\x00"
    assert decode_body(layout, ok, 0)["TopicData"] == []
    with pytest.raises(CodecError, match="negative"):
        decode_body(layout, b"\xff\xfe" + ok[2:], 0)
    with pytest.raises(CodecError, match="negative"):
        decode_body(layout, ok[:8] + b"\xff\xff\xff\xfb", 0)
    with pytest.raises(CodecError, match="exceeds"):
        decode_body(layout, ok[:8] + b"\x7f\xff\xff\xff", 0)


def test_encoding_rejects_values_that_do_not_fit() -> None:
    layout = _produce_v9()
    for bad in ({"Acks": 1 << 20}, {"Acks": "1"}, {"TopicData": [{"Name": None}]}, {"TopicData": "x"}):
        body = {"TransactionalId": None, "Acks": 1, "TimeoutMs": 5, "TopicData": [], **bad}
        with pytest.raises(CodecError):
            encode_body(layout, body)


def test_reader_varint_limits() -> None:
    assert Reader(b"\xff\xff\xff\xff\x0f").uvarint() == 0xFFFFFFFF
    with pytest.raises(CodecError):
        Reader(b"\xff\xff\xff\xff\x1f").uvarint()
    with pytest.raises(CodecError):
        Reader(b"\x80").uvarint()

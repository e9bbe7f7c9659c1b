"""KafkaConnection on real requests (encoded by kafka-python) with real policy: topics per API,
denials as the API's own responses, reply order, the ApiVersions cap, Metadata filtering, topic
ids, and malformed input."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest
from tests.l7parsers.byte_feed import chunked, feed
from tests.l7parsers.kafka_support import kafka_policy, kp_classes, kp_decode_response, kp_request, kp_response, sample

from cilia.l7parsers import kafka_schema as schema
from cilia.l7parsers.base import Decision, Output, ProtocolError
from cilia.l7parsers.kafka import KafkaConnection
from cilia.l7parsers.kafka_codec import (
    decode_body,
    decode_request_header,
    encode_body,
    encode_request_header,
    frame,
    response_header_size,
)
from cilia.l7parsers.kafka_schema import Value
from cilia.l7parsers.kafka_topics import unknown_topic
from cilia.policy.flows import KafkaRequest, L7Request

CLIENT_ID = "cilia-test"


ONLY_T1 = kafka_policy('- topic: "t1"\n')  # any API key, but topics must be t1
DENY_ALL = kafka_policy('- apiKey: "produce"\n  topic: "nowhere"\n')  # every fixture is denied


class Recorder:
    """A Check that allows everything and keeps what it was asked."""

    def __init__(self) -> None:
        self.seen: list[L7Request] = []

    def __call__(self, request: L7Request) -> Decision:
        self.seen.append(request)
        return Decision(True, "recorder", "")


# --- fixtures: requests as kafka-python encodes them ---------------------------


@dataclass(frozen=True)
class Case:
    name: str  # kafka-python request class
    version: int
    fields: dict[str, Any]
    topics: tuple[str, ...]
    codes: frozenset[int] = frozenset({29})  # error codes a denial carries
    partitions: int = 0  # partition-level answers a denial carries
    id: str = field(default="")

    @property
    def api_key(self) -> int:
        return int(kp_classes()[self.name].API_KEY)

    @property
    def response(self) -> str:
        return self.name.removesuffix("Request") + "Response"

    def frame(self, correlation_id: int = 1) -> bytes:
        return kp_request(self.name, self.version, correlation_id, CLIENT_ID, **self.fields)


def _parts(*indexes: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"partition_index": i, **extra} for i in indexes]


U1 = uuid.UUID(int=0x1111)
TOPIC_ID = U1.bytes

_PRODUCE = {"transactional_id": None, "acks": -1, "timeout_ms": 1000, "topic_data": [
    {"name": "t1", "partition_data": [{"index": 0, "records": b"\x00" * 20}, {"index": 1, "records": None}]},
    {"name": "t2", "partition_data": [{"index": 0, "records": b"abc"}]}]}
_FETCH = {"replica_id": -1, "max_wait_ms": 500, "min_bytes": 1, "max_bytes": 1 << 20, "isolation_level": 0,
          "session_id": 0, "session_epoch": -1,
          "topics": [{"topic": "t1", "partitions": [{"partition": 0, "fetch_offset": 5, "partition_max_bytes": 1000},
                                                    {"partition": 2, "fetch_offset": 0, "partition_max_bytes": 1000}]}],
          "forgotten_topics_data": [{"topic": "t3", "partitions": [1]}], "rack_id": ""}
_LIST_OFFSETS = {"replica_id": -1, "isolation_level": 0,
                 "topics": [{"name": "t1", "partitions": [{"partition_index": 0, "timestamp": -1}]}]}
_COMMIT = {"group_id": "g", "generation_id_or_member_epoch": 3, "member_id": "m",
           "topics": [{"name": "t1", "partitions": _parts(0, 1, committed_offset=9, committed_metadata="")}]}
_TXN_COMMIT = {"transactional_id": "tx", "group_id": "g", "producer_id": 7, "producer_epoch": 0,
               "topics": [{"name": "t1", "partitions": _parts(0, committed_offset=1, committed_metadata=None)}]}
_CREATE = {"topics": [{"name": "t1", "num_partitions": 3, "replication_factor": 1, "assignments": [], "configs": []},
                      {"name": "t2", "num_partitions": 1, "replication_factor": 1, "assignments": [], "configs": []}],
           "timeout_ms": 1000}
_CONFIGS = {"resources": [{"resource_type": 2, "resource_name": "t1", "configuration_keys": None},
                          {"resource_type": 4, "resource_name": "1", "configuration_keys": ["x"]}]}

CASES = [
    *(Case("ProduceRequest", v, _PRODUCE, ("t1", "t2"), partitions=3) for v in (3, 7, 8, 9, 12)),
    Case("FetchRequest", 4, _FETCH, ("t1",), partitions=2),  # forgotten topics came in v7
    *(Case("FetchRequest", v, _FETCH, ("t1", "t3"), partitions=2) for v in (7, 11, 12)),
    *(Case("ListOffsetsRequest", v, _LIST_OFFSETS, ("t1",), partitions=1) for v in (1, 3, 6, 9)),
    Case("MetadataRequest", 0, {"topics": []}, (), codes=frozenset()),  # v0: empty means all topics
    Case("MetadataRequest", 1, {"topics": None}, (), codes=frozenset()),
    *(Case("MetadataRequest", v, {"topics": [{"name": "t1"}, {"name": "t2"}]}, ("t1", "t2"))
      for v in (1, 5, 9, 12)),
    Case("MetadataRequest", 13, {"topics": None}, ()),  # v13 has a top-level error code
    *(Case("OffsetCommitRequest", v, _COMMIT, ("t1",), partitions=2) for v in (2, 3, 8, 9)),
    *(Case("OffsetFetchRequest", v, {"group_id": "g", "topics": [{"name": "t1", "partition_indexes": [0, 1]}]},
           ("t1",), partitions=2) for v in (1, 3, 6, 7)),
    Case("OffsetFetchRequest", 3, {"group_id": "g", "topics": None}, ()),
    Case("OffsetFetchRequest", 8, {"groups": [{"group_id": "g", "topics": [
        {"name": "t1", "partition_indexes": [0]}, {"name": "t2", "partition_indexes": [4, 5]}]}]},
        ("t1", "t2"), partitions=3),
    Case("OffsetFetchRequest", 8, {"groups": [{"group_id": "g", "topics": None}]}, ()),
    *(Case("CreateTopicsRequest", v, _CREATE, ("t1", "t2")) for v in (2, 4, 5, 7)),
    Case("DeleteTopicsRequest", 1, {"topic_names": ["t1", "t2"], "timeout_ms": 100}, ("t1", "t2")),
    Case("DeleteTopicsRequest", 4, {"topic_names": ["t1"], "timeout_ms": 100}, ("t1",)),
    Case("DeleteTopicsRequest", 6, {"topics": [{"name": "t1", "topic_id": uuid.UUID(int=0)}], "timeout_ms": 100},
         ("t1",)),
    *(Case("DeleteRecordsRequest", v, {"topics": [{"name": "t1", "partitions": _parts(0, 1, offset=3)}],
                                       "timeout_ms": 100}, ("t1",), partitions=2) for v in (0, 2)),
    *(Case("OffsetForLeaderEpochRequest", v, {"replica_id": -1, "topics": [{"topic": "t1", "partitions": [
        {"partition": 0, "current_leader_epoch": 1, "leader_epoch": 1}]}]}, ("t1",), partitions=1) for v in (2, 4)),
    Case("AddPartitionsToTxnRequest", 3, {"v3_and_below_transactional_id": "tx", "v3_and_below_producer_id": 1,
                                          "v3_and_below_producer_epoch": 0,
                                          "v3_and_below_topics": [{"name": "t1", "partitions": [0, 1]}]},
         ("t1",), partitions=2),
    Case("AddPartitionsToTxnRequest", 4, {"transactions": [{"transactional_id": "tx", "producer_id": 1,
                                                            "producer_epoch": 0, "verify_only": False,
                                                            "topics": [{"name": "t2", "partitions": [3]}]}]},
         ("t2",), partitions=1),
    *(Case("TxnOffsetCommitRequest", v, _TXN_COMMIT, ("t1",), partitions=1) for v in (0, 3)),
    *(Case("DescribeConfigsRequest", v, _CONFIGS, ("t1",), codes=frozenset({29, 31})) for v in (1, 4)),
    Case("DescribeConfigsRequest", 4, {"resources": [{"resource_type": 4, "resource_name": "1",
                                                      "configuration_keys": None}]}, (), codes=frozenset({31})),
    Case("AlterConfigsRequest", 1, {"resources": [{"resource_type": 2, "resource_name": "t2", "configs": []}],
                                    "validate_only": True}, ("t2",)),
    Case("IncrementalAlterConfigsRequest", 1, {"resources": [{"resource_type": 2, "resource_name": "t1",
                                                              "configs": []}]}, ("t1",)),
    Case("CreatePartitionsRequest", 2, {"topics": [{"name": "t1", "count": 4, "assignments": None}],
                                        "timeout_ms": 1, "validate_only": False}, ("t1",)),
    Case("ElectLeadersRequest", 2, {"election_type": 0, "topic_partitions": [{"topic": "t1", "partitions": [0]}]},
         ("t1",), partitions=1),
    Case("DescribeProducersRequest", 0, {"topics": [{"name": "t2", "partition_indexes": [0, 1]}]}, ("t2",),
         partitions=2),
    Case("DescribeTopicPartitionsRequest", 0, {"topics": [{"name": "t1"}], "response_partition_limit": 10,
                                               "cursor": {"topic_name": "t2", "partition_index": 0}},
         ("t1", "t2")),
    Case("WriteTxnMarkersRequest", 1, {"markers": [{"producer_id": 1, "producer_epoch": 0, "transaction_result": True,
                                                    "topics": [{"name": "t1", "partition_indexes": [0]}],
                                                    "coordinator_epoch": 0}]}, ("t1",), partitions=1),
    Case("AlterReplicaLogDirsRequest", 2, {"dirs": [{"path": "/d", "topics": [{"name": "t1", "partitions": [0]}]},
                                                    {"path": "/e", "topics": [{"name": "t2", "partitions": [1]}]}]},
         ("t1", "t2"), partitions=2),
    Case("OffsetDeleteRequest", 0, {"group_id": "g", "topics": [{"name": "t1", "partitions": _parts(0)}]},
         ("t1",), partitions=1),
    # APIs without topics
    Case("ApiVersionsRequest", 0, {}, (), codes=frozenset({31})),
    Case("ApiVersionsRequest", 3, {"client_software_name": "x", "client_software_version": "1"}, (),
         codes=frozenset({31})),
    *(Case("JoinGroupRequest", v, {"group_id": "g", "session_timeout_ms": 6000, "rebalance_timeout_ms": 6000,
                                   "member_id": "", "protocol_type": "consumer",
                                   "protocols": [{"name": "range", "metadata": b"\x00\x01"}]},
           (), codes=frozenset({30})) for v in (5, 7)),
    Case("HeartbeatRequest", 4, {"group_id": "g", "generation_id": 1, "member_id": "m"}, (), codes=frozenset({30})),
    Case("SyncGroupRequest", 5, {"group_id": "g", "generation_id": 1, "member_id": "m", "protocol_type": "consumer",
                                 "protocol_name": "range", "assignments": []}, (), codes=frozenset({30})),
    Case("LeaveGroupRequest", 5, {"group_id": "g", "members": [{"member_id": "m"}]}, (), codes=frozenset({30})),
    Case("FindCoordinatorRequest", 1, {"key": "g", "key_type": 0}, (), codes=frozenset({30})),
    Case("FindCoordinatorRequest", 4, {"key_type": 0, "coordinator_keys": ["g", "h"]}, (), codes=frozenset({30})),
    Case("FindCoordinatorRequest", 6, {"key_type": 1, "coordinator_keys": ["tx"]}, (), codes=frozenset({53})),
    Case("InitProducerIdRequest", 4, {"transactional_id": None, "transaction_timeout_ms": 100}, (),
         codes=frozenset({31})),
    Case("InitProducerIdRequest", 4, {"transactional_id": "tx", "transaction_timeout_ms": 100}, (),
         codes=frozenset({53})),
    Case("DescribeGroupsRequest", 5, {"groups": ["g", "h"]}, (), codes=frozenset({30})),
    Case("ListGroupsRequest", 4, {"states_filter": []}, (), codes=frozenset({31})),
    Case("DeleteGroupsRequest", 2, {"groups_names": ["g"]}, (), codes=frozenset({30})),
    Case("SaslHandshakeRequest", 1, {"mechanism": "PLAIN"}, (), codes=frozenset({31})),
    Case("DescribeClusterRequest", 1, {"include_cluster_authorized_operations": False}, (), codes=frozenset({31})),
    Case("CreateAclsRequest", 3, {"creations": [{"resource_type": 2, "resource_name": "t1", "resource_pattern_type": 3,
                                                 "principal": "User:x", "host": "*", "operation": 2,
                                                 "permission_type": 3}]}, (), codes=frozenset({31})),
]
CASE_IDS = [f"{c.name.removesuffix('Request')}-v{c.version}-{i}" for i, c in enumerate(CASES)]


def error_codes(value: Value) -> set[int]:
    """Every non-zero ``...ErrorCode`` in a decoded response."""
    found: set[int] = set()
    if isinstance(value, dict):
        for k, v in value.items():
            if k.endswith("ErrorCode") and isinstance(v, int) and v:
                found.add(v)
            found |= error_codes(v)
    elif isinstance(value, list):
        for v in value:
            found |= error_codes(v)
    return found


def partition_answers(value: Value) -> int:
    """How many partition-level answers (structs with a partition index and an error) there are."""
    if isinstance(value, list):
        return sum(partition_answers(v) for v in value)
    if not isinstance(value, dict):
        return 0
    here = any(k in value for k in ("Index", "PartitionIndex", "Partition", "PartitionId")) and \
        any(k.endswith("ErrorCode") for k in value)
    return int(here) + sum(partition_answers(v) for v in value.values())


def decode_response(api_key: int, version: int, data: bytes) -> tuple[int, dict[str, Value]]:
    """(correlation id, body) of a whole response frame, with our codec. An ApiVersions response
    with an error is v0."""
    if api_key == 18 and data[8:10] != b"\x00\x00":
        version = 0
    layout = schema.response_layout(api_key, version)
    assert layout is not None
    payload = data[4:]
    assert int.from_bytes(data[:4], "big") == len(payload)
    start = response_header_size(payload, layout.flexible and api_key != 18)
    return int.from_bytes(payload[:4], "big", signed=True), decode_body(layout, payload, start)


# --- topics per API ---------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_request_names_its_topics(case: Case, chunk: int) -> None:
    recorder = Recorder()
    conn = KafkaConnection(recorder)
    data = case.frame(correlation_id=41)
    out = feed(conn, chunked(data, chunk))
    assert out.to_server == data and out.to_client == b""
    assert recorder.seen == [KafkaRequest(case.api_key, case.version, CLIENT_ID, case.topics)]
    (record,) = out.records
    assert record.decision.allowed
    assert record.summary["api_version"] == str(case.version)
    assert record.summary["topic"] == ",".join(case.topics)
    assert record.summary["correlation_id"] == "41"
    assert record.summary["client_id"] == CLIENT_ID


JUNK = [b"\xff\xff\xff\xff", b"\x00\x00\x00\x0a\x7f\x7f\x00\x00\x00\x00\x00\x01\x00\x00"]


@pytest.mark.parametrize("chunk", [0, 1])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_request_then_junk(case: Case, chunk: int) -> None:
    """The request is decided and forwarded; the junk after it (a negative size, an unknown API
    key) is a ProtocolError and nothing of it passes."""
    for junk in JUNK:
        conn = KafkaConnection(Recorder())
        data = case.frame()
        assert feed(conn, chunked(data, chunk)).to_server == data
        with pytest.raises(ProtocolError):
            feed(conn, chunked(junk, chunk))


def test_record_names_the_api_as_cilium_does() -> None:
    out = KafkaConnection(ONLY_T1).receive_client(CASES[0].frame(9))
    assert out.records[0].summary == {"api_key": "produce", "api_version": "3", "client_id": CLIENT_ID,
                                      "topic": "t1,t2", "correlation_id": "9"}
    assert not out.records[0].decision.allowed  # t2 is not allowed
    assert out.records[0].decision.rule.startswith("default deny")


def test_null_client_id_is_empty() -> None:
    recorder = Recorder()
    data = kp_request("MetadataRequest", 5, 1, None, topics=[{"name": "t1"}])
    out = KafkaConnection(recorder).receive_client(data)
    assert recorder.seen == [KafkaRequest(3, 5, "", ("t1",))]
    assert out.records[0].summary["client_id"] == ""


# --- denials ------------------------------------------------------------------


# Metadata v1+ naming topics is not denied whole: it goes on without them (test_metadata_...)
ANSWERED = [(c, i) for c, i in zip(CASES, CASE_IDS) if not (c.api_key == 3 and c.version >= 1)]


@pytest.mark.parametrize("case", [c for c, _ in ANSWERED], ids=[i for _, i in ANSWERED])
def test_denial_is_the_apis_own_response(case: Case) -> None:
    conn = KafkaConnection(DENY_ALL)
    out = conn.receive_client(case.frame(correlation_id=1234))
    assert out.to_server == b""
    assert not out.records[0].decision.allowed
    cid, body = decode_response(case.api_key, case.version, out.to_client)
    assert cid == 1234
    assert error_codes(body) == case.codes
    assert partition_answers(body) == case.partitions
    theirs = kp_decode_response(case.response, case.version, out.to_client)
    assert theirs.header.correlation_id == 1234
    # The connection stays usable: the next request is read and decided too.
    again = conn.receive_client(case.frame(correlation_id=1235))
    assert decode_response(case.api_key, case.version, again.to_client)[0] == 1235


def test_produce_denial_answers_each_partition() -> None:
    case = next(c for c in CASES if c.name == "ProduceRequest" and c.version == 9)
    out = KafkaConnection(ONLY_T1).receive_client(case.frame(correlation_id=5))
    resp = kp_decode_response("ProduceResponse", 9, out.to_client)
    answers = {(t.name, p.index): (p.error_code, p.base_offset) for t in resp.responses for p in t.partition_responses}
    assert answers == {("t1", 0): (29, -1), ("t1", 1): (29, -1), ("t2", 0): (29, -1)}


def test_fetch_denial_answers_each_partition() -> None:
    case = next(c for c in CASES if c.name == "FetchRequest" and c.version == 12)
    out = KafkaConnection(ONLY_T1).receive_client(case.frame(correlation_id=6))  # t3 is forgotten, not allowed
    resp = kp_decode_response("FetchResponse", 12, out.to_client)
    assert resp.error_code == 0
    assert [(t.topic, p.partition_index, p.error_code) for t in resp.responses for p in t.partitions] == \
        [("t1", 0, 29), ("t1", 2, 29)]


def test_metadata_naming_a_denied_topic_goes_on_without_it() -> None:
    """The broker never hears of the denied topic (nor auto-creates it); the client gets the
    brokers, the allowed topic, and error 29 for the denied one, as from a broker's ACLs."""
    data = kp_request("MetadataRequest", 12, 8, CLIENT_ID, topics=[{"name": "t1"}, {"name": "secret"}])
    conn = KafkaConnection(ONLY_T1)
    out = conn.receive_client(data)
    assert out.to_client == b"" and not out.records[0].decision.allowed
    sent = schema.request_layout(3, 12)
    assert sent is not None
    header = decode_request_header(out.to_server[4:], True)
    assert header.correlation_id == 8
    topics = decode_body(sent, out.to_server[4:], header.body)["Topics"]
    assert isinstance(topics, list) and [t["Name"] for t in topics if isinstance(t, dict)] == ["t1"]
    answer = kp_response("MetadataResponse", 12, 8, brokers=[{"node_id": 1, "host": "h", "port": 9}],
                         topics=[{"name": "t1", "partitions": []}])
    back = conn.receive_server(answer).to_client
    resp = kp_decode_response("MetadataResponse", 12, back)
    assert [(t.name, t.error_code) for t in resp.topics] == [("t1", 0), ("secret", 29)]
    assert [b.host for b in resp.brokers] == ["h"]


@pytest.mark.parametrize("key", schema.api_keys())
def test_every_api_version_has_a_denial(key: int) -> None:
    """For every request version the schemas know, a denial encodes, and both codecs read it."""
    classes = kp_classes()
    known = schema.request_versions(key)
    for version in range(known.lo, known.hi + 1):
        layout = schema.request_layout(key, version)
        assert layout is not None
        body = sample(layout.fields, random.Random(f"{key}/{version}"))
        if key == 0:
            body["Acks"] = 1
        data = frame(encode_request_header(key, version, 99, "c", layout.flexible) + encode_body(layout, body))
        out = KafkaConnection(DENY_ALL).receive_client(data)
        if key == 3 and version >= 1 and out.to_server:  # naming topics: goes on without them
            assert out.to_client == b"" and not out.records[0].decision.allowed
            continue
        assert out.to_server == b"" and out.records and not out.records[0].decision.allowed
        assert decode_response(key, version, out.to_client)[0] == 99
        response = schema.response_layout(key, version)
        assert response is not None
        theirs = classes[response.name].decode(out.to_client, version=version, header=True, framed=True)
        assert theirs.header.correlation_id == 99


def test_produce_with_acks_0_has_no_response() -> None:
    fields = {**_PRODUCE, "acks": 0}
    denied = kp_request("ProduceRequest", 9, 1, CLIENT_ID, **fields)
    conn = KafkaConnection(ONLY_T1)
    out = conn.receive_client(denied)
    assert out == Output(records=out.records) and not out.records[0].decision.allowed
    allowed_fields = {**fields, "topic_data": fields["topic_data"][:1]}
    allowed = kp_request("ProduceRequest", 9, 2, CLIENT_ID, **allowed_fields)
    assert conn.receive_client(allowed).to_server == allowed
    # Nothing is owed for it: the next request's response is the next one expected.
    metadata = kp_request("MetadataRequest", 12, 3, CLIENT_ID, topics=[{"name": "t1"}])
    assert conn.receive_client(metadata).to_server == metadata
    response = kp_response("MetadataResponse", 12, 3, brokers=[], topics=[])
    assert conn.receive_server(response).to_client == response


# --- reply order --------------------------------------------------------------


def _produce(cid: int, topic: str) -> bytes:
    return kp_request("ProduceRequest", 9, cid, CLIENT_ID, transactional_id=None, acks=1, timeout_ms=100,
                      topic_data=[{"name": topic, "partition_data": [{"index": 0, "records": b"x"}]}])


def _produce_response(cid: int, topic: str) -> bytes:
    return kp_response("ProduceResponse", 9, cid, responses=[
        {"name": topic, "partition_responses": [{"index": 0, "error_code": 0, "base_offset": 42}]}])


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_pipelined_denial_waits_for_earlier_responses(chunk: int) -> None:
    conn = KafkaConnection(ONLY_T1)
    a, b, c, d = _produce(1, "t1"), _produce(2, "secret"), _produce(3, "t1"), _produce(4, "other")
    out = feed(conn, chunked(a + b + c + d, chunk))
    assert out.to_server == a + c
    assert out.to_client == b""  # b and d wait behind a and c
    assert [r.decision.allowed for r in out.records] == [True, False, True, False]
    denial_b = KafkaConnection(ONLY_T1).receive_client(b).to_client
    denial_d = KafkaConnection(ONLY_T1).receive_client(d).to_client
    ra, rc = _produce_response(1, "t1"), _produce_response(3, "t1")
    assert feed(conn, chunked(ra, chunk), "server").to_client == ra + denial_b
    assert feed(conn, chunked(rc, chunk), "server").to_client == rc + denial_d
    # Correlation ids in order, as kafka-python checks them.
    ids = [kp_decode_response("ProduceResponse", 9, r).header.correlation_id for r in (ra, denial_b, rc, denial_d)]
    assert ids == [1, 2, 3, 4]


def test_denial_before_any_forwarded_request_is_sent_at_once() -> None:
    conn = KafkaConnection(ONLY_T1)
    b, a = _produce(1, "secret"), _produce(2, "t1")
    out = conn.receive_client(b + a)
    assert out.to_server == a
    assert kp_decode_response("ProduceResponse", 9, out.to_client).header.correlation_id == 1
    ra = _produce_response(2, "t1")
    assert conn.receive_server(ra).to_client == ra


def test_large_response_streams_through() -> None:
    conn = KafkaConnection(ONLY_T1, max_buffer=1024)
    data = kp_request("FetchRequest", 12, 7, CLIENT_ID, **{**_FETCH, "forgotten_topics_data": []})
    assert conn.receive_client(data).to_server == data
    big = kp_response("FetchResponse", 12, 7, responses=[{"topic": "t1", "partitions": [
        {"partition_index": 0, "error_code": 0, "high_watermark": 1, "records": b"r" * 100_000}]}])
    out = feed(conn, chunked(big, 4096), "server")
    assert out.to_client == big


# --- ApiVersions ----------------------------------------------------------------

TANSU_APIS = [(0, 0, 11), (1, 0, 17), (2, 0, 9), (3, 0, 12), (8, 0, 9), (9, 0, 9), (10, 0, 6), (11, 0, 9),
              (18, 0, 4), (19, 0, 7), (22, 0, 5), (69, 0, 0), (71, 0, 0), (75, 0, 0)]


@pytest.mark.parametrize("version", [0, 1, 2, 3, 4])
def test_api_versions_are_capped_to_what_the_parser_checks(version: int) -> None:
    conn = KafkaConnection(ONLY_T1)
    request = kp_request("ApiVersionsRequest", version, 1, CLIENT_ID)
    assert conn.receive_client(request).to_server == request
    features = {"supported_features": [{"name": "transaction.version", "min_version": 0, "max_version": 2}],
                "finalized_features_epoch": 3} if version >= 3 else {}
    response = kp_response("ApiVersionsResponse", version, 1, error_code=0, throttle_time_ms=0,
                           api_keys=[{"api_key": k, "min_version": lo, "max_version": hi} for k, lo, hi in TANSU_APIS],
                           **features)
    out = conn.receive_server(response)
    theirs = kp_decode_response("ApiVersionsResponse", version, out.to_client)
    assert theirs.header.correlation_id == 1
    ranges = {a.api_key: (a.min_version, a.max_version) for a in theirs.api_keys}
    assert ranges == {0: (0, 11), 1: (4, 12), 2: (1, 9), 3: (0, 12), 8: (2, 9), 9: (1, 9), 10: (0, 6),
                      11: (0, 9), 18: (0, 4), 19: (2, 7), 22: (0, 5), 75: (0, 0)}
    if version >= 3:
        assert [(f.name, f.max_version) for f in theirs.supported_features] == [("transaction.version", 2)]
        assert theirs.finalized_features_epoch == 3


def test_api_versions_unchanged_when_within_range() -> None:
    conn = KafkaConnection(ONLY_T1)
    conn.receive_client(kp_request("ApiVersionsRequest", 3, 1, CLIENT_ID))
    response = kp_response("ApiVersionsResponse", 3, 1, error_code=0, throttle_time_ms=0,
                           api_keys=[{"api_key": 3, "min_version": 0, "max_version": 12}])
    assert conn.receive_server(response).to_client == response


def test_api_versions_error_answer_is_read_as_v0() -> None:
    conn = KafkaConnection(ONLY_T1)
    conn.receive_client(kp_request("ApiVersionsRequest", 4, 1, CLIENT_ID))
    response = kp_response("ApiVersionsResponse", 0, 1, error_code=35,
                           api_keys=[{"api_key": 18, "min_version": 0, "max_version": 3}])
    assert conn.receive_server(response).to_client == response


def test_newer_api_versions_request_is_told_to_retry_lower() -> None:
    conn = KafkaConnection(ONLY_T1)
    data = frame(encode_request_header(18, 9, 5, "java", True) + b"\x05java\x041.23\x00\x42\x42")
    out = conn.receive_client(data)
    assert out.to_server == b""
    theirs = kp_decode_response("ApiVersionsResponse", 4, out.to_client)  # read as v0: it has an error
    assert theirs.header.correlation_id == 5 and theirs.error_code == 35
    assert [(a.api_key, a.min_version, a.max_version) for a in theirs.api_keys] == [(18, 0, 4)]
    assert out.records[0].summary["api_version"] == "9"


# --- Metadata responses and topic ids ---------------------------------------


def _metadata_response(cid: int, version: int, *names: str) -> bytes:
    topics = [{"error_code": 0, "name": n, "topic_id": uuid.UUID(int=i + 1), "is_internal": False,
               "partitions": [{"error_code": 0, "partition_index": 0, "leader_id": 1, "replica_nodes": [1],
                               "isr_nodes": [1], "offline_replicas": []}]} for i, n in enumerate(names)]
    return kp_response("MetadataResponse", version, cid, throttle_time_ms=0,
                       brokers=[{"node_id": 1, "host": "127.0.0.1", "port": 9092, "rack": None}],
                       cluster_id="c", controller_id=1, topics=topics)


@pytest.mark.parametrize("version", [1, 5, 9, 12])
def test_metadata_response_errors_named_topics_the_client_may_not_see(version: int) -> None:
    check = kafka_policy('- apiKey: "metadata"\n  topic: "t1"\n')
    conn = KafkaConnection(check)
    request = kp_request("MetadataRequest", version, 3, CLIENT_ID, topics=[{"name": "t1"}])
    assert conn.receive_client(request).to_server == request
    out = conn.receive_server(_metadata_response(3, version, "t1", "secret"))  # the broker says more
    theirs = kp_decode_response("MetadataResponse", version, out.to_client)
    assert [(t.name, t.error_code, len(t.partitions)) for t in theirs.topics] == [("t1", 0, 1), ("secret", 29, 0)]
    assert [b.port for b in theirs.brokers] == [9092]


def test_metadata_response_drops_hidden_topics_from_all_topics() -> None:
    def check(request: L7Request) -> Decision:
        assert isinstance(request, KafkaRequest)
        return Decision("secret" not in request.topics, "test", "")

    conn = KafkaConnection(check)
    conn.receive_client(kp_request("MetadataRequest", 12, 3, CLIENT_ID, topics=None))
    out = conn.receive_server(_metadata_response(3, 12, "t1", "secret", "t2"))
    theirs = kp_decode_response("MetadataResponse", 12, out.to_client)
    assert [t.name for t in theirs.topics] == ["t1", "t2"]


def test_metadata_response_unchanged_when_all_visible() -> None:
    conn = KafkaConnection(ONLY_T1)
    conn.receive_client(kp_request("MetadataRequest", 12, 3, CLIENT_ID, topics=[{"name": "t1"}]))
    response = _metadata_response(3, 12, "t1")
    assert conn.receive_server(response).to_client == response


def _fetch_by_id(cid: int, *ids: uuid.UUID) -> bytes:
    return kp_request("FetchRequest", 13, cid, CLIENT_ID, replica_id=-1, max_wait_ms=1, min_bytes=1,
                      topics=[{"topic_id": i, "partitions": [{"partition": 0, "fetch_offset": 0,
                                                              "partition_max_bytes": 100}]} for i in ids],
                      forgotten_topics_data=[], rack_id="")


def test_fetch_v13_topic_ids_learned_from_metadata() -> None:
    check = kafka_policy('- apiKey: "metadata"\n- role: "consume"\n  topic: "t1"\n')
    conn = KafkaConnection(check)
    conn.receive_client(kp_request("MetadataRequest", 12, 1, CLIENT_ID, topics=None))
    conn.receive_server(_metadata_response(1, 12, "t1", "secret"))  # ids 1 and 2
    allowed = _fetch_by_id(2, uuid.UUID(int=1))
    out = conn.receive_client(allowed)
    assert out.to_server == allowed and out.records[0].summary["topic"] == "t1"
    denied = conn.receive_client(_fetch_by_id(3, uuid.UUID(int=2)))
    assert denied.to_server == b"" and denied.records[0].summary["topic"] == "secret"


def test_fetch_v13_unknown_topic_id_is_denied_by_topic_rules() -> None:
    conn = KafkaConnection(kafka_policy('- role: "consume"\n  topic: "t1"\n'))
    out = conn.receive_client(_fetch_by_id(4, U1))
    assert out.to_server == b""
    assert out.records[0].summary["topic"] == unknown_topic(TOPIC_ID)
    theirs = kp_decode_response("FetchResponse", 13, out.to_client)
    assert [(t.topic_id, p.partition_index, p.error_code) for t in theirs.responses for p in t.partitions] == \
        [(U1, 0, 29)]
    # A rule without a topic allows any topic, named or not.
    anything = KafkaConnection(kafka_policy('- role: "consume"\n'))
    assert anything.receive_client(_fetch_by_id(4, U1)).to_server


def test_topic_ids_can_be_shared_between_connections() -> None:
    ids: dict[bytes, str] = {}
    first = KafkaConnection(ONLY_T1, topic_ids=ids)
    first.receive_client(kp_request("MetadataRequest", 12, 1, CLIENT_ID, topics=[{"name": "t1"}]))
    first.receive_server(_metadata_response(1, 12, "t1"))
    assert ids == {uuid.UUID(int=1).bytes: "t1"}
    second = KafkaConnection(ONLY_T1, topic_ids=ids)
    assert second.receive_client(_fetch_by_id(2, uuid.UUID(int=1))).to_server


# --- malformed input ------------------------------------------------------------

_GOOD = kp_request("MetadataRequest", 12, 1, CLIENT_ID, topics=[{"name": "t1"}])


@pytest.mark.parametrize("junk", [
    b"\xff\xff\xff\xff",                                   # negative size
    b"\x00\x00\x00\x03abc",                                # shorter than a header
    b"\x00\x00\x00\x0c\x7f\x7f\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00",  # unknown API key
    b"\x00\x00\x00\x0a\x00\x00\x00\x02\x00\x00\x00\x01\x00\x00",          # Produce v2: removed
    b"\x00\x00\x00\x0a\x00\x01\x00\x13\x00\x00\x00\x01\x00\x00",          # Fetch v19: too new
    b"\x00\x00\x00\x0a\x00\x03\x00\x0c\x00\x00\x00\x01\x00\x00",          # Metadata v12 without a body
    _GOOD[:-1] + b"\x01",                                  # a tagged field announced, none there
    (len(_GOOD) - 5).to_bytes(4, "big") + _GOOD[4:-1],     # a size one byte short of the body
])
def test_junk_after_a_request_raises_protocol_error(junk: bytes) -> None:
    for chunk in (0, 1):
        conn = KafkaConnection(ONLY_T1)
        assert feed(conn, chunked(_GOOD, chunk)).to_server == _GOOD
        with pytest.raises(ProtocolError) as e:
            feed(conn, chunked(junk, chunk))
        assert e.value.side == "client"
        with pytest.raises(ProtocolError):
            conn.receive_client(_GOOD)  # spent


def test_trailing_bytes_inside_a_frame_are_an_error() -> None:
    size = int.from_bytes(_GOOD[:4], "big")
    data = (size + 1).to_bytes(4, "big") + _GOOD[4:] + b"\x00"
    with pytest.raises(ProtocolError, match="left over"):
        KafkaConnection(ONLY_T1).receive_client(data)


def test_oversized_frame_is_refused_before_it_is_read() -> None:
    conn = KafkaConnection(ONLY_T1, max_buffer=1000)
    with pytest.raises(ProtocolError, match="size"):
        conn.receive_client((1001).to_bytes(4, "big") + b"\x00\x03")


def test_eof_inside_a_request_is_an_error() -> None:
    conn = KafkaConnection(ONLY_T1)
    assert conn.receive_client(_GOOD[:-3]) == Output()
    with pytest.raises(ProtocolError):
        conn.receive_client(b"")
    assert KafkaConnection(ONLY_T1).receive_client(b"") == Output()


def test_server_errors() -> None:
    conn = KafkaConnection(ONLY_T1)
    with pytest.raises(ProtocolError, match="no outstanding") as e:
        conn.receive_server(_produce_response(1, "t1"))
    assert e.value.side == "server"
    conn = KafkaConnection(ONLY_T1)
    conn.receive_client(_produce(1, "t1"))
    with pytest.raises(ProtocolError, match="correlation id 2"):
        conn.receive_server(_produce_response(2, "t1"))
    conn = KafkaConnection(ONLY_T1)
    conn.receive_client(_produce(1, "t1"))
    with pytest.raises(ProtocolError, match="size"):
        conn.receive_server(b"\x00\x00\x00\x02\x00\x00")
    conn = KafkaConnection(ONLY_T1)
    conn.receive_client(_produce(1, "t1"))
    conn.receive_server(_produce_response(1, "t1")[:10])
    with pytest.raises(ProtocolError, match="closed"):
        conn.receive_server(b"")


def test_bad_metadata_response_is_a_server_error() -> None:
    conn = KafkaConnection(ONLY_T1)
    conn.receive_client(_GOOD)
    bad = _metadata_response(1, 12, "t1")[:-2]
    bad = (len(bad) - 4).to_bytes(4, "big") + bad[4:]
    with pytest.raises(ProtocolError) as e:
        conn.receive_server(bad)
    assert e.value.side == "server"


def test_requests_naming_topics_by_id_only() -> None:
    """Metadata v10+ and DeleteTopics v6 may give a topic id and a null name."""
    recorder = Recorder()
    conn = KafkaConnection(recorder, topic_ids={uuid.UUID(int=7).bytes: "known"})
    by_id = [{"topic_id": U1, "name": None}, {"topic_id": uuid.UUID(int=7), "name": None}]
    conn.receive_client(kp_request("MetadataRequest", 12, 1, CLIENT_ID, topics=by_id))
    conn.receive_client(kp_request("DeleteTopicsRequest", 6, 2, CLIENT_ID, timeout_ms=1,
                                   topics=[{"name": None, "topic_id": U1}, {"name": "named", "topic_id": U1}]))
    assert [r.topics for r in recorder.seen if isinstance(r, KafkaRequest)] == [
        (unknown_topic(TOPIC_ID), "known"), (unknown_topic(TOPIC_ID), "named")]
    denied = KafkaConnection(ONLY_T1).receive_client(kp_request("DeleteTopicsRequest", 6, 3, CLIENT_ID, timeout_ms=1,
                                                                 topics=[{"name": None, "topic_id": U1}]))
    resp = kp_decode_response("DeleteTopicsResponse", 6, denied.to_client)
    assert [(r.name, r.topic_id, r.error_code) for r in resp.responses] == [(None, U1, 29)]

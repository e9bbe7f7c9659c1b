"""The two places a parser can run, fed the same client/server byte streams: the network ext_proc
service (``StreamHandler``, answering Envoy's ProcessingRequests) and the in-Envoy host
(``FilterConnection``, answering the dynamic module's read/write calls). Same bytes to each side,
same close, same records (with the same connection: listener, endpoint, peer, addresses), for
Memcached (text, with the fast path, and binary), Cassandra and Kafka streams with allowed,
denied, pipelined, split and unparseable traffic; Hypothesis cuts the chunks anew."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from tests.l7parsers.cassandra_support import query, ready, rows, startup
from envoy.service.network_ext_proc.v3 import network_external_processor_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.l7parsers.kafka_support import kp_request, kp_response
from tests.l7parsers.memcache_support import binary_request, binary_response

from cilia.envoy import metadata
from cilia.envoy.inproc.host import FilterConfig, ip_port
from cilia.envoy.l7service import ConnectionInfo, StreamHandler
from cilia.envoy.l7views import PolicyViews, ViewSource
from cilia.l7parsers.base import Record
from cilia.policy import Endpoint, LabelSet, PolicyEngine, parse_text

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: differential}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "11211", protocol: TCP}]
      rules:
        l7proto: memcache
        l7:
        - {command: get, keyPrefix: ok-}
        - {command: set, keyExact: ok-1}
    - ports: [{port: "9042", protocol: TCP}]
      rules:
        l7proto: cassandra
        l7:
        - {query_action: select, query_table: "ks\\\\.allowed"}
    - ports: [{port: "9092", protocol: TCP}]
      rules:
        kafka:
        - {role: consume, topic: allowed}
"""


@dataclass
class Link:
    """The in-Envoy host's policy link, in memory."""

    views: PolicyViews
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("connections", "errors", "slow", "closed", "chunks", "python_us"), 0))
    records: list[tuple[ConnectionInfo, Record]] = field(default_factory=list)

    def add(self, info: ConnectionInfo, records: tuple[Record, ...]) -> None:
        self.records += [(info, r) for r in records]


def _views() -> tuple[PolicyViews, int]:
    engine = PolicyEngine()
    engine.upsert_endpoint(Endpoint("server", LabelSet.parse(["app=server"]), (ipaddress.ip_address("10.0.0.2"),)))
    engine.upsert_endpoint(Endpoint("client", LabelSet.parse(["app=client"]), (ipaddress.ip_address("10.0.0.1"),)))
    loaded = parse_text(POLICY, "differential.yaml")
    assert loaded.ok, [str(p) for p in loaded.problems]
    engine.apply(loaded.policies)
    return PolicyViews(3, {"server": engine.endpoint_policy("server").map_state}, {}), engine.identity_of("client").id


VIEWS, CLIENT = _views()
Event = tuple[str, bytes]  # ("c", bytes the client sent) or ("s", bytes the server sent)
Answer = tuple[bytes, bytes, bool]  # to the other side, back to the sender, closed
CLIENT_ADDRESS, SERVER_ADDRESS = "10.0.0.1:40404", "[fd00::2]:9999"  # as Envoy writes them


Decided = tuple[ConnectionInfo, Record]


def via_ext_proc(protocol: str, port: int, events: Sequence[Event]) -> tuple[list[Answer], list[Decided]]:
    records: list[Decided] = []
    stream = {**metadata.stream_metadata("l", "ingress", port, protocol),  # as Envoy expands it
              metadata.STREAM_SOURCE: CLIENT_ADDRESS, metadata.STREAM_DESTINATION: SERVER_ADDRESS}
    handler = StreamHandler(stream, ViewSource(VIEWS), lambda info, record: records.append((info, record)))
    answers: list[Answer] = []
    for side, data in events:
        request = pb.ProcessingRequest(**{"read_data" if side == "c" else "write_data": pb.Data(data=data)})
        ns = request.metadata.filter_metadata[metadata.RBAC_NAMESPACE]
        ns.fields[metadata.naming_key(metadata.PEER_PREFIX)].string_value = str(CLIENT)
        ns.fields[metadata.naming_key(metadata.LOCAL_PREFIX)].string_value = "server"
        responses = handler.handle(request)
        closed = any(r.connection_status == pb.ProcessingResponse.CLOSE for r in responses)
        if closed:
            answers.append((b"", b"", True))
            break
        onward = b"".join(r.read_data.data if side == "c" else r.write_data.data for r in responses
                          if r.HasField("read_data" if side == "c" else "write_data"))
        back = b"".join(r.write_data.data for r in responses if side == "c" and r.HasField("write_data")
                        and not r.HasField("read_data"))
        answers.append((onward, back, False))
    return answers, records


def via_inproc(protocol: str, port: int, events: Sequence[Event]) -> tuple[list[Answer], list[Decided]]:
    link = Link(VIEWS)
    names = {metadata.naming_key(metadata.PEER_PREFIX): str(CLIENT),
             metadata.naming_key(metadata.LOCAL_PREFIX): "server"}
    conn = FilterConfig("l", "ingress", port, protocol, link,
                        metadata=lambda ns, key: names.get(key) if ns == metadata.RBAC_NAMESPACE else None,
                        addresses=lambda: (ip_port(("10.0.0.1", 40404)), ip_port(("fd00::2", 9999)))).connection()
    answers: list[Answer] = []
    for side, data in events:
        answer = conn.read(data, False) if side == "c" else conn.write(data, False)
        assert answer is not None
        if answer[2]:
            answers.append((b"", b"", True))
            break
        answers.append((answer[0], answer[1], False))
    return answers, link.records


def _same(protocol: str, port: int, events: Sequence[Event]) -> None:
    assert via_inproc(protocol, port, events) == via_ext_proc(protocol, port, events)


GET = binary_request(0x00, b"ok-1")
STREAMS: dict[str, tuple[str, int, list[Event]]] = {
    "memcache-text": ("memcache", 11211, [
        ("c", b"set ok-1 0 0 1\r\nx\r\n"), ("s", b"STORED\r\n"),
        ("c", b"get ok-1\r\n"), ("s", b"VALUE ok-1 0 1\r\nx\r\nEND\r\n"),
        ("c", b"get no-1\r\n"),  # denied, answered at once
        ("c", b"get ok-1\r\nget no-1\r\nget ok-2\r\n"),  # pipelined: the denial waits its turn
        ("s", b"VALUE ok-1 0 1\r\nx\r\nEND\r\nEND\r\n"),
        ("c", b"get o"), ("c", b"k-1\r\n"), ("s", b"END\r\n"), ("c", b"bogus\r\n")]),
    "memcache-binary": ("memcache", 11211, [
        ("c", GET), ("s", binary_response(0x00, value=b"v", extras=b"\x00\x00\x00\x00")),
        ("c", binary_request(0x00, b"no-1")), ("c", GET[:10]), ("c", GET[10:]), ("s", binary_response(0x00, 1))]),
    "cassandra": ("cassandra", 9042, [
        ("c", startup(stream=0)), ("s", ready(stream=0)),
        ("c", query("SELECT * FROM ks.allowed", stream=1)), ("s", rows(3, stream=1)),
        ("c", query("SELECT * FROM ks.other", stream=2)),
        ("c", query("SELECT * FROM ks.allowed", stream=3) + query("DROP TABLE ks.allowed", stream=4)),
        ("s", rows(1, stream=3)), ("c", b"\x04\x00\x00\x05\x07junk")]),
    "kafka": ("kafka", 9092, [
        ("c", kp_request("ListOffsetsRequest", 1, 7, "t", replica_id=-1, topics=[
            {"name": "allowed", "partitions": [{"partition_index": 0, "timestamp": -1}]}])),
        ("s", kp_response("ListOffsetsResponse", 1, 7, topics=[
            {"name": "allowed", "partitions": [{"partition_index": 0, "error_code": 0, "timestamp": -1,
                                                "offset": 3}]}])),
        ("c", kp_request("ListOffsetsRequest", 1, 8, "t", replica_id=-1, topics=[
            {"name": "denied", "partitions": [{"partition_index": 0, "timestamp": -1}]}])),
        ("c", b"\x00\x00\x00\x02\xff")]),
}


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_both_modes_answer_alike(name: str) -> None:
    protocol, port, events = STREAMS[name]
    answers, records = via_inproc(protocol, port, events)
    assert records and any(not r.decision.allowed for _, r in records)  # the streams do exercise policy
    assert {(info.source, info.destination) for info, _ in records} == {(CLIENT_ADDRESS, SERVER_ADDRESS)}
    _same(protocol, port, events)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(STREAMS)), st.data())
def test_both_modes_answer_alike_in_any_chunks(name: str, data: st.DataObject) -> None:
    protocol, port, events = STREAMS[name]
    chunks: list[Event] = []
    for side, payload in events:  # every event cut into 1-3 reads
        cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=2)))
        bounds = [0, *cuts, len(payload)]
        chunks += [(side, payload[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]
    _same(protocol, port, chunks)

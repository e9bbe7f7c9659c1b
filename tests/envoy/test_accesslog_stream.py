"""The access log service over a UNIX socket, driven by a grpcio client speaking Envoy's protocol:
TCP entries, the identifier sent only once per stream, and the rule from filter state."""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import any_pb2, wrappers_pb2

from cilia.envoy.accesslog import (
    RULE_FILTER_STATE_KEY,
    AccessLogReceiver,
    Verdict,
    records_from_message,
    serve,
)


def _addr(ip: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ip, port_value=port))


def _common(termination: str = "", rule: str | None = None) -> accesslog_pb2.AccessLogCommon:
    common = accesslog_pb2.AccessLogCommon(
        downstream_remote_address=_addr("10.0.0.1", 40000),
        downstream_local_address=_addr("10.0.0.2", 9092),
        connection_termination_details=termination,
    )
    if rule is not None:
        packed = any_pb2.Any()
        packed.Pack(wrappers_pb2.StringValue(value=rule))
        common.filter_state_objects[RULE_FILTER_STATE_KEY].CopyFrom(packed)
    return common


def _tcp_message(*commons: accesslog_pb2.AccessLogCommon, log_name: str = "") -> als_pb2.StreamAccessLogsMessage:
    message = als_pb2.StreamAccessLogsMessage()
    if log_name:
        message.identifier.log_name = log_name
        message.identifier.node.id = "sidecar-1"
    for common in commons:
        message.tcp_logs.log_entry.add(common_properties=common)
    return message


def test_unix_socket_stream_records_tcp_entries(tmp_path: Path) -> None:
    receiver = AccessLogReceiver()
    server, _ = serve(f"unix:{tmp_path / 'als.sock'}", receiver)
    try:
        with grpc.insecure_channel(f"unix:{tmp_path / 'als.sock'}") as channel:
            stub = als_pb2_grpc.AccessLogServiceStub(channel)
            messages = [
                _tcp_message(_common(rule="kafka-produce"), log_name="tcp-9092"),
                # later messages carry no identifier; the stream's first one still applies
                _tcp_message(_common(termination="rbac_access_denied_matched_policy[l4-deny]")),
            ]
            stub.StreamAccessLogs(iter(messages), timeout=10)
    finally:
        server.stop(None)
    first, second = receiver.records()
    for record in (first, second):
        assert record.kind == "tcp" and record.method == "" and record.status is None
        assert (record.source_address, record.source_port) == ("10.0.0.1", 40000)
        assert (record.destination_address, record.destination_port) == ("10.0.0.2", 9092)
        assert (record.log_name, record.node_id) == ("tcp-9092", "sidecar-1")
    assert (first.verdict, first.rule) == (Verdict.FORWARDED, "kafka-produce")
    assert (second.verdict, second.rule) == (Verdict.DENIED, "l4-deny")


def test_a_bad_entry_is_logged_and_the_stream_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    def flaky(record: object) -> None:
        nonlocal calls
        calls += 1

    receiver = AccessLogReceiver(subscriber=flaky)
    original = receiver.add_entries

    def add_entries(http: object, tcp: object, identifier: object) -> object:
        if not receiver.records():
            original(http, tcp, identifier)  # type: ignore[arg-type]
            raise ValueError("broken entry")
        return original(http, tcp, identifier)  # type: ignore[arg-type]

    receiver.add_entries = add_entries  # type: ignore[method-assign,assignment]
    server, port = serve("127.0.0.1:0", receiver)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel, caplog.at_level(logging.ERROR):
            stub = als_pb2_grpc.AccessLogServiceStub(channel)
            stub.StreamAccessLogs(iter([_tcp_message(_common()), _tcp_message(_common())]), timeout=10)
    finally:
        server.stop(None)
    assert [r.seq for r in receiver.records()] == [1, 2] and calls == 2
    assert "cannot record an access log message" in caplog.text


def test_records_from_message_reads_http_entries_without_a_stream() -> None:
    message = als_pb2.StreamAccessLogsMessage()
    entry = message.http_logs.log_entry.add(protocol_version=accesslog_pb2.HTTPAccessLogEntry.HTTP2)
    entry.common_properties.CopyFrom(_common())
    entry.request.request_method = base_pb2.GET
    entry.request.path = "/pkg.Service/Method"
    entry.response.response_code.value = 403
    entry.response.response_code_details = "ext_authz_denied"  # 403, but not a local RBAC denial
    (record,) = records_from_message(message)
    assert (record.method, record.protocol, record.status) == ("GET", "HTTP/2", 403)
    assert record.verdict is Verdict.FORWARDED and record.rule == ""


def test_records_since_and_limit_follow_the_numbering() -> None:
    receiver = AccessLogReceiver(maxlen=4)
    for _ in range(3):
        receiver.add(_tcp_message(_common(), _common()))
    assert receiver.last_seq() == 6
    assert [r.seq for r in receiver.records()] == [3, 4, 5, 6]
    assert [r.seq for r in receiver.records(since=0)] == [3, 4, 5, 6]  # 1 and 2 fell out of the ring
    assert [r.seq for r in receiver.records(since=4)] == [5, 6]
    assert [r.seq for r in receiver.records(since=4, limit=1)] == [6]
    assert receiver.records(since=6) == [] and receiver.records(since=99) == []
    with pytest.raises(ValueError):
        AccessLogReceiver(maxlen=0)

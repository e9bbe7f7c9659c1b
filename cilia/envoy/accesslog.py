"""Receive Envoy's access logs over gRPC (``envoy.service.accesslog.v3.AccessLogService``).

Envoy's ``envoy.access_loggers.http_grpc`` / ``tcp_grpc`` loggers stream batches of entries to the
agent. Each entry becomes a frozen AccessRecord in a bounded in-memory ring: ``cilia observe``
reads the ring, and a subscriber (e.g. a live ``observe --follow``) is told about each new record.
Records are numbered, so a reader can ask for what arrived after the last record it saw.

The verdict is Envoy's own: a request is ``denied`` when Envoy's RBAC filter rejected it locally
(HTTP: a 403 whose response code details start with ``rbac_access_denied``; TCP: the network RBAC
filter's connection termination details), and ``forwarded`` otherwise, whatever the upstream said.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import Enum
from typing import Any

import grpc

from cilia.envoy.metadata import (
    ENFORCED_EFFECTIVE_POLICY_ID,
    HTTP_RBAC,
    NETWORK_RBAC,
    SHADOW_DENIED,
    SHADOW_EFFECTIVE_POLICY_ID,
    SHADOW_ENGINE_RESULT,
)
from cilia.ring import SeqRing
from cilia.xds.grpcserver import GrpcServer
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import wrappers_pb2

__all__ = [
    "RBAC_DENIED_PREFIX",
    "RULE_FILTER_STATE_KEY",
    "RULE_METADATA_KEY",
    "RULE_METADATA_NAMESPACE",
    "SERVICE_NAME",
    "AccessLogReceiver",
    "AccessLogServer",
    "AccessRecord",
    "Subscriber",
    "Verdict",
    "records_from_entries",
    "records_from_message",
    "serve",
]

_log = logging.getLogger(__name__)

SERVICE_NAME = "envoy.service.accesslog.v3.AccessLogService"
RBAC_DENIED_PREFIX = "rbac_access_denied"  # Envoy's response code details for an RBAC denial
# Where the deciding rule travels: dynamic metadata ``cilia`` / ``rule`` (a string), or a string
# filter state object named ``cilia.rule`` (logged when listed in filter_state_objects_to_log).
RULE_METADATA_NAMESPACE = "cilia"
RULE_METADATA_KEY = "rule"
RULE_FILTER_STATE_KEY = "cilia.rule"
_RBAC_METADATA_NAMESPACE = HTTP_RBAC
# The network RBAC keeps no decision in metadata; cilia mirrors its matcher as the shadow one.
_NETWORK_RBAC_METADATA_NAMESPACE = NETWORK_RBAC
_MATCHED_POLICY = re.compile(r"^rbac_access_denied_matched_policy\[(.*)\]$")

_HTTP_VERSIONS = {
    accesslog_pb2.HTTPAccessLogEntry.HTTP10: "HTTP/1.0",
    accesslog_pb2.HTTPAccessLogEntry.HTTP11: "HTTP/1.1",
    accesslog_pb2.HTTPAccessLogEntry.HTTP2: "HTTP/2",
    accesslog_pb2.HTTPAccessLogEntry.HTTP3: "HTTP/3",
}


class Verdict(str, Enum):
    FORWARDED = "forwarded"
    DENIED = "denied"


@dataclass(frozen=True, slots=True)
class AccessRecord:
    """One request (``kind="http"``) or connection (``kind="tcp"``) as Envoy logged it.

    Fields Envoy did not send are empty (``""``/``0``/``None``); TCP records carry only the
    connection fields. ``seq`` is the receiver's running number (1, 2, ...), ``time`` the
    request's start time in UTC."""

    seq: int
    time: datetime
    kind: str
    verdict: Verdict
    source_address: str
    source_port: int
    destination_address: str
    destination_port: int
    method: str = ""
    path: str = ""
    authority: str = ""
    protocol: str = ""
    status: int | None = None
    response_code_details: str = ""
    response_flags: tuple[str, ...] = ()
    termination_details: str = ""
    log_name: str = ""  # the access log's log_name: cilia names it after the listener
    route_name: str = ""
    node_id: str = ""
    rule: str = ""  # the deciding rule, when Envoy's metadata names one
    audit: bool = False  # let through in audit mode although the policy (RBAC shadow) refused it
    duration: float = 0.0  # HTTP: seconds from the request's first byte to the response's last one sent
    upstream_reply: float = 0.0  # HTTP: seconds until the upstream's whole reply arrived (0: none came)

    @property
    def denied(self) -> bool:
        return self.verdict is Verdict.DENIED


Subscriber = Callable[[AccessRecord], None]


class AccessLogReceiver:
    """The ring of the last ``maxlen`` records; thread-safe. The subscriber runs on the gRPC
    stream's thread after the lock is released (records from two Envoy streams may reach it out
    of ``seq`` order); if it raises, the error is logged and the records are kept."""

    def __init__(self, maxlen: int = 10_000, subscriber: Subscriber | None = None) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self.subscriber = subscriber
        self._lock = threading.Lock()  # numbers records and appends them as one step
        self._ring: SeqRing[AccessRecord] = SeqRing(maxlen)

    @property
    def maxlen(self) -> int:
        return self._ring.maxlen

    def add(self, message: Any) -> list[AccessRecord]:
        """Record one StreamAccessLogsMessage; ``identifier`` may be unset (Envoy sends it only
        in a stream's first message)."""
        return self.add_entries(message.http_logs.log_entry, message.tcp_logs.log_entry,
                                message.identifier)

    def add_entries(self, http: Iterable[Any], tcp: Iterable[Any], identifier: Any) -> list[AccessRecord]:
        parsed = records_from_entries(http, tcp, identifier)  # outside the lock: the slow part
        with self._lock:
            first = self._ring.last_seq() + 1
            added = [replace(r, seq=n) for n, r in enumerate(parsed, start=first)]
            self._ring.extend(added)
        subscriber = self.subscriber
        if subscriber is not None:
            for record in added:
                try:
                    subscriber(record)
                except Exception:
                    _log.exception("access log subscriber failed on record %d", record.seq)
        return added

    def records(self, since: int | None = None, limit: int | None = None) -> list[AccessRecord]:
        """Records with ``seq > since`` (all kept ones if None), oldest first; with ``limit``,
        only the newest ``limit`` of them."""
        return [r for _, r in self._ring.since(since, limit)]

    def last_seq(self) -> int:
        """The number of the newest record ever received (0 before the first)."""
        return self._ring.last_seq()


def records_from_message(message: Any, identifier: Any = None) -> list[AccessRecord]:
    """The records in one StreamAccessLogsMessage, numbered from 1 (for tests and tools)."""
    ident = identifier if identifier is not None else message.identifier
    records = records_from_entries(message.http_logs.log_entry, message.tcp_logs.log_entry, ident)
    return [replace(record, seq=n) for n, record in enumerate(records, start=1)]


def records_from_entries(http: Iterable[Any], tcp: Iterable[Any],
                         identifier: Any) -> list[AccessRecord]:
    """One record per entry, HTTP ones first, all with ``seq`` 0 (the receiver numbers them)."""
    log_name: str = identifier.log_name if identifier is not None else ""
    node_id: str = identifier.node.id if identifier is not None else ""
    return ([_http_record(entry, log_name, node_id) for entry in http]
            + [_tcp_record(entry, log_name, node_id) for entry in tcp])


def _http_record(entry: Any, log_name: str, node_id: str) -> AccessRecord:
    common, request, response = entry.common_properties, entry.request, entry.response
    src, sport = _address(common.downstream_remote_address)
    dst, dport = _address(common.downstream_local_address)
    status = response.response_code.value if response.HasField("response_code") else None
    details: str = response.response_code_details
    denied = status == 403 and details.startswith(RBAC_DENIED_PREFIX)
    audit = not denied and _shadow_refused(common, _RBAC_METADATA_NAMESPACE)
    return AccessRecord(
        seq=0,
        time=_time(common),
        kind="http",
        verdict=Verdict.DENIED if denied else Verdict.FORWARDED,
        source_address=src, source_port=sport, destination_address=dst, destination_port=dport,
        method=base_pb2.RequestMethod.Name(request.request_method) if request.request_method else "",
        path=request.path,
        authority=request.authority,
        protocol=_HTTP_VERSIONS.get(entry.protocol_version, ""),
        status=status,
        response_code_details=details,
        response_flags=_flags(common.response_flags),
        termination_details=common.connection_termination_details,
        log_name=log_name,
        route_name=common.route_name,
        node_id=node_id,
        rule=_shadow_rule(common, _RBAC_METADATA_NAMESPACE) if audit else _rule(common, details),
        audit=audit,
        duration=_seconds(common, "time_to_last_downstream_tx_byte"),
        upstream_reply=_seconds(common, "time_to_last_upstream_rx_byte"),
    )


def _seconds(common: Any, name: str) -> float:
    """One of Envoy's request timings (a Duration from the request's start), 0 if unset."""
    if not common.HasField(name):
        return 0.0
    d = getattr(common, name)
    return float(d.seconds + d.nanos / 1e9)


def _shadow_refused(common: Any, namespace: str) -> bool:
    """The RBAC filter's shadow matcher (audit mode's real policy) refused this."""
    meta = common.metadata.filter_metadata.get(namespace)
    value = meta.fields.get(SHADOW_ENGINE_RESULT) if meta is not None else None
    return value is not None and value.string_value == SHADOW_DENIED


def _shadow_rule(common: Any, namespace: str) -> str:
    meta = common.metadata.filter_metadata.get(namespace)
    value = meta.fields.get(SHADOW_EFFECTIVE_POLICY_ID) if meta is not None else None
    return str(value.string_value) if value is not None else ""


def _tcp_record(entry: Any, log_name: str, node_id: str) -> AccessRecord:
    common = entry.common_properties
    src, sport = _address(common.downstream_remote_address)
    dst, dport = _address(common.downstream_local_address)
    termination: str = common.connection_termination_details
    denied = termination.startswith(RBAC_DENIED_PREFIX)
    return AccessRecord(
        seq=0,
        time=_time(common),
        kind="tcp",
        verdict=Verdict.DENIED if denied else Verdict.FORWARDED,
        audit=not denied and _shadow_refused(common, _NETWORK_RBAC_METADATA_NAMESPACE),
        source_address=src, source_port=sport, destination_address=dst, destination_port=dport,
        response_flags=_flags(common.response_flags),
        termination_details=termination,
        log_name=log_name,
        route_name=common.route_name,
        node_id=node_id,
        rule=_rule(common, termination),
    )


def _address(address: Any) -> tuple[str, int]:
    """``(ip, port)`` of a socket address, ``(path, 0)`` of a pipe, ``("", 0)`` if unset."""
    if address.HasField("socket_address"):
        return address.socket_address.address, address.socket_address.port_value
    if address.HasField("pipe"):
        return address.pipe.path, 0
    return "", 0


def _time(common: Any) -> datetime:
    if common.HasField("start_time"):
        return common.start_time.ToDatetime(tzinfo=UTC)  # type: ignore[no-any-return]
    return datetime.now(UTC)


def _flags(flags: Any) -> tuple[str, ...]:
    """The names of the response flags Envoy set (``unauthorized_details`` counts when present)."""
    names = [field.name for field, value in flags.ListFields()
             if field.name == "unauthorized_details" or value is True]
    return tuple(sorted(names))


def _rule(common: Any, details: str) -> str:
    """The deciding rule: cilia's own metadata or filter state first, then the policy RBAC
    named (enforced, in its metadata or its denial details)."""
    metadata = common.metadata.filter_metadata
    if RULE_METADATA_NAMESPACE in metadata:
        value = metadata[RULE_METADATA_NAMESPACE].fields.get(RULE_METADATA_KEY)
        if value is not None and value.WhichOneof("kind") == "string_value":
            return str(value.string_value)
    state = common.filter_state_objects
    if RULE_FILTER_STATE_KEY in state:
        text = _any_string(state[RULE_FILTER_STATE_KEY])
        if text:
            return text
    if _RBAC_METADATA_NAMESPACE in metadata:
        value = metadata[_RBAC_METADATA_NAMESPACE].fields.get(ENFORCED_EFFECTIVE_POLICY_ID)
        if value is not None and value.string_value:
            return str(value.string_value)
    if _NETWORK_RBAC_METADATA_NAMESPACE in metadata:
        value = metadata[_NETWORK_RBAC_METADATA_NAMESPACE].fields.get(SHADOW_EFFECTIVE_POLICY_ID)
        if value is not None and value.string_value:
            return str(value.string_value)
    matched = _MATCHED_POLICY.match(details)
    if matched and matched.group(1) != "none":
        return matched.group(1)
    return ""


def _any_string(packed: Any) -> str:
    """A filter state object packed as StringValue (how Envoy serializes its string objects)."""
    if packed.Is(wrappers_pb2.StringValue.DESCRIPTOR):
        value = wrappers_pb2.StringValue()
        packed.Unpack(value)
        return str(value.value)
    return ""


class AccessLogServer(GrpcServer):
    """grpcio server for StreamAccessLogs feeding one AccessLogReceiver. Each Envoy worker
    thread keeps a stream open, and each open stream holds one of ``max_streams`` threads."""

    def __init__(self, receiver: AccessLogReceiver, max_streams: int = 32) -> None:
        self.receiver = receiver
        handler = grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "StreamAccessLogs": grpc.stream_unary_rpc_method_handler(
                self._stream,
                request_deserializer=als_pb2.StreamAccessLogsMessage.FromString,
                response_serializer=als_pb2.StreamAccessLogsResponse.SerializeToString,
            ),
        })
        super().__init__([handler], max_streams, "accesslog")

    def _stream(self, messages: Iterator[Any], context: grpc.ServicerContext) -> Any:
        identifier = None
        try:
            for message in messages:
                if message.HasField("identifier"):
                    identifier = message.identifier
                try:
                    self.receiver.add_entries(message.http_logs.log_entry, message.tcp_logs.log_entry,
                                              identifier)
                except Exception:  # a bad entry must not end the stream (grpcio would drop it quietly)
                    _log.exception("cannot record an access log message from %s", context.peer())
        except grpc.RpcError:
            pass  # Envoy went away; what it sent so far is kept
        return als_pb2.StreamAccessLogsResponse()


def serve(address: str, receiver: AccessLogReceiver | None = None,
          max_streams: int = 32) -> tuple[AccessLogServer, int]:
    """Start an AccessLogServer on ``address`` (``127.0.0.1:0`` picks a port; ``unix:PATH``);
    returns it (``.receiver`` holds the records; call ``stop()``) and the bound port."""
    server = AccessLogServer(receiver if receiver is not None else AccessLogReceiver(), max_streams)
    port = server.add_address(address)
    server.start()
    return server, port

"""Kafka: the sans-I/O parser of one client connection to a broker.

Requests (int32 size, header v1/v2, body) are read whole and decoded from Apache Kafka's schemas
(``kafka_schema``); each is one ``KafkaRequest`` carrying all the topics it names. An allowed
request is forwarded unchanged; a denied one is answered here with the API's own response and an
authorization error (``kafka_replies``), in reply order, and never reaches the broker. Produce
with acks=0 gets no response, so its denial sends nothing.

Responses are matched to requests by order and correlation id. Most pass through as they arrive
(a Fetch response may be far larger than any request); two are read whole and rewritten:

* ApiVersions: each API's range is cut to what the schemas know and what still names topics
  (Fetch, Produce <= 12; OffsetCommit, OffsetFetch <= 9), and APIs without a schema are dropped,
  so that clients never pick a version this parser would refuse or could not check by name.
* Metadata: topics the client may not see (a Metadata request for that topic alone is denied)
  are dropped from an answer to "all topics" or errored with 29 when named; topic ids seen here
  feed the id -> name map for requests that name topics by id (Fetch v13+ from a client that did
  not negotiate). An id the map does not know is denied by every rule that names a topic.

A version the schemas do not know, bytes that do not decode, or a frame over ``max_buffer`` raise
``ProtocolError``; nothing unread is forwarded (nor anything else from the chunk that held them:
the host closes the connection). The one exception to "unknown version" is
ApiVersions itself, which Kafka clients send at their newest version: it gets the broker's answer
to that (v0, UNSUPPORTED_VERSION and the versions known here) so the client retries lower.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from cilia.policy.flows import KafkaRequest
from cilia.policy.l7.kafka import api_key_name

from . import kafka_replies as replies
from . import kafka_schema as schema
from .base import DEFAULT_MAX_BUFFER, Check, L7Connection, Output, ProtocolError, Record, ReplyQueue, decide
from .kafka_codec import (
    CodecError,
    correlation_id_of,
    decode_body,
    RequestHeader,
    decode_request_header,
    encode_body,
    frame,
    frame_size,
    peek_request_key,
    response_header_size,
)
from .kafka_schema import Layout, Struct, Value
from .kafka_topics import learn_topic_ids, request_topics

MIN_REQUEST = 10  # api_key, api_version, correlation_id, client_id length
MIN_RESPONSE = 4  # correlation_id


@dataclass(frozen=True, slots=True)
class _Pending:
    """A forwarded request whose response is due."""

    correlation_id: int
    api_key: int
    api_version: int
    client_id: str
    named: bool  # Metadata: the client listed topics (rather than asking for all)
    withheld: tuple[Value, ...] = ()  # Metadata: the request's denied topics, answered here with error 29


class KafkaConnection(L7Connection):
    """``topic_ids``: the id -> name map learned from Metadata responses; hosts may share one
    dict between the connections to one cluster (ids are cluster-wide)."""

    protocol = "kafka"

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER,
                 topic_ids: dict[bytes, str] | None = None) -> None:
        super().__init__(check, max_buffer)
        self.topic_ids: dict[bytes, str] = {} if topic_ids is None else topic_ids
        self._requests = bytearray()
        self._responses = bytearray()
        self._queue = ReplyQueue()
        self._pending: deque[_Pending] = deque()
        self._streaming = 0  # bytes of a pass-through response still to come
        self._failed: ProtocolError | None = None

    # --- client -> server ---------------------------------------------------

    def receive_client(self, data: bytes) -> Output:
        self._alive()
        if not data:
            if self._requests:
                raise self._fail("client", f"closed inside a request ({len(self._requests)} bytes buffered)")
            return Output()
        self._requests += data
        to_server = bytearray()
        to_client = bytearray()
        records: list[Record] = []
        buf = self._requests
        while len(buf) >= 4:
            size = frame_size(buf)
            if size < MIN_REQUEST or size > self.max_buffer:
                raise self._fail("client", f"bad request size {size}")
            if len(buf) < 4 + size:
                break
            whole = bytes(buf[:4 + size])
            del buf[:4 + size]
            try:
                forward, reply, record = self._request(whole)
            except CodecError as e:
                raise self._fail("client", str(e)) from None
            to_server += forward
            to_client += reply
            records.append(record)
        return Output(bytes(to_server), bytes(to_client), tuple(records))

    def _request(self, whole: bytes) -> tuple[bytes, bytes, Record]:
        """(bytes for the server, bytes for the client, the record) of one request frame."""
        payload = whole[4:]
        api_key, version = peek_request_key(payload)
        known = schema.request_versions(api_key)
        if api_key == replies.API_VERSIONS and not known.empty and version > known.hi:
            return self._newer_api_versions(payload, version)
        layout = schema.request_layout(api_key, version)
        if layout is None or version not in known:
            raise self._fail("client", f"unknown request: API key {api_key} version {version}")
        header = decode_request_header(payload, layout.flexible)
        body = decode_body(layout, payload, header.body)
        topics = request_topics(layout, body, self.topic_ids)
        client_id = header.client_id or ""
        # Metadata v1+ with an empty list asks about no topic (how clients learn the brokers)
        no_topics = api_key == replies.METADATA and version >= 1 and body.get("Topics") == []
        decision = decide(self.check, [KafkaRequest(api_key, version, client_id, topics, not no_topics)])
        record = Record(_summary(api_key, version, client_id, topics, header.correlation_id), decision)
        answered = not (api_key == replies.PRODUCE and body.get("Acks") == 0)
        if decision.allowed:
            if answered:
                self._queue.forwarded()
                named = isinstance(body.get("Topics"), list) and bool(body["Topics"])
                self._pending.append(_Pending(header.correlation_id, api_key, version, client_id, named))
            return whole, b"", record
        if not answered:
            return b"", b"", record
        if api_key == replies.METADATA and version >= 1 and topics:
            return self._metadata_without(payload, layout, header, body, client_id) + (record,)
        reply = replies.denial(api_key, version, header.correlation_id, body, bool(topics))
        return b"", self._queue.denied(reply), record

    def _metadata_without(self, payload: bytes, layout: Layout, header: RequestHeader, body: Struct,
                          client_id: str) -> tuple[bytes, bytes]:
        """A Metadata request naming a topic the client may not see is sent on without those
        topics (a v1+ empty list asks about none), and the response answers them with error 29:
        the client gets the brokers and learns the topic is not authorized, as from a broker's
        ACLs, while the broker never hears of the topic (nor auto-creates it)."""
        version = header.api_version

        def visible(entry: Value) -> bool:
            name = entry.get("Name") if isinstance(entry, dict) else None
            return isinstance(name, str) and decide(self.check, [
                KafkaRequest(replies.METADATA, version, client_id, (name,))]).allowed

        entries = body["Topics"]
        assert isinstance(entries, list)
        kept = [e for e in entries if visible(e)]
        withheld = tuple(e for e in entries if not visible(e))
        forward = frame(payload[:header.body] + encode_body(layout, {**body, "Topics": kept}))
        self._queue.forwarded()
        self._pending.append(_Pending(header.correlation_id, replies.METADATA, version, client_id, True, withheld))
        return forward, b""

    def _newer_api_versions(self, payload: bytes, version: int) -> tuple[bytes, bytes, Record]:
        header = decode_request_header(payload, True)  # ApiVersions is flexible from v3 on
        client_id = header.client_id or ""
        decision = decide(self.check, [KafkaRequest(replies.API_VERSIONS, version, client_id)])
        record = Record(_summary(replies.API_VERSIONS, version, client_id, (), header.correlation_id), decision)
        if decision.allowed:
            reply = replies.unsupported_api_versions(header.correlation_id)
        else:
            reply = replies.denial(replies.API_VERSIONS, 0, header.correlation_id, {}, False)
        return b"", self._queue.denied(reply), record

    # --- server -> client ---------------------------------------------------

    def receive_server(self, data: bytes) -> Output:
        self._alive()
        if not data:
            if self._responses or self._streaming:
                raise self._fail("server", "closed inside a response")
            return Output()
        self._responses += data
        to_client = bytearray()
        buf = self._responses
        try:
            while buf:
                if self._streaming:
                    n = min(self._streaming, len(buf))
                    to_client += buf[:n]
                    del buf[:n]
                    self._streaming -= n
                    if not self._streaming:
                        to_client += self._replied()
                    continue
                if len(buf) >= 4 and frame_size(buf) < MIN_RESPONSE:
                    raise self._fail("server", f"bad response size {frame_size(buf)}")
                if len(buf) < 8:
                    break
                size = frame_size(buf)
                if not self._pending:
                    raise self._fail("server", "a response to no outstanding request")
                pending = self._pending[0]
                cid = correlation_id_of(bytes(buf[4:8]))
                if cid != pending.correlation_id:
                    raise self._fail("server", f"correlation id {cid}, expected {pending.correlation_id}")
                if pending.api_key not in (replies.API_VERSIONS, replies.METADATA):
                    self._streaming = 4 + size
                    continue
                if size > self.max_buffer:
                    raise self._fail("server", f"response of {size} bytes exceeds the buffer limit")
                if len(buf) < 4 + size:
                    break
                payload = bytes(buf[4:4 + size])
                del buf[:4 + size]
                to_client += self._rewrite(pending, payload)
                to_client += self._replied()
        except CodecError as e:
            raise self._fail("server", str(e)) from None
        return Output(to_client=bytes(to_client))

    def _replied(self) -> bytes:
        """The oldest forwarded request was answered: the denials queued behind it are due."""
        self._pending.popleft()
        return self._queue.replied()

    def _rewrite(self, pending: _Pending, payload: bytes) -> bytes:
        if pending.api_key == replies.API_VERSIONS:
            return self._api_versions(pending, payload)
        return self._metadata(pending, payload)

    def _api_versions(self, pending: _Pending, payload: bytes) -> bytes:
        # Header v0 always. A broker that does not know the request's version answers v0 with an
        # error, so (like Kafka's clients) an error response is read as v0 first, then as sent.
        versions = [pending.api_version, 0]
        if payload[4:6] != b"\x00\x00":
            versions.reverse()
        error: CodecError | None = None
        for version in versions:
            layout = schema.response_layout(replies.API_VERSIONS, version)
            if layout is None:
                continue
            try:
                body = decode_body(layout, payload, 4)
            except CodecError as e:
                error = error or e
                continue
            if not replies.cap_api_versions(body):
                return frame(payload)
            return frame(payload[:4] + encode_body(layout, body))
        raise error or CodecError(f"no ApiVersions response schema for v{pending.api_version}")

    def _metadata(self, pending: _Pending, payload: bytes) -> bytes:
        layout = schema.response_layout(replies.METADATA, pending.api_version)
        if layout is None:
            raise self._fail("server", f"no Metadata response schema for v{pending.api_version}")
        start = response_header_size(payload, layout.flexible)
        body = decode_body(layout, payload, start)
        learn_topic_ids(body.get("Topics"), self.topic_ids)

        def allowed(topic: str) -> bool:
            request = KafkaRequest(replies.METADATA, pending.api_version, pending.client_id, (topic,))
            return decide(self.check, [request]).allowed

        changed = replies.filter_metadata(body, allowed, pending.named)
        if pending.withheld:
            errored = replies.denial_body(layout, {"Topics": list(pending.withheld)}, True).get("Topics")
            topics = body.get("Topics")
            body["Topics"] = [*(topics if isinstance(topics, list) else []),
                              *(errored if isinstance(errored, list) else [])]
            changed = True
        if not changed:
            return frame(payload)
        return frame(payload[:start] + encode_body(layout, body))

    # --- failure ------------------------------------------------------------

    def _fail(self, side: str, message: str) -> ProtocolError:
        self._failed = ProtocolError(side, message)
        return self._failed

    def _alive(self) -> None:
        if self._failed is not None:
            raise ProtocolError(self._failed.side, f"connection already failed: {self._failed.message}")


def _summary(api_key: int, version: int, client_id: str, topics: tuple[str, ...],
             correlation_id: int) -> dict[str, str]:
    return {"api_key": api_key_name(api_key), "api_version": str(version), "client_id": client_id,
            "topic": ",".join(topics), "correlation_id": str(correlation_id)}


__all__ = ["KafkaConnection"]

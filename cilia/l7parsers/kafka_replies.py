"""Responses the parser makes or rewrites: denials, the ApiVersions cap, Metadata filtering.

A denial is the API's own response, encoded from its schema, that answers the request element by
element with an authorization error, as a broker whose ACLs deny it would: Produce, Fetch,
ListOffsets, OffsetCommit/OffsetFetch and the other partition-level APIs per partition; Metadata,
CreateTopics and DeleteTopics per topic; the rest through their top-level (or per-group,
per-resource) error code. ``ECHOES`` says, per API, which response array answers which request
array; anything a table does not fill keeps the schema's default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cilia.policy.l7.kafka import TOPIC_API_KEYS

from . import kafka_schema as schema
from .kafka_codec import encode_body, encode_response_header, frame
from .kafka_schema import Field, Layout, Struct, Value
from .kafka_topics import CONFIG_APIS, TOPIC_RESOURCE

TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
CLUSTER_AUTHORIZATION_FAILED = 31
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53
UNSUPPORTED_VERSION = 35

#: Kafka's own texts for them (``Errors.message()``), for responses that carry an error message.
MESSAGES = {
    TOPIC_AUTHORIZATION_FAILED: "Topic authorization failed.",
    GROUP_AUTHORIZATION_FAILED: "Group authorization failed.",
    CLUSTER_AUTHORIZATION_FAILED: "Cluster authorization failed.",
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED: "Transactional Id authorization failed.",
}

PRODUCE, METADATA, FIND_COORDINATOR, API_VERSIONS, INIT_PRODUCER_ID = 0, 3, 10, 18, 22

GROUP_APIS = frozenset({10, 11, 12, 13, 14, 15, 42, 47})  # FindCoordinator, Join/Heartbeat/Leave/Sync, ...
TRANSACTION_APIS = frozenset({22, 25, 26, 65})  # InitProducerId, AddOffsetsToTxn, EndTxn, DescribeTransactions

_SELF = ""  # in an Echo's ``copy``: the request element itself (an array of strings or ints)


@dataclass(frozen=True, slots=True)
class Echo:
    """A response array built from a request array, one element per request element.

    ``request`` is the path of request arrays to walk (two steps flatten, as AlterReplicaLogDirs
    answers Dirs[].Topics[] with one flat list); ``copy`` pairs (response field, request field);
    ``error`` is the element's error field, set on every element, or with ``leaf`` only on
    elements whose nested echoes answered nothing (e.g. OffsetFetch v8+ for all of a group's
    topics); ``fixed`` sets other fields."""

    response: str
    request: tuple[str, ...]
    copy: tuple[tuple[str, str], ...] = ()
    error: str = "ErrorCode"
    leaf: bool = False
    fixed: tuple[tuple[str, Value], ...] = ()
    nested: tuple[Echo, ...] = ()


def _partitions(response: str, request: str, index: tuple[str, str], error: str = "ErrorCode",
                fixed: tuple[tuple[str, Value], ...] = ()) -> Echo:
    return Echo(response, (request,), (index,), error, fixed=fixed)


_NAME = (("Name", "Name"), ("TopicId", "TopicId"))

#: Per API key: the echoes of the response's top level. A top-level ``ErrorCode`` is set when
#: the response has one and no echo answered anything (e.g. a request for all topics).
ECHOES: dict[int, tuple[Echo, ...]] = {
    0: (Echo("Responses", ("TopicData",), _NAME, "", nested=(
        _partitions("PartitionResponses", "PartitionData", ("Index", "Index"), fixed=(("BaseOffset", -1),)),)),),
    1: (Echo("Responses", ("Topics",), (("Topic", "Topic"), ("TopicId", "TopicId")), "", nested=(
        _partitions("Partitions", "Partitions", ("PartitionIndex", "Partition"),
                    fixed=(("HighWatermark", -1),)),)),),
    2: (Echo("Topics", ("Topics",), _NAME, "", nested=(
        _partitions("Partitions", "Partitions", ("PartitionIndex", "PartitionIndex")),)),),
    3: (Echo("Topics", ("Topics",), _NAME),),
    8: (Echo("Topics", ("Topics",), _NAME, "", nested=(
        _partitions("Partitions", "Partitions", ("PartitionIndex", "PartitionIndex")),)),),
    9: (Echo("Topics", ("Topics",), _NAME, "", nested=(
            _partitions("Partitions", "PartitionIndexes", ("PartitionIndex", _SELF),
                        fixed=(("CommittedOffset", -1),)),)),
        Echo("Groups", ("Groups",), (("GroupId", "GroupId"),), leaf=True, nested=(
            Echo("Topics", ("Topics",), _NAME, "", nested=(
                _partitions("Partitions", "PartitionIndexes", ("PartitionIndex", _SELF),
                            fixed=(("CommittedOffset", -1),)),)),))),
    10: (Echo("Coordinators", ("CoordinatorKeys",), (("Key", _SELF),), fixed=(("NodeId", -1), ("Port", -1))),),
    15: (Echo("Groups", ("Groups",), (("GroupId", _SELF),)),),
    19: (Echo("Topics", ("Topics",), (("Name", "Name"),), fixed=(("Configs", None),)),),
    20: (Echo("Responses", ("TopicNames",), (("Name", _SELF),)),
         Echo("Responses", ("Topics",), _NAME)),
    21: (Echo("Topics", ("Topics",), _NAME, "", nested=(
        _partitions("Partitions", "Partitions", ("PartitionIndex", "PartitionIndex"),
                    fixed=(("LowWatermark", -1),)),)),),
    23: (Echo("Topics", ("Topics",), (("Topic", "Topic"),), "", nested=(
        _partitions("Partitions", "Partitions", ("Partition", "Partition")),)),),
    24: (Echo("ResultsByTopicV3AndBelow", ("V3AndBelowTopics",), (("Name", "Name"),), "", nested=(
            _partitions("ResultsByPartition", "Partitions", ("PartitionIndex", _SELF), "PartitionErrorCode"),)),
         Echo("ResultsByTransaction", ("Transactions",), (("TransactionalId", "TransactionalId"),), "", nested=(
             Echo("TopicResults", ("Topics",), (("Name", "Name"),), "", nested=(
                 _partitions("ResultsByPartition", "Partitions", ("PartitionIndex", _SELF),
                             "PartitionErrorCode"),)),))),
    27: (Echo("Markers", ("Markers",), (("ProducerId", "ProducerId"),), "", nested=(
        Echo("Topics", ("Topics",), (("Name", "Name"),), "", nested=(
            _partitions("Partitions", "PartitionIndexes", ("PartitionIndex", _SELF)),)),)),),
    28: (Echo("Topics", ("Topics",), (("Name", "Name"),), "", nested=(
        _partitions("Partitions", "Partitions", ("PartitionIndex", "PartitionIndex")),)),),
    30: (Echo("Results", ("Creations",)),),
    31: (Echo("FilterResults", ("Filters",)),),
    32: (Echo("Results", ("Resources",), (("ResourceType", "ResourceType"), ("ResourceName", "ResourceName"))),),
    33: (Echo("Responses", ("Resources",), (("ResourceType", "ResourceType"), ("ResourceName", "ResourceName"))),),
    34: (Echo("Results", ("Dirs", "Topics"), (("TopicName", "Name"),), "", nested=(
        _partitions("Partitions", "Partitions", ("PartitionIndex", _SELF)),)),),
    37: (Echo("Results", ("Topics",), (("Name", "Name"),)),),
    42: (Echo("Results", ("GroupsNames",), (("GroupId", _SELF),)),),
    43: (Echo("ReplicaElectionResults", ("TopicPartitions",), (("Topic", "Topic"),), "", nested=(
        _partitions("PartitionResult", "Partitions", ("PartitionId", _SELF)),)),),
    44: (Echo("Responses", ("Resources",), (("ResourceType", "ResourceType"), ("ResourceName", "ResourceName"))),),
    45: (Echo("Responses", ("Topics",), (("Name", "Name"),), "", nested=(
        _partitions("Partitions", "Partitions", ("PartitionIndex", "PartitionIndex")),)),),
    47: (Echo("Topics", ("Topics",), (("Name", "Name"),), "", nested=(
        _partitions("Partitions", "Partitions", ("PartitionIndex", "PartitionIndex")),)),),
    49: (Echo("Entries", ("Entries",), (("Entity", "Entity"),)),),
    51: (Echo("Results", ("Deletions",), (("User", "Name"),)),
         Echo("Results", ("Upsertions",), (("User", "Name"),))),
    61: (Echo("Topics", ("Topics",), (("Name", "Name"),), "", nested=(
        _partitions("Partitions", "PartitionIndexes", ("PartitionIndex", _SELF)),)),),
    65: (Echo("TransactionStates", ("TransactionalIds",), (("TransactionalId", _SELF),)),),
    75: (Echo("Topics", ("Topics",), (("Name", "Name"),)),),
}


def error_code(api_key: int, request: Struct, named: bool) -> int:
    """The authorization error of a denied request: 29 when it names topics or is of an API that
    carries them (``named``: it named some), else 30 for group APIs, 53 for transactional ones
    and 31 for the rest."""
    if named or api_key in TOPIC_API_KEYS:
        return TOPIC_AUTHORIZATION_FAILED
    if api_key == FIND_COORDINATOR and request.get("KeyType") == 1:
        return TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    if api_key == INIT_PRODUCER_ID and request.get("TransactionalId") is None:
        return CLUSTER_AUTHORIZATION_FAILED  # an idempotent producer needs IdempotentWrite on the cluster
    if api_key in GROUP_APIS:
        return GROUP_AUTHORIZATION_FAILED
    if api_key in TRANSACTION_APIS:
        return TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    return CLUSTER_AUTHORIZATION_FAILED


@dataclass(frozen=True, slots=True)
class _Codes:
    code: int
    config: bool  # config resources: a topic's error is 29, a broker's 31

    def of(self, element: Struct) -> int:
        if self.config and "ResourceType" in element:
            return TOPIC_AUTHORIZATION_FAILED if element["ResourceType"] == TOPIC_RESOURCE \
                else CLUSTER_AUTHORIZATION_FAILED
        return self.code


def _elements(request: Struct, path: tuple[str, ...]) -> list[Value] | None:
    """The request elements at ``path`` (None: the request has no such array at this version)."""
    if path[0] not in request:
        return None
    items = request[path[0]]
    if not isinstance(items, list):
        return []
    if len(path) == 1:
        return list(items)
    out: list[Value] = []
    for item in items:
        if isinstance(item, dict):
            out += _elements(item, path[1:]) or []
    return out


def _fill(fields: tuple[Field, ...], request: Struct, echoes: tuple[Echo, ...], codes: _Codes) -> tuple[Struct, bool]:
    """A response struct answering ``request``; True when some echo produced an element."""
    out = schema.defaults(fields)
    answered = False
    for echo in echoes:
        f = next((x for x in fields if x.name == echo.response and x.array and x.struct), None)
        items = _elements(request, echo.request)
        if f is None or items is None:
            continue
        target = out[f.name]
        if not isinstance(target, list):
            target = out[f.name] = []
        for item in items:
            target.append(_answer(f, item, echo, codes))
            answered = True
    return out, answered


def _answer(f: Field, item: Value, echo: Echo, codes: _Codes) -> Struct:
    sub = item if isinstance(item, dict) else {}
    element, answered = _fill(f.fields, sub, echo.nested, codes)
    members = {m.name: m for m in f.fields}
    for dst, src in echo.copy:
        m = members.get(dst)
        if m is None or (src != _SELF and src not in sub):
            continue
        v = item if src == _SELF else sub[src]
        element[dst] = v if v is not None or m.nullable else schema.default_of(m)
    for name, v in echo.fixed:
        m = members.get(name)
        if m is not None and (v is not None or m.nullable):
            element[name] = v
    if echo.error in members and not (echo.leaf and answered):
        _set_error(element, echo.error, codes.of(sub))
    return element


def _set_error(struct: Struct, field: str, code: int) -> None:
    struct[field] = code
    if "ErrorMessage" in struct:
        struct["ErrorMessage"] = MESSAGES.get(code)


def denial_body(layout: Layout, request: Struct, named: bool) -> Struct:
    """The response body (at ``layout``, the request's version) denying ``request``."""
    codes = _Codes(error_code(layout.api_key, request, named), layout.api_key in CONFIG_APIS)
    body, answered = _fill(layout.fields, request, ECHOES.get(layout.api_key, ()), codes)
    if not answered and "ErrorCode" in body:
        _set_error(body, "ErrorCode", codes.code)
    return body


def response_frame(api_key: int, version: int, correlation_id: int, body: Struct) -> bytes:
    """A whole response frame: header v0, or v1 when the response is flexible (never for
    ApiVersions, whose response header is always v0 so that any client can read it)."""
    layout = schema.response_layout(api_key, version)
    if layout is None:
        raise ValueError(f"no response schema for api {api_key} v{version}")
    tagged = layout.flexible and api_key != API_VERSIONS
    return frame(encode_response_header(correlation_id, tagged) + encode_body(layout, body))


def denial(api_key: int, version: int, correlation_id: int, request: Struct, named: bool) -> bytes:
    """The whole response frame denying ``request`` (``named``: it named topics)."""
    if api_key == API_VERSIONS:
        # Clients read an ApiVersions response with an error as v0 (that is what a broker sends
        # for a version it does not know), whatever version they asked for.
        version = 0
    layout = schema.response_layout(api_key, version)
    if layout is None:
        raise ValueError(f"no response schema for api {api_key} v{version}")
    return response_frame(api_key, version, correlation_id, denial_body(layout, request, named))


def unsupported_api_versions(correlation_id: int) -> bytes:
    """What a broker answers an ApiVersions request of a version it does not know: v0 with
    UNSUPPORTED_VERSION and the ApiVersions range it does know; the client retries with that."""
    known = schema.request_versions(API_VERSIONS)
    body: Struct = {"ErrorCode": UNSUPPORTED_VERSION,
                    "ApiKeys": [{"ApiKey": API_VERSIONS, "MinVersion": known.lo, "MaxVersion": known.hi}]}
    return response_frame(API_VERSIONS, 0, correlation_id, body)


# --- rewrites of the broker's responses ---------------------------------------


def cap_api_versions(body: Struct) -> bool:
    """Advertise only what the parser can check: each API's range is cut to the versions the
    schemas know that still name topics (Fetch <= 12, Produce <= 12, OffsetCommit and
    OffsetFetch <= 9); APIs without a schema are dropped. Produce keeps the broker's minimum,
    as Kafka 4 does for librdkafka (KAFKA-18659), though v0-2 requests are still refused.
    True when the list changed."""
    keys = body.get("ApiKeys")
    if not isinstance(keys, list):
        return False
    kept: list[Value] = []
    for entry in keys:
        if not isinstance(entry, dict):
            continue
        key, lo, hi = entry.get("ApiKey"), entry.get("MinVersion"), entry.get("MaxVersion")
        if not (isinstance(key, int) and isinstance(lo, int) and isinstance(hi, int)):
            continue
        ours = schema.named_versions(key)
        new_lo = lo if key == PRODUCE else max(lo, ours.lo)
        new_hi = min(hi, ours.hi)
        if ours.empty or new_lo > new_hi or max(lo, ours.lo) > new_hi:
            continue
        kept.append({**entry, "MinVersion": new_lo, "MaxVersion": new_hi})
    if kept == keys:
        return False
    body["ApiKeys"] = kept
    return True


def filter_metadata(body: Struct, allowed: Callable[[str], bool], requested: bool) -> bool:
    """Hide the topics the client may not see: dropped from an answer to "all topics" (as a
    broker's ACLs would), answered with error 29 and no partitions when the client named them.
    True when the body changed."""
    topics = body.get("Topics")
    if not isinstance(topics, list):
        return False
    changed = False
    kept: list[Value] = []
    for t in topics:
        name = t.get("Name") if isinstance(t, dict) else None
        if isinstance(t, dict) and isinstance(name, str) and allowed(name):
            kept.append(t)
            continue
        changed = True
        if requested and isinstance(t, dict):
            kept.append({**t, "ErrorCode": TOPIC_AUTHORIZATION_FAILED, "Partitions": [], "TopicId": schema.ZERO_UUID,
                         "IsInternal": False})
    if changed:
        body["Topics"] = kept
    return changed

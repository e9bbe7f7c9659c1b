"""The topics a decoded Kafka request names, as policy checks them.

Found from the schema, not per API: every field whose ``entityType`` is ``topicName`` (a string
or an array of strings) at any depth, a Fetch's forgotten topics too (every name counts), plus
the resource name of a topic resource (type 2) in DescribeConfigs, AlterConfigs and
IncrementalAlterConfigs. A struct that identifies its topic by ``TopicId`` (Fetch v13+, Produce
v13, Metadata and DeleteTopics by id) is resolved through the topic-id map learned from Metadata
responses; an id the map does not know becomes a name no topic rule can match
(``unknown_topic``), so it is denied by every rule that names a topic.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping

from .kafka_schema import ZERO_UUID, Field, Layout, Struct, Value

CONFIG_APIS = frozenset({32, 33, 44})  # DescribeConfigs, AlterConfigs, IncrementalAlterConfigs
TOPIC_RESOURCE = 2  # ConfigResource.Type.TOPIC


def topic_id_text(topic_id: bytes) -> str:
    """Kafka's text form of a topic id (url-safe base64, no padding)."""
    return base64.urlsafe_b64encode(topic_id).decode("ascii").rstrip("=")


def unknown_topic(topic_id: bytes) -> str:
    # ':' is outside the topic alphabet ([a-zA-Z0-9._-]), so no rule's topic equals this.
    return "topic-id:" + topic_id_text(topic_id)


def request_topics(layout: Layout, body: Struct, topic_ids: Mapping[bytes, str]) -> tuple[str, ...]:
    """The distinct topics of a request in order of appearance."""
    found: dict[str, None] = {}
    _walk(layout.fields, body, topic_ids, found, layout.api_key in CONFIG_APIS)
    return tuple(found)


def _walk(fields: tuple[Field, ...], value: Struct, topic_ids: Mapping[bytes, str], found: dict[str, None],
          config: bool) -> None:
    named = False
    for f in fields:
        v = value.get(f.name)
        if f.entity == "topicName" and f.type == "string":
            for name in (v if f.array and isinstance(v, list) else [v]):
                if isinstance(name, str):
                    found[name] = None
                    named = True
        elif f.struct:
            for item in _structs(f, v):
                _walk(f.fields, item, topic_ids, found, config)
    topic_id = value.get("TopicId")
    if not named and isinstance(topic_id, bytes) and any(f.name == "TopicId" for f in fields):
        found[topic_ids.get(topic_id) or unknown_topic(topic_id)] = None
    if config and value.get("ResourceType") == TOPIC_RESOURCE:
        name = value.get("ResourceName")
        if isinstance(name, str):
            found[name] = None


def _structs(f: Field, v: Value) -> list[Struct]:
    if isinstance(v, dict):
        return [v]
    if isinstance(v, list):
        return [item for item in v if isinstance(item, dict)]
    return []


def learn_topic_ids(topics: Value, topic_ids: dict[bytes, str]) -> None:
    """Remember id -> name from a Metadata (or CreateTopics) response's topic list."""
    if not isinstance(topics, list):
        return
    for t in topics:
        if not isinstance(t, dict):
            continue
        name, topic_id = t.get("Name"), t.get("TopicId")
        if isinstance(name, str) and isinstance(topic_id, bytes) and topic_id != ZERO_UUID:
            topic_ids[topic_id] = name

"""Apache Kafka's message schemas, compiled per API version.

kafka-python ships the JSON message definitions of Apache Kafka (``kafka/protocol/schemas/
resources/*.json``: ``validVersions``, ``flexibleVersions`` and fields with ``versions``,
``nullableVersions``, ``taggedVersions``, ``entityType``). They are read once at import; a
``Layout`` (the fields one version of one message has, in wire order) is compiled on first use
and cached. Only the JSON is used: none of kafka-python's code runs (importing its package
would load a whole client, and it warns on import).

A version the schema does not list (or marks unstable) has no layout: the parser fails closed.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

SCHEMA_DIR = ("protocol", "schemas", "resources")  # inside the kafka-python package
MAX_VERSION = 0x7FFF

#: A decoded value: ints (also for int8..int64, uint16), floats, bools, str, bytes (bytes,
#: records, and a uuid's 16 bytes), lists for arrays and dicts for structs; None for null.
Value: TypeAlias = None | bool | int | float | str | bytes | list["Value"] | dict[str, "Value"]
Struct: TypeAlias = dict[str, Value]

#: Key of a struct's tagged fields that the schema does not know: {str(tag): raw bytes}.
UNKNOWN_TAGS = "_unknown_tags"

PRIMITIVES = frozenset({"bool", "int8", "int16", "uint16", "int32", "int64", "float64",
                        "string", "bytes", "records", "uuid"})

ZERO_UUID = bytes(16)


class SchemaError(Exception):
    """A schema this module cannot compile (an unknown type, a bad version range)."""


@dataclass(frozen=True, slots=True)
class Versions:
    """An inclusive version range; ``none`` is the empty range."""

    lo: int
    hi: int

    def __contains__(self, version: object) -> bool:
        return isinstance(version, int) and self.lo <= version <= self.hi

    @property
    def empty(self) -> bool:
        return self.lo > self.hi

    @classmethod
    def parse(cls, text: str | None) -> Versions:
        if text is None or text == "none":
            return NO_VERSIONS
        m = re.fullmatch(r"(\d+)(\+|-(\d+))?", text.strip())
        if m is None:
            raise SchemaError(f"bad version range {text!r}")
        lo = int(m.group(1))
        if m.group(2) == "+":
            return cls(lo, MAX_VERSION)
        return cls(lo, int(m.group(3)) if m.group(3) else lo)


NO_VERSIONS = Versions(1, 0)


@dataclass(frozen=True, slots=True)
class Field:
    """One field of a struct as one version encodes it."""

    name: str
    type: str  # a primitive name, or "struct"
    array: bool
    nullable: bool
    tag: int | None  # the tag when this version sends the field as a tagged field
    default: Value
    entity: str  # entityType: topicName, groupId, transactionalId, brokerId, ... or ""
    fields: tuple[Field, ...] = ()  # a struct's members

    @property
    def struct(self) -> bool:
        return self.type == "struct"

    def member(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


@dataclass(frozen=True, slots=True)
class Layout:
    """One message at one version: its top-level fields and whether it uses the flexible
    (compact, tagged) encoding."""

    name: str
    api_key: int
    version: int
    flexible: bool
    fields: tuple[Field, ...]

    def member(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


_Json: TypeAlias = Mapping[str, Any]  # a field's JSON object, as written


@dataclass(frozen=True, slots=True)
class _Message:
    name: str
    api_key: int
    valid: Versions
    flexible: Versions
    fields: tuple[_Json, ...]


def _strip_comments(text: str) -> str:
    # The files are JSON with whole-line // comments (Apache's license header and notes).
    return re.sub(r"(?m)^\s*//.*$", "", text)


def _resolve_common(fields: list[dict[str, Any]], common: Mapping[str, Any]) -> None:
    for f in fields:
        inner = str(f["type"]).removeprefix("[]")
        if inner in common and "fields" not in f:
            f["fields"] = common[inner]
        sub = f.get("fields")
        if isinstance(sub, list):
            _resolve_common(sub, common)


def schema_dir() -> Path:
    """kafka-python's schema directory, found without importing the package."""
    spec = importlib.util.find_spec("kafka")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("kafka-python (the Kafka message schemas) is not installed")
    return Path(next(iter(spec.submodule_search_locations)), *SCHEMA_DIR)


def _load() -> tuple[dict[int, _Message], dict[int, _Message]]:
    requests: dict[int, _Message] = {}
    responses: dict[int, _Message] = {}
    for entry in sorted(schema_dir().glob("*.json")):
        data = json.loads(_strip_comments(entry.read_text(encoding="utf-8")))
        kind = data.get("type")
        if kind not in ("request", "response") or not isinstance(data.get("apiKey"), int):
            continue  # headers and embedded data (ConsumerProtocol*) are not messages
        common = {str(s["name"]): s["fields"] for s in data.get("commonStructs", [])}
        fields = data.get("fields", [])
        _resolve_common(fields, common)
        valid = Versions.parse(data["validVersions"])
        if data.get("latestVersionUnstable") and not valid.empty:
            # An unstable version's format may still change: treat it as unknown.
            valid = Versions(valid.lo, valid.hi - 1)
        message = _Message(data["name"], data["apiKey"], valid, Versions.parse(data.get("flexibleVersions")),
                           tuple(fields))
        (requests if kind == "request" else responses)[message.api_key] = message
    return requests, responses


_REQUESTS, _RESPONSES = _load()


def _default(type_: str, text: Any, nullable: bool) -> Value:
    if text == "null" and nullable:
        return None
    s = "" if text is None else str(text)
    if type_ in ("int8", "int16", "uint16", "int32", "int64"):
        return int(s, 0) if s else 0
    if type_ == "float64":
        return float(s) if s else 0.0
    if type_ == "bool":
        return s.lower() == "true"
    if type_ == "string":
        return s
    if type_ == "uuid":
        return ZERO_UUID
    return b""  # bytes, records


def _compile_field(spec: _Json, version: int, flexible: bool) -> Field | None:
    if version not in Versions.parse(str(spec["versions"])):
        return None
    name = str(spec["name"])
    type_text = str(spec["type"])
    array = type_text.startswith("[]")
    inner = type_text.removeprefix("[]")
    nullable = version in Versions.parse(spec.get("nullableVersions"))
    tag: int | None = None
    if flexible and version in Versions.parse(spec.get("taggedVersions")):
        tag = int(spec["tag"])
    entity = str(spec.get("entityType", ""))
    default_text = spec.get("default")
    members: tuple[Field, ...] = ()
    if inner in PRIMITIVES:
        kind = inner
    elif inner[:1].isupper() and isinstance(spec.get("fields"), list):
        kind = "struct"
        members = _compile_fields(spec["fields"], version, flexible)
    else:
        raise SchemaError(f"field {name}: unknown type {type_text!r}")
    default: Value
    if array:
        default = None if default_text == "null" and nullable else []
    elif kind == "struct":
        default = None if default_text == "null" and nullable else _struct_default(members)
    else:
        default = _default(kind, default_text, nullable)
    return Field(name, kind, array, nullable, tag, default, entity, members)


def _struct_default(fields: tuple[Field, ...]) -> Struct:
    return {f.name: _copy(f.default) for f in fields}


def _copy(value: Value) -> Value:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def default_of(field: Field) -> Value:
    """A fresh copy of the field's default (lists and dicts are never shared)."""
    return _copy(field.default)


def defaults(fields: tuple[Field, ...]) -> Struct:
    return _struct_default(fields)


def _compile_fields(specs: list[_Json], version: int, flexible: bool) -> tuple[Field, ...]:
    out = [f for f in (_compile_field(s, version, flexible) for s in specs) if f is not None]
    tags = [f.tag for f in out if f.tag is not None]
    if len(tags) != len(set(tags)):
        raise SchemaError("duplicate tag")
    return tuple(out)


@functools.cache
def _layout(kind: str, api_key: int, version: int) -> Layout | None:
    message = (_REQUESTS if kind == "request" else _RESPONSES).get(api_key)
    if message is None or version not in message.valid:
        return None
    flexible = version in message.flexible
    try:
        fields = _compile_fields(list(message.fields), version, flexible)
    except (SchemaError, KeyError, ValueError, TypeError):
        return None  # a schema we cannot compile is a version we do not know
    return Layout(message.name, api_key, version, flexible, fields)


def request_layout(api_key: int, version: int) -> Layout | None:
    return _layout("request", api_key, version)


def response_layout(api_key: int, version: int) -> Layout | None:
    return _layout("response", api_key, version)


def request_versions(api_key: int) -> Versions:
    """The request versions the schemas know (valid, stable, and with a response schema)."""
    request = _REQUESTS.get(api_key)
    response = _RESPONSES.get(api_key)
    if request is None or response is None:
        return NO_VERSIONS
    return Versions(max(request.valid.lo, response.valid.lo), min(request.valid.hi, response.valid.hi))


def request_flexible(api_key: int, version: int) -> bool:
    message = _REQUESTS.get(api_key)
    return message is not None and version in message.flexible


def response_flexible(api_key: int, version: int) -> bool:
    message = _RESPONSES.get(api_key)
    return message is not None and version in message.flexible


def api_keys() -> tuple[int, ...]:
    """Every API key with both a request and a response schema."""
    return tuple(sorted(k for k in _REQUESTS if k in _RESPONSES))


def names_topics(layout: Layout) -> bool:
    """False when some struct of the layout identifies topics by id only (Produce v13+, Fetch
    v13+, OffsetCommit/OffsetFetch v10+): such a version cannot be checked against topic
    names without a topic-id map."""

    def ok(fields: tuple[Field, ...]) -> bool:
        has_id = any(f.name == "TopicId" and f.type == "uuid" for f in fields)
        has_name = any(f.entity == "topicName" for f in fields)
        if has_id and not has_name:
            return False
        return all(ok(f.fields) for f in fields if f.struct)

    return ok(layout.fields)


@functools.cache
def named_versions(api_key: int) -> Versions:
    """The known request versions up to the last one that still names its topics: what the
    parser advertises to clients (see ``kafka_replies.cap_api_versions``)."""
    known = request_versions(api_key)
    hi = known.lo - 1
    for v in range(known.lo, known.hi + 1):
        layout = request_layout(api_key, v)
        if layout is None or not names_topics(layout):
            break
        hi = v
    return Versions(known.lo, hi)

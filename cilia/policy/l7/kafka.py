"""Kafka rules (``rules.kafka[]``): parsing and matching, as Cilium ≤1.18 did.

Cilium removed Kafka policy in 1.19/1.20; cilia keeps the proxylib semantics:
a rule's ``role`` or ``apiKey`` picks the API keys it allows, and a request
that names topics is allowed only when every one of its topics is allowed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .._fields import fields, strict_string, string
from .._yaml import Node
from ..errors import Problem
from ..flows import KafkaRequest
from ..model import KafkaRule

#: Cilium's API key names (``APIKeyMap``); other keys can be given by number.
API_KEYS: dict[str, int] = {
    "produce": 0,
    "fetch": 1,
    "offsets": 2,
    "metadata": 3,
    "leaderandisr": 4,
    "stopreplica": 5,
    "updatemetadata": 6,
    "controlledshutdown": 7,
    "offsetcommit": 8,
    "offsetfetch": 9,
    "findcoordinator": 10,
    "joingroup": 11,
    "heartbeat": 12,
    "leavegroup": 13,
    "syncgroup": 14,
    "describegroups": 15,
    "listgroups": 16,
    "saslhandshake": 17,
    "apiversions": 18,
    "createtopics": 19,
    "deletetopics": 20,
    "deleterecords": 21,
    "initproducerid": 22,
    "offsetforleaderepoch": 23,
    "addpartitionstotxn": 24,
    "addoffsetstotxn": 25,
    "endtxn": 26,
    "writetxnmarkers": 27,
    "txnoffsetcommit": 28,
    "describeacls": 29,
    "createacls": 30,
    "deleteacls": 31,
    "describeconfigs": 32,
    "alterconfigs": 33,
}

_NAMES = {key: name for name, key in API_KEYS.items()}

#: What a role expands to: the keys a producer or consumer client needs.
ROLES: dict[str, frozenset[int]] = {
    "produce": frozenset({0, 3, 18}),
    "consume": frozenset({1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}),
}

#: API keys whose requests carry topics (Cilium's ``isTopicAPIKey``). A request
#: of one of these without topics (e.g. Metadata for *all* topics) is allowed
#: only by a rule without a topic; other keys ignore a rule's topic.
TOPIC_API_KEYS = frozenset({0, 1, 2, 3, 4, 5, 6, 8, 9, 19, 20, 21, 23, 24, 27, 28, 34, 35, 37})

MAX_API_KEY = MAX_API_VERSION = 32767  # int16
MAX_TOPIC_LEN = 255  # Kafka 0.10 lowered it to 249; Cilium kept 255 for old brokers
_TOPIC = re.compile(r"[a-zA-Z0-9._-]+")
_DECIMAL = re.compile(r"[0-9]+")

_RULE_FIELDS = ("role", "apiKey", "apiVersion", "clientID", "topic")


def parse_api_key(text: str) -> int:
    """An API key given by Cilium name (any case) or by number."""
    word = text.strip()
    key = API_KEYS.get(word.lower())
    if key is not None:
        return key
    if _DECIMAL.fullmatch(word):
        if len(word) <= 5 and int(word) <= MAX_API_KEY:
            return int(word)
        raise ValueError(f"Kafka API key {word} is out of range [0, {MAX_API_KEY}]")
    raise ValueError(
        f"unknown Kafka API key {text!r} (use a name such as 'produce' or 'fetch', "
        f"or a number 0-{MAX_API_KEY})"
    )


def api_key_name(key: int) -> str:
    """Cilium's name of an API key, or the number for keys without one."""
    return _NAMES.get(key, str(key))


# --- parsing -------------------------------------------------------------------


def parse_rule(node: Node, problems: list[Problem]) -> KafkaRule | None:
    """One ``kafka[]`` item; empty strings mean "not set", as in Cilium."""
    start = len(problems)
    kids = fields(node, _RULE_FIELDS, problems)
    if kids is None:
        return None
    role = _role(kids.get("role"), problems)
    api_key, key = _api_key(kids.get("apiKey"), problems)
    if role is not None and api_key is not None:
        problems.append(kids["apiKey"].problem(
            "cannot be combined with role (a role already stands for a set of API keys)"
        ))
    api_version = _api_version(kids.get("apiVersion"), problems)
    client_id = _optional_string(kids.get("clientID"), problems)
    topic = _topic(kids.get("topic"), problems)
    if len(problems) > start:
        return None
    if role is not None:
        api_keys = ROLES[role]
    elif key is not None:
        api_keys = frozenset({key})
    else:
        api_keys = frozenset()
    return KafkaRule(role, api_key, api_keys, api_version, client_id, topic, node.source)


def _optional_string(node: Node | None, problems: list[Problem]) -> str | None:
    if node is None:
        return None
    return strict_string(node, problems) or None


def _role(node: Node | None, problems: list[Problem]) -> str | None:
    text = _optional_string(node, problems)
    if node is None or text is None:
        return None
    role = text.lower()
    if role not in ROLES:
        problems.append(node.problem(f"invalid Kafka role {text!r} (expected produce or consume)"))
        return None
    return role


def _api_key(node: Node | None, problems: list[Problem]) -> tuple[str | None, int | None]:
    """(canonical name, number) of ``apiKey``; a YAML number is read as its text."""
    if node is None:
        return None, None
    text = string(node, problems)
    if not text:
        return None, None
    try:
        key = parse_api_key(text)
    except ValueError as exc:
        problems.append(node.problem(str(exc)))
        return None, None
    return api_key_name(key), key


def _api_version(node: Node | None, problems: list[Problem]) -> int | None:
    """``apiVersion``: a decimal string (Cilium's type) or a YAML integer, int16 >= 0."""
    if node is None:
        return None
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        problems.append(node.problem(f"expected a decimal string or an integer, got {node.type_name}"))
        return None
    if value == "":
        return None
    if isinstance(value, str) and not _DECIMAL.fullmatch(value):
        problems.append(node.problem(f"invalid Kafka apiVersion {value!r} (expected a decimal number)"))
        return None
    text = str(value)
    if text.startswith("-") or len(text.lstrip("0")) > 5 or int(text) > MAX_API_VERSION:
        problems.append(node.problem(f"apiVersion {text} is out of range [0, {MAX_API_VERSION}]"))
        return None
    return int(text)


def _topic(node: Node | None, problems: list[Problem]) -> str | None:
    topic = _optional_string(node, problems)
    if node is None or topic is None:
        return None
    if len(topic) > MAX_TOPIC_LEN:
        problems.append(node.problem(
            f"topic is {len(topic)} characters long; the maximum is {MAX_TOPIC_LEN}"
        ))
        return None
    if not _TOPIC.fullmatch(topic):
        problems.append(node.problem(
            f"invalid Kafka topic {topic!r}: only letters, digits, '.', '_' and '-' are allowed"
        ))
        return None
    return topic


# --- matching ------------------------------------------------------------------


def _matches_header(rule: KafkaRule, req: KafkaRequest) -> bool:
    """API key, version and client ID: everything but the topic."""
    return (
        (not rule.api_keys or req.api_key in rule.api_keys)
        and (rule.api_version is None or rule.api_version == req.api_version)
        and (not rule.client_id or rule.client_id == req.client_id)
    )


def evaluate(rules: Sequence[KafkaRule], req: KafkaRequest) -> tuple[KafkaRule, ...]:
    """The rules that decide the request (one per topic, deduplicated); empty = denied.

    Different topics may be allowed by different rules. A request without
    topics needs one header-matching rule; when it asks about every topic
    (``all_topics``: Metadata v0's empty list, a null list) of a topic-carrying
    API key (see ``TOPIC_API_KEYS``), that rule must not name a topic, as in
    Cilium. A request asking about no topic at all (Metadata v1+ with an empty
    list, how clients learn the brokers) passes any header-matching rule.
    """
    candidates = [rule for rule in rules if _matches_header(rule, req)]
    if not req.topics:
        if req.api_key in TOPIC_API_KEYS and req.all_topics:
            candidates = [rule for rule in candidates if rule.topic is None]
        return (candidates[0],) if candidates else ()
    deciding: list[KafkaRule] = []
    for topic in req.topics:
        rule = next((r for r in candidates if r.topic is None or r.topic == topic), None)
        if rule is None:
            return ()
        if rule not in deciding:
            deciding.append(rule)
    return tuple(deciding)


def describe(rule: KafkaRule) -> str:
    """Short text for traces, e.g. ``role=produce topic=deathstar-plans``."""
    parts: list[str] = []
    if rule.role is not None:
        parts.append(f"role={rule.role}")
    if rule.api_key is not None:
        parts.append(f"apiKey={rule.api_key}")
    if rule.api_version is not None:
        parts.append(f"apiVersion={rule.api_version}")
    if rule.client_id is not None:
        parts.append(f"clientID={rule.client_id}")
    if rule.topic is not None:
        parts.append(f"topic={rule.topic}")
    return " ".join(parts) if parts else "any Kafka request"

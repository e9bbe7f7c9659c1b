"""Kafka rules: validation errors, role expansion and Cilium's topic semantics."""

from __future__ import annotations

import pytest

from cilia.policy.flows import KafkaRequest
from cilia.policy.l7 import kafka
from cilia.policy.model import KafkaRule
from tests.helpers import parse_l7_rule, valid_l7_rule


def parse(text: str) -> tuple[KafkaRule | None, list[str]]:
    return parse_l7_rule(kafka.parse_rule, text, "kafka[0]")


def rule(text: str) -> KafkaRule:
    return valid_l7_rule(kafka.parse_rule, text, "kafka[0]")


PRODUCE, FETCH, METADATA, HEARTBEAT = 0, 1, 3, 12


# --- API keys ------------------------------------------------------------------


def test_api_key_table_is_cilium_s() -> None:
    assert len(kafka.API_KEYS) == 34
    assert sorted(kafka.API_KEYS.values()) == list(range(34))
    assert kafka.API_KEYS["offsetforleaderepoch"] == 23
    assert kafka.API_KEYS["alterconfigs"] == 33


def test_roles() -> None:
    assert kafka.ROLES["produce"] == {0, 3, 18}
    assert kafka.ROLES["consume"] == {1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18}


@pytest.mark.parametrize(("text", "key"), [
    ("produce", 0), ("Fetch", 1), ("APIVERSIONS", 18), ("alterconfigs", 33), ("42", 42), ("32767", 32767),
    (" metadata ", 3),
])
def test_parse_api_key(text: str, key: int) -> None:
    assert kafka.parse_api_key(text) == key


@pytest.mark.parametrize(("text", "message"), [
    ("producer", "unknown Kafka API key 'producer' (use a name such as 'produce' or 'fetch', or a number 0-32767)"),
    ("-1", "unknown Kafka API key '-1' (use a name such as 'produce' or 'fetch', or a number 0-32767)"),
    ("", "unknown Kafka API key '' (use a name such as 'produce' or 'fetch', or a number 0-32767)"),
    ("32768", "Kafka API key 32768 is out of range [0, 32767]"),
    ("1" * 40, f"Kafka API key {'1' * 40} is out of range [0, 32767]"),
])
def test_parse_api_key_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        kafka.parse_api_key(text)
    assert str(info.value) == message


def test_api_key_name() -> None:
    assert kafka.api_key_name(0) == "produce"
    assert kafka.api_key_name(32) == "describeconfigs"
    assert kafka.api_key_name(42) == "42"


# --- parsing -------------------------------------------------------------------


def test_role_expands_and_is_case_insensitive() -> None:
    parsed = rule("""
        role: Produce
        topic: deathstar-plans
    """)
    assert (parsed.role, parsed.api_key, parsed.topic) == ("produce", None, "deathstar-plans")
    assert parsed.api_keys == {0, 3, 18}


def test_api_key_by_name_or_number() -> None:
    by_name = rule("{apiKey: Fetch, apiVersion: '2', clientID: app}")
    assert (by_name.api_key, by_name.api_keys, by_name.api_version, by_name.client_id) == (
        "fetch", frozenset({1}), 2, "app")
    by_number = rule("{apiKey: 3, apiVersion: 0}")
    assert (by_number.api_key, by_number.api_keys, by_number.api_version) == ("metadata", frozenset({3}), 0)
    unnamed = rule("{apiKey: '50'}")
    assert (unnamed.api_key, unnamed.api_keys) == ("50", frozenset({50}))


def test_empty_rule_and_empty_strings_allow_any_key() -> None:
    parsed = rule("""
        role: ""
        apiKey: ""
        apiVersion: ""
        clientID: ""
        topic: ""
    """)
    assert parsed.api_keys == frozenset()
    assert (parsed.role, parsed.api_key, parsed.api_version, parsed.client_id, parsed.topic) == (None,) * 5


def test_role_and_api_key_are_mutually_exclusive() -> None:
    parsed, problems = parse("""
        role: produce
        apiKey: fetch
    """)
    assert parsed is None
    assert problems == [
        "t.yaml:3: kafka[0].apiKey: cannot be combined with role (a role already stands for a set of API keys)"
    ]


def test_validation_errors_name_their_field() -> None:
    parsed, problems = parse(f"""
        role: admin
        apiKey: producer
        apiVersion: v1
        clientID: 12
        topic: {"t" * 256}
        topics: x
    """)
    assert parsed is None
    assert problems == [
        "t.yaml:7: kafka[0].topics: unknown field 'topics' (did you mean 'topic'?)",
        "t.yaml:2: kafka[0].role: invalid Kafka role 'admin' (expected produce or consume)",
        "t.yaml:3: kafka[0].apiKey: unknown Kafka API key 'producer' "
        "(use a name such as 'produce' or 'fetch', or a number 0-32767)",
        "t.yaml:4: kafka[0].apiVersion: invalid Kafka apiVersion 'v1' (expected a decimal number)",
        "t.yaml:5: kafka[0].clientID: expected a string, got integer",
        "t.yaml:6: kafka[0].topic: topic is 256 characters long; the maximum is 255",
    ]


@pytest.mark.parametrize(("value", "message"), [
    ("32768", "apiVersion 32768 is out of range [0, 32767]"),
    ("'32768'", "apiVersion 32768 is out of range [0, 32767]"),
    ("-1", "apiVersion -1 is out of range [0, 32767]"),
    ("'-1'", "invalid Kafka apiVersion '-1' (expected a decimal number)"),
    ("'123456789012345678901234'", "apiVersion 123456789012345678901234 is out of range [0, 32767]"),
    ("true", "expected a decimal string or an integer, got boolean"),
    ("1.5", "expected a decimal string or an integer, got number"),
])
def test_api_version_errors(value: str, message: str) -> None:
    _, problems = parse(f"apiVersion: {value}")
    assert problems == [f"t.yaml:1: kafka[0].apiVersion: {message}"]


def test_api_version_limits() -> None:
    assert rule("apiVersion: 32767").api_version == 32767
    assert rule("apiVersion: '007'").api_version == 7
    assert rule("apiVersion: '0000000000000001'").api_version == 1


@pytest.mark.parametrize("topic", ["a/b", "'with space'", "'t*'", "'ünïcode'"])
def test_invalid_topic_characters(topic: str) -> None:
    _, problems = parse(f"topic: {topic}")
    shown = topic.strip("'")
    assert problems == [
        f"t.yaml:1: kafka[0].topic: invalid Kafka topic {shown!r}: only letters, digits, '.', '_' and '-' are allowed"
    ]


def test_longest_topic_is_accepted() -> None:
    assert rule(f"topic: {'a._-' * 63}xyz").topic == "a._-" * 63 + "xyz"


def test_apikey_of_wrong_type() -> None:
    _, problems = parse("apiKey: [produce]")
    assert problems == ["t.yaml:1: kafka[0].apiKey: expected a string, got list"]


# --- matching ------------------------------------------------------------------


def test_role_allows_its_keys_only() -> None:
    produce = rule("{role: produce, topic: plans}")
    assert kafka.evaluate([produce], KafkaRequest(PRODUCE, 5, topics=("plans",))) == (produce,)
    assert kafka.evaluate([produce], KafkaRequest(METADATA, 1, topics=("plans",))) == (produce,)
    assert kafka.evaluate([produce], KafkaRequest(18, 0)) == (produce,)
    assert kafka.evaluate([produce], KafkaRequest(FETCH, 5, topics=("plans",))) == ()
    consume = rule("{role: consume}")
    assert kafka.evaluate([consume], KafkaRequest(FETCH, 5, topics=("x",))) == (consume,)
    assert kafka.evaluate([consume], KafkaRequest(PRODUCE, 5, topics=("x",))) == ()


def test_api_version_and_client_id_must_match_when_set() -> None:
    parsed = rule("{apiKey: produce, apiVersion: '2', clientID: hq}")
    assert kafka.evaluate([parsed], KafkaRequest(PRODUCE, 2, "hq", ("t",))) == (parsed,)
    assert kafka.evaluate([parsed], KafkaRequest(PRODUCE, 3, "hq", ("t",))) == ()
    assert kafka.evaluate([parsed], KafkaRequest(PRODUCE, 2, "outpost", ("t",))) == ()


def test_empty_rule_allows_everything() -> None:
    anything = rule("{}")
    assert kafka.evaluate([anything], KafkaRequest(33, 7, "c", ("a", "b"))) == (anything,)
    assert kafka.evaluate([anything], KafkaRequest(HEARTBEAT, 0)) == (anything,)


def test_every_topic_must_be_allowed() -> None:
    plans = rule("{role: produce, topic: plans}")
    assert kafka.evaluate([plans], KafkaRequest(PRODUCE, 0, topics=("plans", "secrets"))) == ()


def test_different_topics_may_be_allowed_by_different_rules() -> None:
    plans = rule("{role: produce, topic: plans}")
    secrets = rule("{apiKey: produce, topic: secrets}")
    fetch = rule("{apiKey: fetch, topic: other}")
    req = KafkaRequest(PRODUCE, 0, topics=("secrets", "plans", "secrets"))
    assert kafka.evaluate([fetch, plans, secrets], req) == (secrets, plans)


def test_a_topic_less_rule_allows_every_topic() -> None:
    plans = rule("{role: produce, topic: plans}")
    any_topic = rule("{apiKey: produce}")
    req = KafkaRequest(PRODUCE, 0, topics=("plans", "other"))
    assert kafka.evaluate([plans, any_topic], req) == (plans, any_topic)
    assert kafka.evaluate([any_topic, plans], req) == (any_topic,)


def test_topic_less_request_ignores_the_rule_topic() -> None:
    consume = rule("{role: consume, topic: plans}")
    assert kafka.evaluate([consume], KafkaRequest(HEARTBEAT, 0)) == (consume,)
    assert kafka.evaluate([consume], KafkaRequest(PRODUCE, 0)) == ()  # header does not match


def test_topic_less_request_of_a_topic_key_needs_a_topic_less_rule() -> None:
    # Metadata without topics asks about every topic: Cilium denies it to topic-bound rules.
    bound = rule("{role: produce, topic: plans}")
    assert kafka.evaluate([bound], KafkaRequest(METADATA, 0)) == ()
    free = rule("{apiKey: metadata}")
    assert kafka.evaluate([bound, free], KafkaRequest(METADATA, 0)) == (free,)


def test_no_rules_denies() -> None:
    assert kafka.evaluate([], KafkaRequest(PRODUCE, 0, topics=("t",))) == ()


@pytest.mark.parametrize(("text", "expected"), [
    ("{role: produce, topic: deathstar-plans}", "role=produce topic=deathstar-plans"),
    ("{apiKey: Fetch, apiVersion: 1, clientID: hq}", "apiKey=fetch apiVersion=1 clientID=hq"),
    ("{}", "any Kafka request"),
])
def test_describe(text: str, expected: str) -> None:
    assert kafka.describe(rule(text)) == expected

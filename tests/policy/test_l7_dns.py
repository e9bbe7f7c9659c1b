"""DNS rules: matchName / matchPattern validation and matching."""

from __future__ import annotations

import pytest

from cilia.policy.errors import SourceRef
from cilia.policy.flows import DNSRequest
from cilia.policy.l7 import dns
from cilia.policy.model import DNSRule
from tests.helpers import parse_l7_rule, valid_l7_rule


def parse(text: str) -> tuple[DNSRule | None, list[str]]:
    return parse_l7_rule(dns.parse_rule, text, "dns[0]")


def rule(text: str) -> DNSRule:
    return valid_l7_rule(dns.parse_rule, text, "dns[0]")


def allows(text: str, name: str) -> bool:
    return dns.rule_matches(rule(text), DNSRequest(name))


# --- parsing -------------------------------------------------------------------


def test_parses_name_and_pattern() -> None:
    by_name = rule("matchName: cilium.io")
    assert (by_name.match_name, by_name.match_pattern) == ("cilium.io", None)
    by_pattern = rule("matchPattern: '*.cilium.io.'")
    assert (by_pattern.match_name, by_pattern.match_pattern) == (None, "*.cilium.io.")


def test_exactly_one_field_must_be_set() -> None:
    parsed, problems = parse("""
        matchName: cilium.io
        matchPattern: '*.cilium.io'
    """)
    assert parsed is None
    assert problems == ["t.yaml:3: dns[0].matchPattern: cannot be combined with matchName (set exactly one)"]
    _, problems = parse("{}")
    assert problems == ["t.yaml:1: dns[0]: one of matchName or matchPattern is required"]
    _, problems = parse("matchName: ''")
    assert problems == ["t.yaml:1: dns[0]: one of matchName or matchPattern is required"]


@pytest.mark.parametrize("name", ["'*.cilium.io'", "'a b.io'", "a..b", ".cilium.io", "'ex@mple.com'", "a.b.."])
def test_invalid_match_name(name: str) -> None:
    _, problems = parse(f"matchName: {name}")
    assert problems == [
        f"t.yaml:1: dns[0].matchName: invalid DNS name {name.strip(chr(39))!r}: "
        "use labels of letters, digits, '-', '_' separated by single dots"
    ]


@pytest.mark.parametrize("pattern", ["'*..io'", "'?.cilium.io'", "'*.cilium.io/x'", "'.'"])
def test_invalid_match_pattern(pattern: str) -> None:
    _, problems = parse(f"matchPattern: {pattern}")
    assert problems == [
        f"t.yaml:1: dns[0].matchPattern: invalid DNS pattern {pattern.strip(chr(39))!r}: "
        "use labels of letters, digits, '-', '_', '*' separated by single dots"
    ]


def test_unknown_field_and_wrong_type() -> None:
    parsed, problems = parse("""
        matchNames: cilium.io
        matchPattern: [a]
    """)
    assert parsed is None
    assert problems == [
        "t.yaml:2: dns[0].matchNames: unknown field 'matchNames' (did you mean 'matchName'?)",
        "t.yaml:3: dns[0].matchPattern: expected a string, got list",
    ]


# --- matching ------------------------------------------------------------------


def test_match_name_is_exact_case_insensitive_and_ignores_the_root_dot() -> None:
    assert allows("matchName: cilium.io", "cilium.io")
    assert allows("matchName: cilium.io", "Cilium.IO.")
    assert allows("matchName: CILIUM.io.", "cilium.io")
    assert not allows("matchName: cilium.io", "api.cilium.io")
    assert not allows("matchName: cilium.io", "cilium.io.evil")


def test_star_stays_within_one_label() -> None:
    pattern = "matchPattern: '*.cilium.io'"
    assert allows(pattern, "api.cilium.io")
    assert allows(pattern, "API.Cilium.io.")
    assert allows(pattern, "_srv-1.cilium.io")
    assert not allows(pattern, "cilium.io")
    assert not allows(pattern, "a.b.cilium.io")
    assert not allows(pattern, "apicilium.io")


def test_star_may_be_empty_and_inside_a_label() -> None:
    pattern = "matchPattern: 'api*.cilium.io'"
    assert allows(pattern, "api.cilium.io")
    assert allows(pattern, "api-v2.cilium.io")
    assert not allows(pattern, "www.api.cilium.io")


def test_pattern_characters_are_literal() -> None:
    assert not allows("matchPattern: 'a.cilium.io'", "abcilium.io")
    assert allows("matchPattern: 'a.cilium.io'", "a.cilium.io")


@pytest.mark.parametrize("name", ["cilium.io", "a.b.c.d", "localhost", "x."])
def test_bare_star_matches_everything(name: str) -> None:
    assert allows("matchPattern: '*'", name)
    assert allows("matchPattern: '*.'", name)


def test_single_label_star_pattern_is_not_bare() -> None:
    assert allows("matchPattern: '**'", "host")
    assert not allows("matchPattern: '**'", "a.b")


def test_rule_without_fields_allows_all() -> None:
    assert dns.rule_matches(DNSRule(None, None, SourceRef("x", 1)), DNSRequest("any.thing"))


def test_evaluate_and_describe() -> None:
    name = rule("matchName: cilium.io")
    pattern = rule("matchPattern: '*.io'")
    assert dns.evaluate([name, pattern], DNSRequest("cilium.io")) == (name, pattern)
    assert dns.evaluate([name, pattern], DNSRequest("docs.cilium.io")) == ()
    assert dns.describe(name) == "matchName=cilium.io"
    assert dns.describe(pattern) == "matchPattern=*.io"
    assert dns.describe(DNSRule(None, None, SourceRef("x", 1))) == "any DNS name"

"""Cassandra l7proto rules: validation and Cilium proxylib matching."""

from __future__ import annotations

import pytest

from cilia.policy.l7.base import FieldProblem, L7RuleProtocol
from cilia.policy.l7.cassandra import QUERY_ACTIONS, CassandraRules
from cilia.policy.l7.registry import L7Registry

cass = CassandraRules()


def test_implements_the_protocol_and_is_registered() -> None:
    assert isinstance(cass, L7RuleProtocol)
    assert (cass.name, cass.request_fields) == ("cassandra", ("query_action", "query_table"))
    registry = L7Registry.from_entry_points()
    assert isinstance(registry.get("cassandra"), CassandraRules)


def test_every_cilium_action_is_accepted() -> None:
    for action in QUERY_ACTIONS:
        assert cass.validate_rule({"query_action": action}) == []
    assert {"select", "use", "truncate-table", "drop-materialized-view", "list-permissions"} <= QUERY_ACTIONS
    assert "batch" not in QUERY_ACTIONS  # an opcode, whose statements are checked one by one


def test_valid_rules() -> None:
    assert cass.validate_rule({}) == []
    assert cass.validate_rule({"query_action": "select", "query_table": "system\\..*"}) == []
    assert cass.validate_rule({"query_action": "", "query_table": ""}) == []
    # Go regexps have no Envoy program-size limit
    assert cass.validate_rule({"query_table": "a{1000}"}) == []


def test_unknown_key() -> None:
    assert cass.validate_rule({"query_actions": "select"}) == [
        FieldProblem("query_actions", "unknown key 'query_actions' (cassandra rules take query_action, query_table)")
    ]


@pytest.mark.parametrize(("action", "message"), [
    ("selct", "unknown query_action 'selct' (did you mean 'select'?)"),
    ("SELECT", "unknown query_action 'SELECT' (actions are lower case: 'select')"),
])
def test_unknown_action_with_hint(action: str, message: str) -> None:
    assert cass.validate_rule({"query_action": action}) == [FieldProblem("query_action", message)]


def test_unknown_action_lists_the_choices() -> None:
    (problem,) = cass.validate_rule({"query_action": "batch"})
    assert problem.key == "query_action"
    assert problem.message.startswith("unknown query_action 'batch' (expected one of alter-keyspace, alter-role, ")
    assert problem.message.endswith(", use)")


def test_invalid_table_regex() -> None:
    assert cass.validate_rule({"query_table": "(a)\\1"}) == [
        FieldProblem("query_table", "invalid RE2 regex '(a)\\\\1': invalid escape sequence: \\1")
    ]


def test_table_with_a_tableless_action() -> None:
    assert cass.validate_rule({"query_action": "create-index", "query_table": "x"}) == [
        FieldProblem("query_table", "query_action 'create-index' does not name a table, "
                     "so it cannot be combined with query_table")
    ]


def test_empty_rule_matches_everything() -> None:
    assert cass.matches({}, {"query_action": "drop-keyspace", "query_table": "deathstar"})
    assert cass.matches({}, {})


def test_action_is_exact() -> None:
    rule = {"query_action": "select"}
    assert cass.matches(rule, {"query_action": "select", "query_table": "a.b"})
    assert not cass.matches(rule, {"query_action": "insert", "query_table": "a.b"})
    assert not cass.matches(rule, {"query_action": "SELECT", "query_table": "a.b"})
    assert not cass.matches(rule, {"query_table": "a.b"})


def test_table_is_an_unanchored_search() -> None:
    rule = {"query_action": "select", "query_table": "deathstar\\..*"}
    assert cass.matches(rule, {"query_action": "select", "query_table": "deathstar.scrum_notes"})
    assert cass.matches(rule, {"query_action": "select", "query_table": "not_deathstar.x"})
    assert not cass.matches(rule, {"query_action": "select", "query_table": "attendance.daily_records"})
    anchored = {"query_table": "^system\\.local$"}
    assert cass.matches(anchored, {"query_action": "select", "query_table": "system.local"})
    assert not cass.matches(anchored, {"query_action": "select", "query_table": "system.local2"})


def test_missing_table_does_not_match_but_an_empty_one_is_not_checked() -> None:
    rule = {"query_table": "^deathstar\\."}
    assert not cass.matches(rule, {"query_action": "select"})
    assert cass.matches(rule, {"query_action": "create-role", "query_table": ""})


def test_describe() -> None:
    assert cass.describe({"query_action": "select", "query_table": "system\\..*"}) == (
        "query_action=select query_table=system\\..*")
    assert cass.describe({"query_table": "x"}) == "query_table=x"
    assert cass.describe({}) == "any Cassandra query"

"""Cassandra ``l7proto`` rules, with the semantics of Cilium's proxylib parser.

A rule has ``query_action`` (exact, e.g. ``select``) and ``query_table`` (a Go
regexp searched, not anchored, in ``keyspace.table``); both are optional and
``{}`` allows every query. Only query-like requests reach policy: the parser
lets non-query opcodes (startup, options, auth_response, register) through,
does not deny ``use``, and allows a batch only if every statement is allowed.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from ..regex import check_re2, search
from .base import FieldProblem

#: query_action values whose query names a table (or keyspace) to match.
TABLE_ACTIONS = frozenset({
    "select", "delete", "insert", "update",
    "create-table", "drop-table", "alter-table", "truncate-table",
    "use", "create-keyspace", "alter-keyspace", "drop-keyspace",
})

#: query_action values without a table; Cilium rejects a query_table next to them.
TABLELESS_ACTIONS = frozenset({
    "create-index", "drop-index", "create-materialized-view", "drop-materialized-view",
    "create-role", "alter-role", "drop-role", "grant-role", "revoke-role", "list-roles",
    "grant-permission", "revoke-permission", "list-permissions",
    "create-user", "alter-user", "drop-user", "list-users",
    "create-function", "drop-function", "create-aggregate", "drop-aggregate",
    "create-type", "alter-type", "drop-type", "create-trigger", "drop-trigger",
})

QUERY_ACTIONS = TABLE_ACTIONS | TABLELESS_ACTIONS

# Go's regexp has no Envoy program-size limit; only the syntax must be RE2's.
_GO_MAX_PROGRAM_SIZE = 10_000


class CassandraRules:
    """Validation and matching of ``l7proto: cassandra`` rules."""

    name = "cassandra"
    request_fields = ("query_action", "query_table")

    def validate_rule(self, rule: Mapping[str, str]) -> list[FieldProblem]:
        problems: list[FieldProblem] = []
        for key in rule:
            if key not in self.request_fields:
                problems.append(FieldProblem(
                    key, f"unknown key {key!r} (cassandra rules take query_action, query_table)"
                ))
        action = rule.get("query_action", "")
        table = rule.get("query_table", "")
        if action and action not in QUERY_ACTIONS:
            problems.append(FieldProblem("query_action", _unknown_action(action)))
        if table:
            error = check_re2(table, max_program_size=_GO_MAX_PROGRAM_SIZE)
            if error is not None:
                problems.append(FieldProblem("query_table", error))
            elif action in TABLELESS_ACTIONS:
                problems.append(FieldProblem(
                    "query_table",
                    f"query_action {action!r} does not name a table, "
                    "so it cannot be combined with query_table",
                ))
        return problems

    def matches(self, rule: Mapping[str, str], request: Mapping[str, str]) -> bool:
        """Whether one valid rule allows a query.

        A rule key whose request field is missing does not match. As in Cilium,
        an empty ``query_table`` in the request (a query without a table, e.g.
        ``create-role``) is not checked against the rule's ``query_table``.
        """
        action = rule.get("query_action", "")
        if action and request.get("query_action") != action:
            return False
        pattern = rule.get("query_table", "")
        if pattern:
            table = request.get("query_table")
            if table is None:
                return False
            if table and not search(pattern, table):
                return False
        return True

    def describe(self, rule: Mapping[str, str]) -> str:
        parts = [f"{key}={rule[key]}" for key in self.request_fields if rule.get(key)]
        return " ".join(parts) if parts else "any Cassandra query"


def _unknown_action(action: str) -> str:
    if action.lower() in QUERY_ACTIONS:
        return f"unknown query_action {action!r} (actions are lower case: {action.lower()!r})"
    close = difflib.get_close_matches(action, sorted(QUERY_ACTIONS), n=1, cutoff=0.75)
    if close:
        return f"unknown query_action {action!r} (did you mean {close[0]!r}?)"
    return f"unknown query_action {action!r} (expected one of {', '.join(sorted(QUERY_ACTIONS))})"

"""Memcache l7proto rules: validation and Cilium proxylib matching."""

from __future__ import annotations

import pytest

from cilia.policy.l7.base import FieldProblem, L7RuleProtocol
from cilia.policy.l7.memcache import COMMANDS, MemcacheRules
from cilia.policy.l7.registry import L7Registry

mc = MemcacheRules()


def test_implements_the_protocol_and_is_registered() -> None:
    assert isinstance(mc, L7RuleProtocol)
    assert (mc.name, mc.request_fields) == ("memcache", ("command", "key"))
    assert isinstance(L7Registry.from_entry_points().get("memcache"), MemcacheRules)


def test_command_table() -> None:
    for name in ("add", "set", "replace", "append", "prepend", "cas", "incr", "decr", "get", "gets",
                 "delete", "touch", "gat", "gats", "stats", "flush_all", "version", "quit", "noop"):
        assert name in COMMANDS
    assert COMMANDS["storage"] == {"add", "set", "replace", "append", "prepend", "cas", "incr", "decr"}
    assert COMMANDS["writeGroup"] == COMMANDS["storage"] | {"delete", "touch"}
    assert COMMANDS["get"] == {"get", "gets"}
    assert COMMANDS["gat"] == {"gat", "gats"}


def test_valid_rules() -> None:
    assert mc.validate_rule({}) == []
    assert mc.validate_rule({"command": "get"}) == []
    assert mc.validate_rule({"command": "writeGroup", "keyPrefix": "deathstar/"}) == []
    assert mc.validate_rule({"command": "get", "keyRegex": "a{1000}"}) == []  # no Envoy size limit


def test_unknown_key() -> None:
    assert mc.validate_rule({"command": "get", "key": "x"}) == [
        FieldProblem("key", "unknown key 'key' (memcache rules take command, keyExact, keyPrefix, keyRegex)")
    ]


@pytest.mark.parametrize(("command", "message"), [
    ("GET", "unknown memcache command 'GET' (did you mean 'get'?)"),
    ("writegroup", "unknown memcache command 'writegroup' (did you mean 'writeGroup'?)"),
    ("fetch", "unknown memcache command 'fetch' (use a memcached command or a group: gat, get, storage, writeGroup)"),
])
def test_unknown_command(command: str, message: str) -> None:
    assert mc.validate_rule({"command": command}) == [FieldProblem("command", message)]


def test_at_most_one_key_matcher() -> None:
    assert mc.validate_rule({"command": "get", "keyExact": "a", "keyPrefix": "a", "keyRegex": "a"}) == [
        FieldProblem("keyPrefix", "cannot be combined with keyExact (a rule takes at most one key matcher)"),
        FieldProblem("keyRegex", "cannot be combined with keyExact (a rule takes at most one key matcher)"),
    ]


@pytest.mark.parametrize("matcher", ["keyExact", "keyPrefix", "keyRegex"])
def test_key_without_command(matcher: str) -> None:
    for rule in ({matcher: "a"}, {"command": "", matcher: "a"}):
        assert mc.validate_rule(rule) == [
            FieldProblem(matcher, "a key matcher needs a command (in Cilium a key without a command is a parse error)")
        ]


def test_empty_key_matcher() -> None:
    assert mc.validate_rule({"command": "get", "keyExact": ""}) == [FieldProblem("keyExact", "must not be empty")]


def test_invalid_key_regex() -> None:
    assert mc.validate_rule({"command": "get", "keyRegex": "(a"}) == [
        FieldProblem("keyRegex", "invalid RE2 regex '(a': missing ): (a")
    ]


def test_empty_rule_matches_everything() -> None:
    assert mc.matches({}, {"command": "flush_all"})
    assert mc.matches({}, {"command": "get", "key": "x"})


def test_command_matches_exactly_or_through_its_group() -> None:
    assert mc.matches({"command": "set"}, {"command": "set", "key": "k"})
    assert not mc.matches({"command": "set"}, {"command": "add", "key": "k"})
    assert mc.matches({"command": "get"}, {"command": "gets", "key": "k"})
    assert not mc.matches({"command": "gets"}, {"command": "get", "key": "k"})
    assert mc.matches({"command": "storage"}, {"command": "cas", "key": "k"})
    assert not mc.matches({"command": "storage"}, {"command": "delete", "key": "k"})
    assert mc.matches({"command": "writeGroup"}, {"command": "delete", "key": "k"})
    assert mc.matches({"command": "writeGroup"}, {"command": "touch", "key": "k"})
    assert not mc.matches({"command": "writeGroup"}, {"command": "get", "key": "k"})
    assert not mc.matches({"command": "get"}, {"key": "k"})


def test_key_matchers() -> None:
    exact = {"command": "get", "keyExact": "awesomekey"}
    assert mc.matches(exact, {"command": "get", "key": "awesomekey"})
    assert not mc.matches(exact, {"command": "get", "key": "awesomekey2"})
    prefix = {"command": "get", "keyPrefix": "deathstar/"}
    assert mc.matches(prefix, {"command": "get", "key": "deathstar/plans"})
    assert not mc.matches(prefix, {"command": "get", "key": "xdeathstar/plans"})
    regex = {"command": "get", "keyRegex": "plans$"}
    assert mc.matches(regex, {"command": "get", "key": "deathstar/plans"})  # unanchored search
    assert not mc.matches(regex, {"command": "get", "key": "plans/deathstar"})


def test_request_without_key_matches_only_rules_without_key_matcher() -> None:
    assert mc.matches({"command": "stats"}, {"command": "stats"})
    assert not mc.matches({"command": "stats", "keyPrefix": "a"}, {"command": "stats"})


def test_describe() -> None:
    assert mc.describe({"command": "get", "keyExact": "k"}) == "command=get keyExact=k"
    assert mc.describe({"command": "storage"}) == "command=storage"
    assert mc.describe({}) == "any memcache request"

"""Memcached ``l7proto`` rules, with the semantics of Cilium's proxylib parser.

A rule names a ``command`` (a memcached command or a group such as
``storage``) and at most one key matcher: ``keyExact``, ``keyPrefix`` or
``keyRegex`` (a Go regexp, searched unanchored). ``{}`` allows every request.

The policy sees one key per evaluation: a request with several keys (``get a
b c``) is checked key by key by the caller. Cilium instead asked for one rule
matching all keys of a request. Requests are named by their text command;
a binary request is named after the text command of the same operation
(``getq``/``getk``/``getkq`` are ``get``, ``setq`` is ``set`` ...), and a
binary-only opcode by Cilium's name for it (``noop``, ``sasl-auth`` ...).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..regex import check_re2, search
from .base import FieldProblem

_STORAGE = frozenset({"add", "set", "replace", "append", "prepend", "cas", "incr", "decr"})

# Commands that match only themselves, as Cilium names them (the binary-only
# ones come from the binary protocol's opcode table).
_SINGLE = (
    "add", "set", "replace", "append", "prepend", "cas", "incr", "decr",
    "delete", "touch", "slabs", "lru", "lru_crawler", "watch", "stats", "flush_all",
    "cache_memlimit", "version", "misbehave", "quit", "noop", "verbosity",
    "sasl-list-mechs", "sasl-auth", "sasl-step",
    "rget", "rset", "rsetq", "rappend", "rappendq", "rprepend", "rprependq",
    "rdelete", "rdeleteq", "rincr", "rincrq", "rdecr", "rdecrq",
    "set-vbucket", "get-vbucket", "del-vbucket",
    "tap-connect", "tap-mutation", "tap-delete", "tap-flush", "tap-opaque",
    "tap-vbucket-set", "tap-checkpoint-start", "tap-checkpoint-end",
    # not rule names in Cilium (its get/gat cover them): narrower choices
    "gets", "gats",
)

#: rule ``command`` -> the request commands it allows.
COMMANDS: dict[str, frozenset[str]] = {
    **{name: frozenset({name}) for name in _SINGLE},
    "get": frozenset({"get", "gets"}),
    "gat": frozenset({"gat", "gats"}),
    "storage": _STORAGE,
    "writeGroup": _STORAGE | {"delete", "touch"},
}

KEY_MATCHERS = ("keyExact", "keyPrefix", "keyRegex")
RULE_KEYS = ("command", *KEY_MATCHERS)

# Go's regexp has no Envoy program-size limit; only the syntax must be RE2's.
_GO_MAX_PROGRAM_SIZE = 10_000


class MemcacheRules:
    """Validation and matching of ``l7proto: memcache`` rules."""

    name = "memcache"
    request_fields = ("command", "key")

    def validate_rule(self, rule: Mapping[str, str]) -> list[FieldProblem]:
        problems: list[FieldProblem] = []
        for key in rule:
            if key not in RULE_KEYS:
                problems.append(FieldProblem(
                    key, f"unknown key {key!r} (memcache rules take {', '.join(RULE_KEYS)})"
                ))
        command = rule.get("command", "")
        if command and command not in COMMANDS:
            problems.append(FieldProblem("command", _unknown_command(command)))
        matchers = [key for key in KEY_MATCHERS if key in rule]
        for extra in matchers[1:]:
            problems.append(FieldProblem(
                extra, f"cannot be combined with {matchers[0]} (a rule takes at most one key matcher)"
            ))
        for key in matchers:
            value = rule[key]
            if value == "":
                problems.append(FieldProblem(key, "must not be empty"))
            elif not command:
                problems.append(FieldProblem(
                    key, "a key matcher needs a command (in Cilium a key without a command is a parse error)"
                ))
            elif key == "keyRegex":
                error = check_re2(value, max_program_size=_GO_MAX_PROGRAM_SIZE)
                if error is not None:
                    problems.append(FieldProblem(key, error))
        return problems

    def matches(self, rule: Mapping[str, str], request: Mapping[str, str]) -> bool:
        """Whether one valid rule allows a request (``command`` and at most one ``key``).

        A request without a key (``stats``, ``version``) matches only rules
        without a key matcher.
        """
        command = rule.get("command", "")
        if command and request.get("command", "") not in COMMANDS.get(command, frozenset()):
            return False
        key = request.get("key")
        if "keyExact" in rule:
            return key is not None and key == rule["keyExact"]
        if "keyPrefix" in rule:
            return key is not None and key.startswith(rule["keyPrefix"])
        if "keyRegex" in rule:
            return key is not None and search(rule["keyRegex"], key)
        return True

    def describe(self, rule: Mapping[str, str]) -> str:
        parts = [f"{key}={rule[key]}" for key in RULE_KEYS if rule.get(key)]
        return " ".join(parts) if parts else "any memcache request"


def _unknown_command(command: str) -> str:
    lowered = {name.lower(): name for name in COMMANDS}
    if command.lower() in lowered:
        return f"unknown memcache command {command!r} (did you mean {lowered[command.lower()]!r}?)"
    groups = ", ".join(sorted(name for name, members in COMMANDS.items() if len(members) > 1))
    return f"unknown memcache command {command!r} (use a memcached command or a group: {groups})"

"""DNS rules (``rules.dns[]``): which names a DNS query may ask for.

DNS names compare case-insensitively and a trailing dot (the root) does not
matter. In ``matchPattern`` a ``*`` stands for any run of DNS characters inside
one label, so ``*.cilium.io`` allows ``api.cilium.io`` but not
``cilium.io`` or ``a.b.cilium.io``; a bare ``*`` allows every name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from .._fields import fields, strict_string
from .._yaml import Node
from ..errors import Problem
from ..flows import DNSRequest
from ..model import DNSRule

_RULE_FIELDS = ("matchName", "matchPattern")

# Non-empty labels separated by single dots, optionally ending with the root dot (toFQDNs too).
NAME_SYNTAX = re.compile(r"(?:[-a-zA-Z0-9_]+\.)*[-a-zA-Z0-9_]+\.?")
PATTERN_SYNTAX = re.compile(r"(?:[-a-zA-Z0-9_*]+\.)*[-a-zA-Z0-9_*]+\.?")
_LABEL_CHARS = "[-a-z0-9_]*"


def parse_rule(node: Node, problems: list[Problem]) -> DNSRule | None:
    """One ``dns[]`` item: exactly one of ``matchName`` and ``matchPattern``."""
    start = len(problems)
    kids = fields(node, _RULE_FIELDS, problems)
    if kids is None:
        return None
    name = _value(kids.get("matchName"), NAME_SYNTAX, "DNS name", "'-', '_'", problems)
    pattern = _value(kids.get("matchPattern"), PATTERN_SYNTAX, "DNS pattern", "'-', '_', '*'", problems)
    if len(problems) > start:
        return None
    if name is not None and pattern is not None:
        problems.append(kids["matchPattern"].problem("cannot be combined with matchName (set exactly one)"))
        return None
    if name is None and pattern is None:
        problems.append(node.problem("one of matchName or matchPattern is required"))
        return None
    return DNSRule(name, pattern, node.source)


def _value(node: Node | None, syntax: re.Pattern[str], what: str, extra_chars: str,
           problems: list[Problem]) -> str | None:
    if node is None:
        return None
    text = strict_string(node, problems)
    if not text:
        return None
    if not syntax.fullmatch(text):
        problems.append(node.problem(
            f"invalid {what} {text!r}: use labels of letters, digits, {extra_chars} "
            "separated by single dots"
        ))
        return None
    return text


def normalize(name: str) -> str:
    """The form names compare in: lower case, without the root's trailing dot."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


@lru_cache(maxsize=1024)
def _pattern_regex(pattern: str) -> re.Pattern[str] | None:
    """The compiled pattern, or None for the match-everything ``*``."""
    pattern = normalize(pattern)
    if pattern == "*":
        return None
    return re.compile("".join(_LABEL_CHARS if ch == "*" else re.escape(ch) for ch in pattern))


def rule_matches(rule: DNSRule, req: DNSRequest) -> bool:
    """Whether the query name is allowed by one rule.

    A rule with neither field (never produced by ``parse_rule``) is the
    "allow all" rule Cilium adds for L3/L4-only rules on a DNS port.
    """
    return name_matches(rule.match_name, rule.match_pattern, req.name)


def name_matches(match_name: str | None, match_pattern: str | None, name: str) -> bool:
    """``matchName`` / ``matchPattern`` against a name (DNS rules and ``toFQDNs`` alike);
    neither given matches every name."""
    name = normalize(name)
    if match_name is not None:
        return name == normalize(match_name)
    if match_pattern is not None:
        regex = _pattern_regex(match_pattern)
        return regex is None or regex.fullmatch(name) is not None
    return True


def evaluate(rules: Sequence[DNSRule], req: DNSRequest) -> tuple[DNSRule, ...]:
    """The rules that allow the query; empty means refused."""
    return tuple(rule for rule in rules if rule_matches(rule, req))


def describe(rule: DNSRule) -> str:
    if rule.match_name is not None:
        return f"matchName={rule.match_name}"
    if rule.match_pattern is not None:
        return f"matchPattern={rule.match_pattern}"
    return "any DNS name"

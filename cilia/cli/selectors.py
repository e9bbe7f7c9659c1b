"""``-l/--selector``: kubectl's label selector syntax, matched against cilia's label strings.

Requirements are comma-separated and all must hold: ``k=v`` (or ``k==v``), ``k!=v``,
``k in (a,b)``, ``k notin (a,b)``, ``k`` (exists), ``!k`` (does not exist). A key may carry a
source (``k8s:app``); without one it matches the key under any source, as Cilium's selectors do.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_KEY = r"[A-Za-z0-9_.:/-]+"
_VALUE = r"[A-Za-z0-9_.-]*"
_SET = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s+\(\s*([^()]*?)\s*\)\s*$")
_EQ = re.compile(rf"^\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*$")
_EXISTS = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")
_VALUE_ONLY = re.compile(rf"^{_VALUE}$")


class SelectorError(ValueError):
    """A selector that does not parse; the message names the bad part."""


@dataclass(frozen=True)
class _Requirement:
    key: str  # "source:key" or "key" (any source)
    op: str  # in, notin, exists, !exists
    values: frozenset[str]

    def values_of(self, labels: dict[tuple[str, str], str]) -> list[str]:
        source, sep, key = self.key.partition(":")
        if sep:
            return [v for (s, k), v in labels.items() if k == key and (s == source or source == "any")]
        return [v for (_, k), v in labels.items() if k == self.key]

    def matches(self, labels: dict[tuple[str, str], str]) -> bool:
        found = self.values_of(labels)
        if self.op == "exists":
            return bool(found)
        if self.op == "!exists":
            return not found
        if self.op == "in":
            return any(v in self.values for v in found)
        return not any(v in self.values for v in found)  # notin: absent keys match, as in Kubernetes


def _split(text: str) -> list[str]:
    """Split on commas outside parentheses."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError("unbalanced ')'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SelectorError("unbalanced '('")
    parts.append(text[start:])
    return parts


def _requirement(part: str) -> _Requirement:
    if m := _SET.match(part):
        values = [v.strip() for v in m[3].split(",")]
        if not m[3].strip() or any(not v or not _VALUE_ONLY.match(v) for v in values):
            raise SelectorError(f"{part.strip()!r}: expected 'key {m[2]} (v1,v2,...)'")
        return _Requirement(m[1], m[2], frozenset(values))
    if m := _EQ.match(part):
        return _Requirement(m[1], "notin" if m[2] == "!=" else "in", frozenset({m[3]}))
    if m := _EXISTS.match(part):
        return _Requirement(m[2], "!exists" if m[1] else "exists", frozenset())
    raise SelectorError(f"{part.strip()!r} is not a requirement (k=v, k!=v, 'k in (a,b)', k, !k)")


def _label_map(labels: Sequence[str]) -> dict[tuple[str, str], str]:
    out: dict[tuple[str, str], str] = {}
    for label in labels:
        key, _, value = label.partition("=")
        source, sep, name = key.partition(":")
        out[(source, name) if sep else ("", key)] = value
    return out


def parse_selector(text: str) -> Callable[[Sequence[str]], bool]:
    """A predicate: do these labels (``source:key=value`` strings) match ``text``?"""
    if not text.strip():
        raise SelectorError("empty selector")
    reqs = [_requirement(p) for p in _split(text)]
    return lambda labels: all(r.matches(_label_map(labels)) for r in reqs)

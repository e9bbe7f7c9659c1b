"""HTTP rules (``rules.http[]``): parsing and matching.

Envoy enforces these rules, so matching follows Envoy rather than the
"extended POSIX regex" wording of Cilium's API docs: ``method``, ``path`` and
``host`` are RE2 regexes that must match the whole ``:method``, ``:path`` (query
string included) and ``:authority``. Fields of one rule are ANDed; rules are
ORed. The same matcher serves enforcement and ``cilia policy trace``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .._fields import elements, fields, strict_string
from .._yaml import Node
from ..errors import Problem
from ..flows import HTTPRequest
from ..model import HeaderMatch, HTTPRule
from ..regex import check_re2, full_match

MISMATCH_ACTIONS = ("LOG", "ADD", "DELETE", "REPLACE")

_RULE_FIELDS = ("method", "path", "host", "headers", "headerMatches")
_MATCH_FIELDS = ("name", "value", "secret", "mismatch")
_SECRET_FIELDS = ("namespace", "name")

# RFC 9110 token: the characters a header field name may use.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# --- parsing -------------------------------------------------------------------


def parse_rule(node: Node, problems: list[Problem]) -> HTTPRule | None:
    """One ``http[]`` item; None (with problems appended) if anything is wrong."""
    start = len(problems)
    kids = fields(node, _RULE_FIELDS, problems)
    if kids is None:
        return None
    method = _regex(kids.get("method"), problems)
    path = _regex(kids.get("path"), problems)
    host = _regex(kids.get("host"), problems)
    headers = _headers(kids.get("headers"), problems)
    header_matches = _header_matches(kids.get("headerMatches"), problems)
    if len(problems) > start:
        return None
    return HTTPRule(method, path, host, headers, header_matches, node.source)


def _regex(node: Node | None, problems: list[Problem]) -> str | None:
    """An RE2 pattern Envoy will accept; empty means "not set", as in Cilium."""
    if node is None:
        return None
    text = strict_string(node, problems)
    if not text:
        return None
    error = check_re2(text)
    if error is not None:
        problems.append(node.problem(error))
        return None
    return text


def _header_name(node: Node, name: str, problems: list[Problem]) -> bool:
    if _TOKEN.fullmatch(name):
        return True
    problems.append(node.problem(
        f"invalid header name {name!r}: a header name is an HTTP token "
        "(letters, digits and !#$%&'*+-.^_`|~)"
    ))
    return False


def _headers(node: Node | None, problems: list[Problem]) -> tuple[tuple[str, str | None], ...]:
    """``"X-Name"`` (present) or ``"X-Name: value"`` (exact), split at the first ':'."""
    if node is None:
        return ()
    items = elements(node, problems)
    out: list[tuple[str, str | None]] = []
    for item in items or ():
        text = strict_string(item, problems)
        if text is None:
            continue
        name, colon, value = text.partition(":")
        name, value = name.strip(), value.strip()
        if not _header_name(item, name, problems):
            continue
        if colon and not value:
            problems.append(item.problem(
                f"no value after ':' in {text!r} (write just {name!r} to require the header to be present)"
            ))
            continue
        out.append((name, value if colon else None))
    return tuple(out)


def _header_matches(node: Node | None, problems: list[Problem]) -> tuple[HeaderMatch, ...]:
    if node is None:
        return ()
    out: list[HeaderMatch] = []
    for item in elements(node, problems) or ():
        match = _header_match(item, problems)
        if match is not None:
            out.append(match)
    return tuple(out)


def _header_match(node: Node, problems: list[Problem]) -> HeaderMatch | None:
    start = len(problems)
    kids = fields(node, _MATCH_FIELDS, problems, required=("name",))
    if kids is None:
        return None
    name: str | None = None
    if "name" in kids:
        name = strict_string(kids["name"], problems)
        if name is not None:
            _header_name(kids["name"], name, problems)
    value: str | None = None
    if "value" in kids:
        value = strict_string(kids["value"], problems) or None
    secret = _secret(kids.get("secret"), problems)
    mismatch: str | None = None
    if "mismatch" in kids:
        mismatch = strict_string(kids["mismatch"], problems) or None
        if mismatch is not None and mismatch not in MISMATCH_ACTIONS:
            problems.append(kids["mismatch"].problem(
                f"invalid mismatch action {mismatch!r} (expected one of {', '.join(MISMATCH_ACTIONS)})"
            ))
    if len(problems) > start or name is None:
        return None
    return HeaderMatch(name, value, secret, mismatch, node.source)


def _secret(node: Node | None, problems: list[Problem]) -> tuple[str, str] | None:
    """``secret: {namespace, name}``; an omitted namespace is kept as "" (the policy's)."""
    if node is None:
        return None
    kids = fields(node, _SECRET_FIELDS, problems, required=("name",))
    if kids is None or "name" not in kids:
        return None
    name = strict_string(kids["name"], problems)
    if name == "":
        problems.append(kids["name"].problem("must not be empty"))
        return None
    namespace = strict_string(kids["namespace"], problems) if "namespace" in kids else ""
    if name is None or namespace is None:
        return None
    return (namespace, name)


# --- matching ------------------------------------------------------------------


def _header_value(req: HTTPRequest, name: str) -> str | None:
    """The header as Envoy compares it: repeated values joined with ','; None if absent."""
    values = req.header(name)
    return ",".join(values) if values else None


def _headers_match(rule: HTTPRule, req: HTTPRequest) -> bool:
    for name, expected in rule.headers:
        actual = _header_value(req, name)
        if actual is None or (expected is not None and actual != expected):
            return False
    for match in rule.header_matches:
        if match.secret is not None:
            return False  # the secret's value cannot be read yet: fail closed
        actual = _header_value(req, match.name)
        if actual is None or (match.value is not None and actual != match.value):
            return False
    return True


def rule_matches(rule: HTTPRule, req: HTTPRequest) -> bool:
    """Whether one rule allows the request (all of its fields match)."""
    if rule.method is not None and not full_match(rule.method, req.method):
        return False
    if rule.path is not None and not full_match(rule.path, req.path):
        return False
    if rule.host is not None and not full_match(rule.host, req.host):
        return False
    return _headers_match(rule, req)


def evaluate(rules: Sequence[HTTPRule], req: HTTPRequest) -> tuple[HTTPRule, ...]:
    """The rules that allow the request; empty means denied."""
    return tuple(rule for rule in rules if rule_matches(rule, req))


# --- reporting -----------------------------------------------------------------


def unenforced(rule: HTTPRule) -> list[str]:
    """What cilia does not enforce the way Cilium does, so users are not surprised."""
    notes: list[str] = []
    for match in rule.header_matches:
        if match.secret is not None:
            namespace, name = match.secret
            where = f"{namespace}/{name}" if namespace else name
            notes.append(
                f"headerMatches {match.name}: the value from secret {where} is not read yet, "
                "so this rule never matches"
            )
        if match.mismatch is not None:
            notes.append(
                f"headerMatches {match.name}: mismatch action {match.mismatch} is not enforced; "
                "a mismatching request is denied instead"
            )
    return notes


def describe(rule: HTTPRule) -> str:
    """Short text for traces and logs, e.g. ``POST /v1/request-landing``."""
    parts: list[str] = []
    if rule.method is not None or rule.path is not None:
        parts.append(f"{rule.method or '*'} {rule.path or '*'}")
    if rule.host is not None:
        parts.append(f"host={rule.host}")
    for name, value in rule.headers:
        parts.append(f"header[{name}]" if value is None else f"header[{name}: {value}]")
    for match in rule.header_matches:
        if match.secret is not None:
            shown = f"{match.name}: <secret {'/'.join(p for p in match.secret if p)}>"
        elif match.value is not None:
            shown = f"{match.name}: {match.value}"
        else:
            shown = match.name
        parts.append(f"headerMatch[{shown}]")
    return " ".join(parts) if parts else "any HTTP request"

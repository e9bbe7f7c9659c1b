"""Typed field readers over YAML ``Node``s that record Problems instead of raising.

Each reader returns the value or None and appends a Problem naming the file,
line and field path when the value has the wrong type. Parsers collect every
problem of a file, so a user sees them all at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ._yaml import Node
from .errors import Problem


def fields(node: Node, allowed: Iterable[str], problems: list[Problem],
           required: Iterable[str] = (),
           misplaced: Mapping[str, str] | None = None) -> dict[str, Node] | None:
    """A mapping's children by key; unknown keys and missing required keys are problems.

    ``misplaced`` maps keys that exist elsewhere in the schema to a precise
    message ("L7 rules are not supported in deny rules") instead of "unknown field".
    """
    if not node.is_mapping():
        problems.append(node.problem(f"expected a mapping, got {node.type_name}"))
        return None
    allowed_set = set(allowed)
    out: dict[str, Node] = {}
    for key, child in node.items():
        if key not in allowed_set:
            if misplaced and key in misplaced:
                problems.append(child.problem(misplaced[key]))
                continue
            hint = _closest(key, allowed_set)
            msg = f"unknown field {key!r}" + (f" (did you mean {hint!r}?)" if hint else "")
            problems.append(child.problem(msg))
            continue
        out[key] = child
    for key in required:
        if key not in out:
            problems.append(node.problem(f"missing required field {key!r}"))
    return out


def _closest(key: str, allowed: set[str]) -> str | None:
    low = key.lower()
    for cand in sorted(allowed):
        if cand.lower() == low:
            return cand
    import difflib

    match = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.8)
    return match[0] if match else None


def string(node: Node, problems: list[Problem], *, allow_empty: bool = True) -> str | None:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        problems.append(node.problem(f"expected a string, got {node.type_name}"))
        return None
    if not isinstance(value, str):
        # YAML turns `value: 8080` or `value: true` into non-strings; keep the text.
        value = str(value)
    if not allow_empty and value == "":
        problems.append(node.problem("must not be empty"))
        return None
    return value


def strict_string(node: Node, problems: list[Problem]) -> str | None:
    """A string that must be a YAML string (not a number or boolean)."""
    if not isinstance(node.value, str):
        problems.append(node.problem(f"expected a string, got {node.type_name}"))
        return None
    return node.value


def integer(node: Node, problems: list[Problem], lo: int | None = None, hi: int | None = None) -> int | None:
    value = node.value
    if isinstance(value, bool) or not isinstance(value, int):
        problems.append(node.problem(f"expected an integer, got {node.type_name}"))
        return None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        problems.append(node.problem(f"{value} is out of range [{lo}, {hi}]"))
        return None
    return int(value)


def boolean(node: Node, problems: list[Problem]) -> bool | None:
    if not isinstance(node.value, bool):
        problems.append(node.problem(f"expected true or false, got {node.type_name}"))
        return None
    return bool(node.value)


def elements(node: Node, problems: list[Problem]) -> list[Node] | None:
    """Items of a list; a null list counts as empty (as in Kubernetes)."""
    if node.value is None:
        return []
    if not node.is_list():
        problems.append(node.problem(f"expected a list, got {node.type_name}"))
        return None
    return list(node.elements())


def string_map(node: Node, problems: list[Problem]) -> dict[str, str] | None:
    """A mapping of strings to strings (matchLabels, l7 rules)."""
    if node.value is None:
        return {}
    if not node.is_mapping():
        problems.append(node.problem(f"expected a mapping, got {node.type_name}"))
        return None
    out: dict[str, str] = {}
    ok = True
    for key, child in node.items():
        value = string(child, problems)
        if value is None:
            ok = False
            continue
        out[key] = value
    return out if ok else None

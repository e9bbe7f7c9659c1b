"""Label selectors written as text, the way ``kubectl -l`` and ``hubble observe --label`` take them.

``k=v`` (or ``k==v``), ``k!=v``, ``k`` (exists), ``!k`` (does not exist), ``k in (a,b)``,
``k notin (a,b)``, joined by commas (all must hold). A key may carry a source (``k8s:app``);
without one it matches a label of that key from any source, as in policies.
"""

from __future__ import annotations

import re

from .labels import split_source
from .selectors import LabelSelector, Operator, Requirement

_KEY = r"[A-Za-z0-9_.:/-]+"
_VALUE = r"[A-Za-z0-9_.-]*"
_SET = re.compile(rf"^({_KEY})\s+(in|notin)\s+\(\s*({_VALUE}(?:\s*,\s*{_VALUE})*)\s*\)$")
_EQUALS = re.compile(rf"^({_KEY})\s*(==|=|!=)\s*({_VALUE})$")
_EXISTS = re.compile(rf"^(!?)\s*({_KEY})$")


class SelectorError(ValueError):
    pass


def _terms(text: str) -> list[str]:
    """Split at commas outside parentheses."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"{text!r}: unbalanced ')'")
        elif ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    if depth:
        raise SelectorError(f"{text!r}: unbalanced '('")
    terms.append(text[start:])
    return [t.strip() for t in terms]


def _requirement(key: str, operator: Operator, values: tuple[str, ...] = ()) -> Requirement:
    source, bare = split_source(key)
    return Requirement(source, bare, operator, values)


def parse_selector(text: str) -> LabelSelector:
    """The selector ``text`` means; SelectorError names the term that is not one."""
    if not text.strip():
        raise SelectorError("empty label selector")
    reqs = []
    for term in _terms(text):
        if m := _SET.match(term):
            values = tuple(v.strip() for v in m[3].split(","))
            if not all(values):
                raise SelectorError(f"{text!r}: {term!r}: 'key {m[2]} (v1,v2,...)' needs values")
            reqs.append(_requirement(m[1], Operator.IN if m[2] == "in" else Operator.NOT_IN, values))
        elif m := _EQUALS.match(term):
            if m[2] == "!=":
                reqs.append(_requirement(m[1], Operator.NOT_IN, (m[3],)))
            else:
                reqs.append(_requirement(m[1], Operator.IN, (m[3],)))
        elif m := _EXISTS.match(term):
            reqs.append(_requirement(m[2], Operator.DOES_NOT_EXIST if m[1] else Operator.EXISTS))
        else:
            raise SelectorError(f"{text!r}: {term!r} is not a selector term (k=v, k!=v, k, !k, k in (a,b), "
                                "k notin (a,b))")
    return LabelSelector(tuple(reqs))

"""The parts of a flow query that the CLI checks before asking the agent: label selectors and
HTTP status patterns. Light (pure Python), so `cilia observe` starts without the agent's modules."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..policy.selector_text import SelectorError, parse_selector
from ..policy.selectors import LabelSelector

__all__ = ["HttpStatus", "SelectorError", "parse_http_status", "parse_labels"]


@dataclass(frozen=True)
class HttpStatus:
    """``--http-status``: a code (``403``) or a class (``4+``: 400-499, ``40+``: 400-409)."""

    text: str

    def matches(self, code: object) -> bool:
        if not isinstance(code, int):
            return False
        if self.text.endswith("+"):
            return str(code).startswith(self.text[:-1])
        return str(code) == self.text


def parse_http_status(text: str) -> HttpStatus:
    if not re.fullmatch(r"[1-5](\d\d|\d?\+)", text.strip()):
        raise ValueError(f"{text!r} is not an HTTP status (403) or class (4+, 40+)")
    return HttpStatus(text.strip())


def parse_labels(text: str) -> LabelSelector:
    """A label selector (``k=v,k2 in (a,b),!k3``; a source prefix like ``k8s:`` is optional) for
    --label/--from-label/--to-label; SelectorError if it is not one."""
    return parse_selector(text)

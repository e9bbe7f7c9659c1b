"""``-l/--selector``: kubectl's label selector syntax (``cilia.policy.selector_text``, the same
parser ``observe --label`` uses), matched against labels given as ``source:key=value`` strings."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..policy.labels import LabelSet
from ..policy.selector_text import SelectorError
from ..policy.selector_text import parse_selector as _parse

__all__ = ["SelectorError", "parse_selector"]


def parse_selector(text: str) -> Callable[[Sequence[str]], bool]:
    """A predicate: do these labels (``source:key=value`` strings) match ``text``?"""
    selector = _parse(text)
    return lambda labels: selector.matches(LabelSet.parse(list(labels)))

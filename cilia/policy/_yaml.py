"""YAML loading that keeps line numbers (ruamel.yaml round-trip nodes).

``Node`` wraps one value of the document with its field path and source line so
the parser can report ``file:line: path: message`` for any field.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import DuplicateKeyError
from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning, YAMLError

from .errors import Problem, SourceRef


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (dict, CommentedMap)):
        return "mapping"
    if isinstance(value, (list, CommentedSeq)):
        return "list"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class Node:
    """A YAML value with its path (``ingress[0].toPorts``) and 1-based line."""

    value: Any
    path: str
    source: SourceRef

    @property
    def type_name(self) -> str:
        return _type_name(self.value)

    def problem(self, message: str) -> Problem:
        return Problem(self.source, self.path, message)

    def child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def is_mapping(self) -> bool:
        return isinstance(self.value, dict)

    def is_list(self) -> bool:
        return isinstance(self.value, list)

    def items(self) -> Iterator[tuple[str, Node]]:
        """Key/child pairs of a mapping, each child at the line of its key."""
        assert isinstance(self.value, dict)
        lc = getattr(self.value, "lc", None)
        for key, val in self.value.items():
            line = self.source.line
            if lc is not None:
                try:
                    line = lc.key(key)[0] + 1
                except (KeyError, TypeError):
                    pass
            yield str(key), Node(val, self.child_path(str(key)), SourceRef(self.source.file, line))

    def elements(self) -> Iterator[Node]:
        """Children of a list, each at its own line."""
        assert isinstance(self.value, list)
        lc = getattr(self.value, "lc", None)
        for i, val in enumerate(self.value):
            line = self.source.line
            if lc is not None:
                try:
                    line = lc.item(i)[0] + 1
                except (KeyError, TypeError, IndexError):
                    pass
            yield Node(val, self.child_path(i), SourceRef(self.source.file, line))


_DUPLICATE_KEY = re.compile(r'found duplicate key "(.*?)" with value')
MAX_DEPTH = 64  # far deeper than any policy; ruamel builds nested values by recursion


def _check_depth(yaml: YAML, text: str, filename: str) -> Problem | None:
    """A Problem if collections nest deeper than MAX_DEPTH. The event parser is iterative, so this
    costs no recursion; building the values (which recurses) happens only after it passed."""
    depth = 0
    for event in yaml.parse(text):
        kind = type(event).__name__
        if kind in ("MappingStartEvent", "SequenceStartEvent"):
            depth += 1
            if depth > MAX_DEPTH:
                mark = event.start_mark
                line = mark.line + 1 if mark is not None else 1
                return Problem(SourceRef(filename, line), "", f"YAML nests deeper than {MAX_DEPTH} levels")
        elif kind in ("MappingEndEvent", "SequenceEndEvent"):
            depth -= 1
    return None


def load_documents(text: str, filename: str) -> tuple[list[Node], list[Problem]]:
    """Parse every YAML document in ``text``; a syntax error becomes a Problem."""
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    docs: list[Node] = []
    try:
        with warnings.catch_warnings():
            # YAML lets an anchor be defined again; the later definition wins.
            warnings.simplefilter("ignore", ReusedAnchorWarning)
            too_deep = _check_depth(YAML(typ="rt"), text, filename)
            if too_deep is not None:
                return [], [too_deep]
            loaded = list(yaml.load_all(text))
        for doc in loaded:
            if doc is None:
                continue
            line = 1
            lc = getattr(doc, "lc", None)
            if lc is not None and lc.line is not None:
                line = lc.line + 1
            docs.append(Node(doc, "", SourceRef(filename, line)))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        what = exc.problem or "invalid YAML"
        dup = _DUPLICATE_KEY.match(what) if isinstance(exc, DuplicateKeyError) else None
        if dup is not None:
            # ruamel also prints both values as Python reprs; the key is what matters.
            what = f'duplicate key "{dup.group(1)}"'
        elif exc.context:
            what = f"{exc.context}: {what}"
        return [], [Problem(SourceRef(filename, line), "", f"YAML syntax error: {what}")]
    except YAMLError as exc:
        return [], [Problem(SourceRef(filename, 1), "", f"YAML syntax error: {exc}")]
    except (TypeError, AttributeError, ValueError) as exc:
        # ruamel.yaml fails this way on constructs Kubernetes rejects too, such as a
        # mapping used as a key or a !!set/!!omap tag on a scalar.
        return [], [Problem(SourceRef(filename, 1), "", f"YAML cannot be loaded: {exc}")]
    return docs, []

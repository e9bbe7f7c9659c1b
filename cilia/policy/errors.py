"""Errors of the policy engine.

Every user-facing error names where it came from: ``file:line: field.path: message``.

    PolicyError                      base of everything raised here
    ├── ValidationError              one or more problems in policy files (carries Problem list)
    ├── L7ConflictError              two L7 protocols on one port of one endpoint
    └── LabelError                   a malformed label or label list (CLI input)
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class SourceRef:
    """Where a piece of policy came from: file and 1-based line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else self.file


@dataclass(frozen=True, slots=True)
class Problem:
    """One validation problem: location, field path and message."""

    source: SourceRef
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.source}: {where}{self.message}"


class PolicyError(Exception):
    """Base class of policy engine errors."""


class ValidationError(PolicyError):
    """Policy input is invalid; nothing from it was applied."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.source.file, p.source.line, p.path))
        super().__init__("\n".join(str(p) for p in self.problems))


class L7ConflictError(PolicyError):
    """Two different L7 protocols would have to parse the same port of an endpoint."""

    def __init__(self, message: str, sources: tuple[SourceRef, ...] = ()) -> None:
        self.sources = sources
        where = ", ".join(str(s) for s in sources)
        super().__init__(f"{message} ({where})" if where else message)


class LabelError(PolicyError, ValueError):
    """A label such as ``k8s:app=web`` could not be parsed."""

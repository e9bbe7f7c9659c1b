"""The policy side of an L7 protocol: how its rules are validated and matched.

Built-in structured protocols (``http``, ``kafka``, ``dns``) have typed rules in
``cilia.policy.model``. ``l7proto`` protocols (``cassandra``, ``memcache`` and any
third-party parser) have flat ``key: value`` rules; their class implements
``L7RuleProtocol`` and is registered under the entry-point group
``cilia.l7parsers`` with its name. The data-path parser (``cilia.l7parsers``)
and ``cilia policy trace`` both call ``matches`` — one matcher for both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """A problem with one key of an l7 rule (``key`` None: the rule as a whole)."""

    key: str | None
    message: str


@runtime_checkable
class L7RuleProtocol(Protocol):
    """What the policy engine needs from an ``l7proto`` parser."""

    #: the ``l7proto`` name, e.g. ``"cassandra"``
    name: str
    #: request fields this protocol produces, for ``cilia policy trace --l7-field`` help
    request_fields: tuple[str, ...]

    def validate_rule(self, rule: Mapping[str, str]) -> list[FieldProblem]:
        """Problems with one ``l7[]`` rule; empty when valid. Unknown keys are problems."""
        ...

    def matches(self, rule: Mapping[str, str], request: Mapping[str, str]) -> bool:
        """Whether a request (its extracted fields) is allowed by one valid rule."""
        ...

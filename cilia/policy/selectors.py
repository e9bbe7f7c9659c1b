"""Kubernetes label selectors over cilia label sets.

``matchLabels`` and ``matchExpressions`` (In, NotIn, Exists, DoesNotExist), with
Cilium's source rule: a selector key without a source (or with ``any:``) matches
a label of that key from any source.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .labels import NAMESPACE_KEY, SOURCE_ANY, LabelSet, split_source


class Operator(str, Enum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


@dataclass(frozen=True, slots=True, order=True)
class Requirement:
    """One condition on one label key; ``values`` is empty for (Does)Exist."""

    source: str
    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def _value(self, labels: LabelSet) -> str | None:
        label = labels.get(self.key)
        if label is None:
            return None
        if self.source != SOURCE_ANY and label.source != self.source:
            return None
        return label.value

    def matches(self, labels: LabelSet) -> bool:
        value = self._value(labels)
        if self.operator is Operator.IN:
            return value is not None and value in self.values
        if self.operator is Operator.NOT_IN:
            return value is None or value not in self.values
        if self.operator is Operator.EXISTS:
            return value is not None
        return value is None

    def __str__(self) -> str:
        key = self.key if self.source == SOURCE_ANY else f"{self.source}:{self.key}"
        if self.operator is Operator.IN and len(self.values) == 1:
            return f"{key}={self.values[0]}"
        if self.operator in (Operator.EXISTS, Operator.DOES_NOT_EXIST):
            return f"{key} {self.operator.value}"
        return f"{key} {self.operator.value} ({','.join(self.values)})"


@dataclass(frozen=True, slots=True)
class LabelSelector:
    """A conjunction of requirements; empty selects everything."""

    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def from_match_labels(cls, match_labels: dict[str, str]) -> LabelSelector:
        reqs = []
        for key, value in match_labels.items():
            source, bare = split_source(key)
            reqs.append(Requirement(source, bare, Operator.IN, (value,)))
        return cls(tuple(sorted(reqs)))

    def matches(self, labels: LabelSet) -> bool:
        return all(req.matches(labels) for req in self.requirements)

    def is_empty(self) -> bool:
        return not self.requirements

    def constrains(self, key: str) -> bool:
        return any(req.key == key for req in self.requirements)

    def and_(self, *others: LabelSelector) -> LabelSelector:
        reqs = set(self.requirements)
        for other in others:
            reqs.update(other.requirements)
        return LabelSelector(tuple(sorted(reqs)))

    def equality_labels(self) -> list[tuple[str, str]]:
        """(key, value) pairs every selected label set must have: for indexing.

        The namespace comes first: app names repeat across namespaces, so an
        index on the namespace keeps lookups within one namespace.
        """
        pairs = [
            (req.key, req.values[0])
            for req in self.requirements
            if req.operator is Operator.IN and len(req.values) == 1
        ]
        pairs.sort(key=lambda kv: kv[0] != NAMESPACE_KEY)
        return pairs

    def __str__(self) -> str:
        return "{" + ", ".join(str(r) for r in self.requirements) + "}"

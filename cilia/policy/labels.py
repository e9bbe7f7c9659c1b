"""Labels with sources, as Cilium has them.

A label is ``source:key=value``. Sources say where a label came from: ``k8s``
(Kubernetes), ``reserved`` (cilia's own identities), ``cidr`` (world prefixes),
``container``, ``unspec``. In selectors the source ``any`` (or no prefix) matches a
label from every source; any other source must match exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from .errors import LabelError

SOURCE_ANY = "any"
SOURCE_K8S = "k8s"
SOURCE_RESERVED = "reserved"
SOURCE_CIDR = "cidr"
SOURCES = frozenset({SOURCE_ANY, SOURCE_K8S, SOURCE_RESERVED, SOURCE_CIDR, "container", "unspec", "cilium"})

NAMESPACE_KEY = "io.kubernetes.pod.namespace"
DEFAULT_NAMESPACE = "default"


def split_source(key: str, default: str = SOURCE_ANY) -> tuple[str, str]:
    """``"k8s:app"`` -> ``("k8s", "app")``; ``"app"`` -> ``(default, "app")``.

    Only a known source name before the first ``:`` counts as a source, so label
    keys like ``cidr:10.0.0.0/8`` or IPv6 prefixes stay intact after it.
    """
    head, sep, rest = key.partition(":")
    if sep and head in SOURCES:
        return head, rest
    return default, key


@dataclass(frozen=True, slots=True, order=True)
class Label:
    source: str
    key: str
    value: str = ""

    def __str__(self) -> str:
        return f"{self.source}:{self.key}={self.value}" if self.value else f"{self.source}:{self.key}"


class LabelSet(Mapping[str, Label]):
    """An immutable set of labels, indexed by key (one value per key).

    Hashable and comparable: two sets with the same labels are equal, which is
    what makes them usable as identity keys.
    """

    __slots__ = ("_by_key", "_key", "_hash")

    def __init__(self, labels: Iterable[Label] = ()) -> None:
        by_key: dict[str, Label] = {}
        for label in labels:
            by_key[label.key] = label
        self._by_key = by_key
        self._key = tuple(sorted(by_key.values()))
        self._hash = hash(self._key)

    @classmethod
    def parse(cls, text: str | Iterable[str], default_source: str = SOURCE_K8S) -> LabelSet:
        """Parse ``"k=v,k8s:k2=v2,reserved:host"`` (or a list of such items)."""
        items = text.split(",") if isinstance(text, str) else list(text)
        labels: dict[str, Label] = {}
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            key, _, value = item.partition("=")
            source, key = split_source(key.strip(), default_source)
            if source == SOURCE_ANY:
                source = default_source
            key = key.strip()
            if not key:
                raise LabelError(f"label {raw!r} has an empty key")
            if key in labels:
                # A label set holds one value per key; silently keeping either would
                # describe a different endpoint than the one the user wrote.
                raise LabelError(f"label key {key!r} is given twice ({str(labels[key])!r} and {item!r})")
            labels[key] = Label(source, key, value.strip())
        return cls(labels.values())

    def __getitem__(self, key: str) -> Label:
        return self._by_key[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and self._key == other._key

    def __lt__(self, other: LabelSet) -> bool:
        return self._key < other._key

    def labels(self) -> tuple[Label, ...]:
        return self._key

    def with_label(self, label: Label) -> LabelSet:
        return LabelSet((*self._key, label))

    def namespace(self) -> str | None:
        label = self._by_key.get(NAMESPACE_KEY)
        return label.value if label is not None else None

    def has_source(self, source: str) -> bool:
        return any(label.source == source for label in self._key)

    def __str__(self) -> str:
        return ",".join(str(label) for label in self._key)

    def __repr__(self) -> str:
        return f"LabelSet({str(self)!r})"

    def to_list(self) -> list[str]:
        return [str(label) for label in self._key]


def endpoint_labels(labels: LabelSet) -> LabelSet:
    """Labels of a cluster endpoint: without a namespace label it lives in
    ``default``, as a Kubernetes pod created without a namespace does."""
    if NAMESPACE_KEY in labels or labels.has_source(SOURCE_RESERVED):
        return labels
    return labels.with_label(Label(SOURCE_K8S, NAMESPACE_KEY, DEFAULT_NAMESPACE))

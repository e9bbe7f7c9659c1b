"""Registry of ``l7proto`` protocols, filled from the ``cilia.l7parsers`` entry points."""

from __future__ import annotations

from collections.abc import Iterable
from importlib.metadata import entry_points

from .base import L7RuleProtocol

ENTRY_POINT_GROUP = "cilia.l7parsers"

#: protocols with typed rules of their own in CNP (not ``l7proto``)
STRUCTURED = ("http", "kafka", "dns")


class L7Registry:
    """Name -> protocol. Loading a broken plugin is an error at load time, not a
    silent allow later."""

    def __init__(self, protocols: Iterable[L7RuleProtocol] = ()) -> None:
        self._by_name: dict[str, L7RuleProtocol] = {}
        for proto in protocols:
            self.register(proto)

    def register(self, proto: L7RuleProtocol) -> None:
        if not isinstance(proto, L7RuleProtocol):
            raise TypeError(f"{proto!r} does not implement L7RuleProtocol")
        if proto.name in STRUCTURED:
            raise ValueError(f"l7proto name {proto.name!r} is reserved for the built-in rule type")
        self._by_name[proto.name] = proto

    def get(self, name: str) -> L7RuleProtocol | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)

    @classmethod
    def from_entry_points(cls) -> L7Registry:
        registry = cls()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            factory = ep.load()
            proto = factory() if isinstance(factory, type) else factory
            if getattr(proto, "name", None) != ep.name:
                raise ValueError(
                    f"entry point {ep.name!r} in {ENTRY_POINT_GROUP} loads a protocol named "
                    f"{getattr(proto, 'name', None)!r}"
                )
            registry.register(proto)
        return registry


_default: L7Registry | None = None


def default_registry() -> L7Registry:
    """The installed protocols (built-ins and plugins), loaded once."""
    global _default
    if _default is None:
        _default = L7Registry.from_entry_points()
    return _default

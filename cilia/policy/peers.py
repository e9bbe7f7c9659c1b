"""Peer selectors: which identities an ingress/egress rule talks about.

Every L3 form of the policy language compiles to one of these: label selectors
(``fromEndpoints``), entities, CIDRs with ``except``, and the wildcard. Requirements
(``fromRequires``) wrap another selector. Selectors are values (hashable, with a
canonical ``key``) so a selector cache can store each one once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .entities import entity_selects
from .identity import Identity, IdentityKind
from .model import IPNetwork
from .selectors import LabelSelector


class PeerSelector:
    """Base class: ``selects(identity)`` and a human ``describe()``."""

    __slots__ = ()

    def selects(self, ident: Identity) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def index_label(self) -> tuple[str, str] | None:
        """A (key, value) label every selected identity has, for indexing; None if none."""
        return None

    def only_cidr(self) -> bool:
        """True if only world/CIDR identities can be selected."""
        return False

    def __str__(self) -> str:
        return self.describe()


def _cache_hash(obj: PeerSelector) -> None:
    """Selectors are dict keys on hot paths (selector cache, per-endpoint
    indexes); hashing their nested tuples each time dominated incremental
    updates, so each one computes its hash once."""
    values = tuple(getattr(obj, f.name) for f in fields(obj) if f.compare)  # type: ignore[arg-type]
    object.__setattr__(obj, "_hash", hash((type(obj).__name__, values)))


@dataclass(frozen=True, slots=True)
class AnyPeer(PeerSelector):
    """Every peer, known or not: the ANY identity (0) in the map state."""

    def selects(self, ident: Identity) -> bool:
        return True

    def describe(self) -> str:
        return "any peer"


WILDCARD = AnyPeer()


@dataclass(frozen=True, slots=True)
class EndpointPeer(PeerSelector):
    """``fromEndpoints``/``toEndpoints``: cluster identities (endpoints and the
    reserved identities other than world) whose labels match. World and CIDR
    identities are reached with entities and CIDR rules, not endpoint selectors."""

    selector: LabelSelector
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _cache_hash(self)

    def __hash__(self) -> int:
        return self._hash

    def selects(self, ident: Identity) -> bool:
        if ident.kind is IdentityKind.CIDR or ident.is_world():
            return False
        return self.selector.matches(ident.labels)

    def describe(self) -> str:
        return f"endpoints {self.selector}"

    def index_label(self) -> tuple[str, str] | None:
        eq = self.selector.equality_labels()
        return eq[0] if eq else None


@dataclass(frozen=True, slots=True)
class EntityPeer(PeerSelector):
    entity: str
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _cache_hash(self)

    def __hash__(self) -> int:
        return self._hash

    def selects(self, ident: Identity) -> bool:
        return entity_selects(self.entity, ident)

    def describe(self) -> str:
        return f"entity {self.entity}"

    def only_cidr(self) -> bool:
        return self.entity in ("world", "world-ipv4", "world-ipv6")


@dataclass(frozen=True, slots=True)
class CIDRPeer(PeerSelector):
    """A prefix minus excepts. Selects world identities whose prefix lies inside
    ``cidr`` and not inside any except. Every prefix a policy names (excepts too)
    gets an identity, so longest-prefix lookup of an address lands on the right one."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _cache_hash(self)

    def __hash__(self) -> int:
        return self._hash

    def selects(self, ident: Identity) -> bool:
        prefix = ident.prefix
        if prefix is None or prefix.version != self.cidr.version:
            return False
        if not prefix.subnet_of(self.cidr):  # type: ignore[arg-type]
            return False
        return not any(prefix.subnet_of(ex) for ex in self.excepts)  # type: ignore[arg-type]

    def describe(self) -> str:
        if self.excepts:
            return f"cidr {self.cidr} except {', '.join(str(e) for e in self.excepts)}"
        return f"cidr {self.cidr}"

    def only_cidr(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class RequiresPeer(PeerSelector):
    """``base`` restricted to identities that match every ``fromRequires`` selector."""

    base: PeerSelector
    requires: tuple[LabelSelector, ...]
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _cache_hash(self)

    def __hash__(self) -> int:
        return self._hash

    def selects(self, ident: Identity) -> bool:
        return self.base.selects(ident) and all(r.matches(ident.labels) for r in self.requires)

    def describe(self) -> str:
        reqs = " and ".join(str(r) for r in self.requires)
        return f"{self.base.describe()} requiring {reqs}"

    def index_label(self) -> tuple[str, str] | None:
        found = self.base.index_label()
        if found is not None:
            return found
        for req in self.requires:
            eq = req.equality_labels()
            if eq:
                return eq[0]
        return None

    def only_cidr(self) -> bool:
        return self.base.only_cidr()

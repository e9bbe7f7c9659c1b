"""Peer selectors: which identities an ingress/egress rule talks about.

Every L3 form of the policy language compiles to one of these: label selectors
(``fromEndpoints``), entities, CIDRs with ``except``, and the wildcard. Requirements
(``fromRequires``) wrap another selector. Selectors are values (hashable, with a
canonical ``key``) so a selector cache can store each one once.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .entities import entity_selects
from .identity import Identity, IdentityKind
from .l7.dns import name_matches
from .model import IPNetwork
from .selectors import LabelSelector


class PeerSelector:
    """Base class: ``selects(identity)`` and a human ``describe()``.

    Selectors are values compared by type and fields. They are dict keys on hot
    paths (selector cache, per-endpoint indexes), and hashing their nested
    tuples each time dominated incremental updates, so the hash is computed once.
    """

    def _values(self) -> tuple[object, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return isinstance(other, PeerSelector) and type(self) is type(other) and self._values() == other._values()

    def __hash__(self) -> int:
        cached: int | None = self.__dict__.get("_hash")
        if cached is None:
            cached = hash((type(self).__name__, self._values()))
            object.__setattr__(self, "_hash", cached)
        return cached

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


@dataclass(frozen=True, eq=False)
class AnyPeer(PeerSelector):
    """Every peer, known or not: the ANY identity (0) in the map state."""

    def selects(self, ident: Identity) -> bool:
        return True

    def describe(self) -> str:
        return "any peer"


WILDCARD = AnyPeer()


@dataclass(frozen=True, eq=False)
class EndpointPeer(PeerSelector):
    """``fromEndpoints``/``toEndpoints``: cluster identities (endpoints and the
    reserved identities other than world) whose labels match. World and CIDR
    identities are reached with entities and CIDR rules, not endpoint selectors."""

    selector: LabelSelector


    def selects(self, ident: Identity) -> bool:
        if ident.kind is IdentityKind.CIDR or ident.is_world():
            return False
        return self.selector.matches(ident.labels)

    def describe(self) -> str:
        return f"endpoints {self.selector}"

    def index_label(self) -> tuple[str, str] | None:
        eq = self.selector.equality_labels()
        return eq[0] if eq else None


@dataclass(frozen=True, eq=False)
class EntityPeer(PeerSelector):
    entity: str


    def selects(self, ident: Identity) -> bool:
        return entity_selects(self.entity, ident)

    def describe(self) -> str:
        return f"entity {self.entity}"

    def only_cidr(self) -> bool:
        return self.entity in ("world", "world-ipv4", "world-ipv6")


@dataclass(frozen=True, eq=False)
class CIDRPeer(PeerSelector):
    """A prefix minus excepts. Selects world identities whose prefix lies inside
    ``cidr`` and not inside any except. Every prefix a policy names (excepts too)
    gets an identity, so longest-prefix lookup of an address lands on the right one."""

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()


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


@dataclass(frozen=True, eq=False)
class RequiresPeer(PeerSelector):
    """``base`` restricted to identities that match every ``fromRequires`` selector."""

    base: PeerSelector
    requires: tuple[LabelSelector, ...]


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


@dataclass(frozen=True, eq=False)
class FQDNPeer(PeerSelector):
    """``toFQDNs[]``: the CIDR identities of the addresses learned for names this selector matches
    (``matchName`` or ``matchPattern``, Cilium's ``*``). What was learned is the engine's state,
    not the identity's labels, so ``selects`` is False and the engine keeps the selections."""

    match_name: str | None
    match_pattern: str | None

    def matches_name(self, name: str) -> bool:
        return name_matches(self.match_name, self.match_pattern, name)

    def selects(self, ident: Identity) -> bool:
        return False

    def describe(self) -> str:
        if self.match_name is not None:
            return f"fqdn matchName={self.match_name}"
        return f"fqdn matchPattern={self.match_pattern}"

    def only_cidr(self) -> bool:
        return True

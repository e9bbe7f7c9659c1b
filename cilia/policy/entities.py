"""Cilium entities (``fromEntities``/``toEntities``) and which identities they select."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .identity import Identity

ENTITIES = (
    "all", "world", "world-ipv4", "world-ipv6", "cluster", "host", "remote-node",
    "kube-apiserver", "init", "ingress", "unmanaged", "health", "none",
)

#: reserved identities that are part of the cluster entity
CLUSTER_RESERVED = frozenset(
    {"host", "remote-node", "init", "ingress", "health", "unmanaged", "kube-apiserver"}
)


def entity_selects(entity: str, ident: Identity) -> bool:
    """Whether ``entity`` selects ``ident``. ``all`` is handled as the wildcard peer."""
    if entity == "all":
        return True
    if entity == "none":
        return False
    if entity == "world":
        return ident.has_reserved("world")
    if entity in ("world-ipv4", "world-ipv6"):
        return ident.has_reserved(entity)
    if entity == "cluster":
        return ident.is_endpoint() or any(ident.has_reserved(name) for name in CLUSTER_RESERVED)
    return ident.has_reserved(entity)

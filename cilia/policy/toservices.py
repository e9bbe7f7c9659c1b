"""``toServices``: a rule's ``k8sService``/``k8sServiceSelector`` as the peers it stands for.

Cilium translates ``toServices`` to the selected services' backends, and so does this: a backend
address held by an endpoint (this node's or another node's) stands for that endpoint's identity,
any other address for its /32 (an outside backend, as Cilium's CIDR translation). Pure: the engine
hands in the services and the identities of the addresses they name (``ServiceView``) and
recompiles the policies using ``toServices`` when either changes.

Namespaces: ``k8sService.namespace`` (or the selector's) defaults to the policy's own namespace; a
clusterwide policy without one selects services of every namespace. A service without a namespace
(one made through the API) is in ``default``, as Kubernetes objects are.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..services.model import Service
from .identity import Identity
from .labels import LabelSet
from .model import IPNetwork, ServiceSelector
from .peers import CIDRPeer, PeerSelector

DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, eq=False)
class BackendPeer(PeerSelector):
    """The identity of an endpoint that is a selected service's backend (``backend`` names it)."""

    identity: int
    backend: str

    def selects(self, ident: Identity) -> bool:
        return ident.id == self.identity

    def describe(self) -> str:
        return f"service backend {self.backend} (identity {self.identity})"


@dataclass(frozen=True)
class ServiceView:
    """What ``toServices`` resolves against: the services, and for each backend address an
    endpoint holds, (identity, endpoint name)."""

    services: tuple[Service, ...] = ()
    held: Mapping[str, tuple[int, str]] = field(default_factory=dict)

    def backend_addresses(self) -> frozenset[str]:
        return frozenset(b.address for s in self.services for b in s.backends)

    def matching(self, sel: ServiceSelector, policy_namespace: str | None) -> list[Service]:
        namespace = sel.namespace or policy_namespace
        out = []
        for s in self.services:
            if namespace is not None and (s.namespace or DEFAULT_NAMESPACE) != namespace:
                continue
            if sel.name is not None:
                if s.name != sel.name:
                    continue
            elif sel.selector is None or not sel.selector.matches(_labels(s)):
                continue
            out.append(s)
        return out

    def peers(self, sel: ServiceSelector, policy_namespace: str | None) -> tuple[list[PeerSelector], set[IPNetwork]]:
        """The peers the selector's services stand for, and the prefixes that need CIDR identities."""
        peers: dict[PeerSelector, None] = {}
        prefixes: set[IPNetwork] = set()
        for service in self.matching(sel, policy_namespace):
            for b in service.backends:
                held = self.held.get(b.address)
                if held is not None:
                    peers[BackendPeer(held[0], f"{b.address} ({held[1]})")] = None
                else:
                    prefix = ipaddress.ip_network(b.address)
                    peers[CIDRPeer(prefix)] = None
                    prefixes.add(prefix)
        return list(peers), prefixes


def _labels(service: Service) -> LabelSet:
    return LabelSet.parse([f"{k}={v}" for k, v in service.labels])


def view_of(services: Iterable[Service], holder: Mapping[str, tuple[int, str]]) -> ServiceView:
    """The view for ``services``, with ``holder`` (address -> (identity, endpoint)) cut down to the
    addresses they name, so that endpoints that are no backend never change it."""
    services = tuple(sorted(services, key=lambda s: s.id))
    view = ServiceView(services)
    return ServiceView(services, {a: holder[a] for a in sorted(view.backend_addresses()) if a in holder})

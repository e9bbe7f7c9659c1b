"""A service as every part of cilia sees it: plain immutable values, no I/O.

IPv4 only (the datapath is IPv4). ``Backend.state`` follows EndpointSlice conditions: only
``active`` backends get new connections; ``terminating`` ones keep the connections they have.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Protocol = Literal["TCP", "UDP"]
Algorithm = Literal["maglev", "random", "weighted-rr"]
BackendState = Literal["active", "terminating", "not-ready"]
ServiceType = Literal["ClusterIP", "NodePort"]


@dataclass(frozen=True, slots=True)
class Frontend:
    address: str  # IPv4; for NodePort the node's address (or 0.0.0.0: every node address)
    port: int
    protocol: Protocol = "TCP"

    def __str__(self) -> str:
        return f"{self.address}:{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class Backend:
    address: str
    port: int
    weight: int = 1
    state: BackendState = "active"

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


@dataclass(frozen=True, slots=True)
class Service:
    """``id`` is the service's number in the BPF maps (Cilium's service ID), unique per node."""

    id: int
    frontend: Frontend
    backends: tuple[Backend, ...]
    algorithm: Algorithm = "maglev"
    affinity_seconds: int = 0  # session affinity by client address; 0: none
    type: ServiceType = "ClusterIP"
    name: str = ""  # Kubernetes name/namespace when it came from the watcher (toServices k8sService)
    namespace: str = ""
    labels: tuple[tuple[str, str], ...] = field(default=())  # for toServices k8sServiceSelector

    @property
    def active(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.state == "active")

"""Which backend a new connection to a frontend gets, explained: what ``cilia policy trace``
says when its destination is a service address. Pure.

The trace cannot know the connection's source port (Maglev hashes it), so it follows the first
active backend and says how the load balancer would choose among the others; policy is judged
on that backend's identity and port, as the datapath does after DNAT.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .model import Backend, Service

_HOW = {
    "maglev": "Maglev: the connection's hash picks a backend from the service's lookup table (shares follow "
              "the weights; a backend change moves about 1/N of the flows)",
    "random": "random: each new connection picks a backend at random, in proportion to the weights",
    "weighted-rr": "weighted round-robin: new connections go to the backends in turn, in proportion to the weights",
}


def find(services: Iterable[Service], address: str, port: int | None, protocol: str | None) -> Service | None:
    """The service whose frontend is ``address:port`` (``protocol`` TCP/UDP; None: either)."""
    for s in services:
        f = s.frontend
        if f.address == address and (port is None or f.port == port) and (protocol is None or f.protocol == protocol):
            return s
    return None


@dataclass(frozen=True)
class Choice:
    service: Service
    backend: Backend | None  # None: no active backend, new connections are dropped
    why: str

    def to_json(self) -> dict[str, Any]:
        s = self.service
        return {"id": s.id, "frontend": str(s.frontend), "name": f"{s.namespace or 'default'}/{s.name}" if s.name
                else None, "algorithm": s.algorithm, "affinity_seconds": s.affinity_seconds,
                "backends": [{"backend": str(b), "weight": b.weight, "state": b.state} for b in s.backends],
                "chosen": str(self.backend) if self.backend is not None else None, "why": self.why}


def choose(service: Service) -> Choice:
    active = service.active
    name = f" ({service.namespace or 'default'}/{service.name})" if service.name else ""
    what = f"service {service.id}{name} at {service.frontend}"
    if not active:
        left = ", ".join(f"{b} {b.state}" for b in service.backends) or "none configured"
        return Choice(service, None, f"{what} has no active backend ({left}): new connections are dropped")
    first = active[0]
    why = f"{what}: {len(active)} active backend(s) of {len(service.backends)}; {_HOW[service.algorithm]}"
    if service.affinity_seconds:
        why += f"; session affinity: a client address keeps its backend for {service.affinity_seconds}s"
    why += (f". Traced with {first} (the first active backend): policy is judged on the backend's identity "
            f"and port, after DNAT")
    return Choice(service, first, why)

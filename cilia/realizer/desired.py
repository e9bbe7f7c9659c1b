"""What the sinks realize: the agent's state at one revision, as plain immutable values.

The agent builds a ``Desired`` under its lock after every mutation, reusing the previous one's
entries for endpoints the mutation did not touch; the sinks read it without the lock. ``changed``
names the endpoints whose entry differs from the previous ``Desired`` (None: treat all as changed,
as after a restart), so a sink re-does only those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..policy.ipcache import IPCacheChanges
from ..policy.labels import LabelSet
from ..policy.mapstate import DirectionMapState, MapState
from ..policy.model import Direction, IPNetwork
from ..services.model import Service

# An endpoint waiting for its cluster-wide identity (issue 13) is in the kernel as reserved:init
# (Cilium's identity for it, the same on every node) with both directions enforced and no entry:
# every packet from or to it is dropped until it is admitted with its identity and policy.
INIT = 5
_NOTHING: MappingProxyType[Any, Any] = MappingProxyType({})
CLOSED = MapState(DirectionMapState(Direction.INGRESS, True, _NOTHING, _NOTHING),
                  DirectionMapState(Direction.EGRESS, True, _NOTHING, _NOTHING))


@dataclass(frozen=True, slots=True)
class PortMap:
    """A TCP port of the endpoint's policy and the application's own port behind it (sidecar mode)."""

    port: int
    app_port: int


@dataclass(frozen=True, slots=True)
class EndpointState:
    """One endpoint as every sink needs it. ``map_state`` is the engine's immutable snapshot: the
    same object until the endpoint's policy changes, so sinks may compare it by identity."""

    name: str
    ips: tuple[str, ...]
    identity: int
    map_state: MapState
    ports: tuple[PortMap, ...] = ()
    interface: str | None = None  # the host-side interface the BPF programs attach to
    endpoint_id: int | None = None  # index of its policy map in the BPF datapath
    audit_ingress: bool = False
    audit_egress: bool = False

    @property
    def audit(self) -> tuple[bool, bool]:
        return self.audit_ingress, self.audit_egress


@dataclass(frozen=True, slots=True)
class WaitingEndpoint:
    """An endpoint accepted without a cluster-wide identity yet (issue 13: the kvstore unreachable):
    the datapath attaches it with an empty policy (everything dropped), nothing else sees it."""

    name: str
    ips: tuple[str, ...]
    interface: str | None = None
    endpoint_id: int | None = None


@dataclass(frozen=True)
class Desired:
    """Everything realized at ``revision``."""

    revision: int
    endpoints: Mapping[str, EndpointState]
    ipcache: tuple[tuple[IPNetwork, int], ...]  # prefix -> identity, the engine's and other producers'
    labels: Mapping[int, LabelSet]  # identity -> labels, for names in flows and status
    proxy_ports: Mapping[str, int] = field(default_factory=dict)  # "ingress/80" -> Envoy's transparent listener port
    changed: frozenset[str] | None = None  # endpoints that differ from the previous Desired; None: all
    services: tuple[Service, ...] = ()  # by id; the load balancer sink writes what differs
    # ``ipcache`` by identity, each identity's prefixes in address order (None: sinks derive it); an
    # identity's tuple is the same object while its prefixes stay, so sinks compare it by identity
    prefixes: Mapping[int, tuple[IPNetwork, ...]] | None = None
    waiting: Mapping[str, WaitingEndpoint] = field(default_factory=dict)  # no identity yet: all dropped
    # how ``ipcache`` differs from the previous Desired's (None: unknown), for sinks that hold that
    ipcache_changes: IPCacheChanges | None = None

    def is_changed(self, name: str) -> bool:
        return self.changed is None or name in self.changed

"""The datapath sink: the ipcache and every endpoint's map state written into the BPF maps.

Endpoints with an interface and an IPv4 address get a plan; ``NodeDatapath.sync`` writes only
what changed (map states compared by identity) and detaches what is gone. A kernel or netlink
refusal is raised for status and health; the kernel keeps what it had (fail closed: it enforces
the last policy it was given).
"""

from __future__ import annotations

import ipaddress

from ..bpf.node import EndpointPlan, NodeDatapath
from ..policy.ipcache import IPCache
from ..policy.model import IPNetwork
from .desired import CLOSED, INIT, Desired

WORLD = 2  # reserved:world, where an address in no prefix lands


class DatapathSink:
    name = "bpf-datapath"

    def __init__(self, node: NodeDatapath) -> None:
        self.node = node
        self._ipcache: dict[str, int] = {}

    def realize(self, desired: Desired) -> None:
        if not self.node.started:
            return  # start() writes the last Desired once the program is loaded
        plans = []
        for name, ep in sorted(desired.endpoints.items()):
            v4 = [a for a in ep.ips if ipaddress.ip_address(a).version == 4]
            if ep.interface is None or ep.endpoint_id is None or not v4:
                continue
            plans.append(EndpointPlan(name, ep.endpoint_id, v4[0], ep.interface, ep.identity, ep.map_state,
                                      ep.audit_ingress, ep.audit_egress))
        for name, waiting in sorted(desired.waiting.items()):
            v4 = [a for a in waiting.ips if ipaddress.ip_address(a).version == 4]
            if waiting.interface is None or waiting.endpoint_id is None or not v4:
                continue
            plans.append(EndpointPlan(name, waiting.endpoint_id, v4[0], waiting.interface, INIT, CLOSED))
        self.node.sync(desired.ipcache, plans, desired.proxy_ports, _Lookup(desired.ipcache),
                       desired.ipcache_changes)


class _Lookup:
    """Longest-prefix identity of an address, built only if the sync needs it (flow resets)."""

    def __init__(self, items: tuple[tuple[IPNetwork, int], ...]) -> None:
        self._items = items
        self._cache: IPCache | None = None

    def __call__(self, address: str) -> int:
        if self._cache is None:
            self._cache = IPCache()
            for prefix, ident in self._items:
                self._cache.upsert(prefix, ident)
        try:
            return self._cache.lookup(address)[1]
        except (KeyError, ValueError):
            return WORLD

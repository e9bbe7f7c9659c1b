"""The node's BPF datapath as the agent drives it: one object per agent.

- ``start``: load the program (reopening the pinned maps, so enforcement carries on from the
  last run), route redirected packets to the local stack (``proxyroute``), learn the node's own
  addresses (reserved:host in the ipcache) and read events.
- ``sync``: given the ipcache and a plan per endpoint (id, address, host interface, identity,
  map state), attach the programs to new interfaces, register addresses and write policy tries,
  each only where something changed; then point established flows that now need L7 at their
  proxy, so they are reset and reconnect through Envoy.
- services: ``lb`` (a ``LoadBalancer`` over the same program's maps, once started) is synced by
  the realizer's service sink; ``nodeport_devices`` get the NodePort programs at start.
- ``stop``: stop reading events and close handles. Programs stay attached and maps pinned: the
  kernel keeps enforcing the last policy while the agent is away.
- ``cleanup``: detach from the given interfaces, unpin everything, remove the proxy route.

Only IPv4 endpoints are enforced in the kernel (the program drops other L3 protocols: fail
closed); an endpoint without an interface or IPv4 address is an identity only.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from cilia.policy.ipcache import IPCacheChanges
from cilia.policy.mapstate import L4Key, MapState, PolicyEntry, Verdict
from cilia.policy.model import Direction, IPNetwork, Protocol

from . import crossnode, maps, proxyroute
from .crossnode import CrossNode
from .datapath import Datapath, DatapathEvent
from .lb import LoadBalancer
from .loader import NETDEV_PROGRAMS, Loader
from .netns import addresses
from .paths import DEFAULT_PIN_DIR
from .policykey import ProxyPortOf

_log = logging.getLogger(__name__)

HOST_IDENTITY = 1  # reserved:host
CONFIG_ALLOW_LOCALHOST = 1  # slot of datapath.c's config array


@dataclass(frozen=True, slots=True)
class EndpointPlan:
    """What the kernel needs to know of one endpoint."""

    name: str
    ep_id: int
    address: str
    interface: str
    identity: int
    map_state: MapState
    audit_ingress: bool = False  # would-be drops are let through and reported as AUDIT
    audit_egress: bool = False

    @property
    def flags(self) -> int:
        return (maps.AUDIT_INGRESS if self.audit_ingress else 0) | (maps.AUDIT_EGRESS if self.audit_egress else 0)


@dataclass(frozen=True, slots=True)
class SyncResult:
    attached: int = 0
    entries_written: int = 0
    entries_removed: int = 0
    flows_reset: int = 0


def node_addresses() -> list[str]:
    """The IPv4 addresses of this network namespace (loopback's 127/8 excluded)."""
    return sorted({a for a in addresses() if not a.startswith("127.")})


class NodeDatapath:
    def __init__(self, pin_dir: str = DEFAULT_PIN_DIR, nodeport_devices: Sequence[str] = (),
                 allow_localhost: bool = False) -> None:
        self.loader = Loader(pin_dir)
        self.datapath = Datapath(self.loader)
        self.nodeport_devices = tuple(nodeport_devices)
        self.lb: LoadBalancer | None = None
        self.allow_localhost = allow_localhost  # the node itself reaches every endpoint, whatever its policy
        self.cross: CrossNode | None = None  # other nodes' endpoints (issue 13): set before start
        self.host_addresses: list[str] = []
        self._host_items: list[tuple[IPNetwork, int]] | None = None
        self.started = False
        # name -> (ep_id, address, ifname, identity, flags)
        self._attached: dict[str, tuple[int, str, str, int, int]] = {}
        self._synced: dict[str, tuple[MapState, tuple[tuple[str, int], ...]]] = {}
        self._swept: frozenset[tuple[str, int]] | None = None  # the endpoints the last sweep kept

    @property
    def pin_dir(self) -> str:
        return self.loader.pin_dir

    def start(self) -> None:
        self.loader.load()
        self.loader.set_config(CONFIG_ALLOW_LOCALHOST, 1 if self.allow_localhost else 0)
        self.datapath.reread_ipcache()
        proxyroute.install()
        self.host_addresses = node_addresses()
        self._host_items = None
        for dev in self.nodeport_devices:
            self.loader.attach(dev, NETDEV_PROGRAMS)
        if self.cross is not None:  # after NodePort: on a shared underlay from_network does both
            self.cross.start()
        self.lb = LoadBalancer(self.loader)
        self.datapath.start_events()
        self.started = True

    def stop(self) -> None:
        """Stop reading events and drop handles; what is attached and pinned stays."""
        if not self.started:
            return
        self.started = False
        self.datapath.stop_events()
        if self.lb is not None:
            self.lb.close()
            self.lb = None
        self.loader.close()
        self._attached.clear()
        self._synced.clear()
        self._swept = None

    def subscribe(self, callback: Callable[[DatapathEvent], None]) -> None:
        self.datapath.subscribe(callback)

    # -- state in -------------------------------------------------------------------------

    def sync(self, ipcache: Iterable[tuple[IPNetwork, int]], plans: Sequence[EndpointPlan],
             proxy_ports: Mapping[str, int], identity_of: Callable[[str], int],
             changes: IPCacheChanges | None = None) -> SyncResult:
        """Make the kernel express ``plans``; ``proxy_ports`` maps ``"ingress/80"`` to the port
        of Envoy's listener for it (a redirect without one is written as a deny). ``changes``: how
        ``ipcache`` differs from the one before (applied alone if the kernel holds that one)."""
        if self._host_items is None:  # the same pairs each time: the datapath diffs by identity
            self._host_items = [(ipaddress.ip_network(f"{a}/32"), HOST_IDENTITY) for a in self.host_addresses]
        host = {prefix for prefix, _ in self._host_items}
        if changes is None or not self.datapath.patch_ipcache(
                [(p, i) for p, i in changes.changes if p not in host], changes.since, changes.version):  # host wins
            items = list(ipcache)
            items += self._host_items
            self.datapath.sync_ipcache(items, changes.version if changes is not None else 0)
        attached = self._sync_endpoints(plans)
        port_of = _proxy_port_of(proxy_ports)
        ports_key = tuple(sorted(proxy_ports.items()))
        written = removed = 0
        changed = False
        for plan in plans:
            done = self._synced.get(plan.name)
            if done is not None and done[0] is plan.map_state and done[1] == ports_key:
                continue
            w, r = self.datapath.sync_policy(plan.ep_id, plan.map_state, port_of, ports_key)
            written, removed = written + w, removed + r
            # conntrack is read only if a flow may now need its proxy (an answer adding an allowed
            # address does not: walking every flow per answer would grow with the node's flows)
            changed = changed or (bool(w or r) and self.datapath.redirects_moved)
            self._synced[plan.name] = (plan.map_state, ports_key)
        reset = self._reset_flows(plans, port_of, identity_of) if changed else 0
        return SyncResult(attached, written, removed, reset)

    def _sync_endpoints(self, plans: Sequence[EndpointPlan]) -> int:
        by_name = {p.name: p for p in plans}
        for name in [n for n in self._attached if n not in by_name]:
            ep_id, address, ifname, _, _ = self._attached.pop(name)
            self.datapath.remove_endpoint(ep_id, address, ifname)
            self._synced.pop(name, None)
        n = 0
        for plan in plans:
            want = (plan.ep_id, plan.address, plan.interface, plan.identity, plan.flags)
            have = self._attached.get(plan.name)
            if have == want:
                continue
            if have is not None and (have[0], have[1], have[2]) != want[:3]:
                self.datapath.remove_endpoint(have[0], have[1], have[2] if have[2] != plan.interface else None)
                self._synced.pop(plan.name, None)
            self.datapath.upsert_endpoint(plan.ep_id, plan.address, plan.interface, plan.identity, plan.flags)
            self._attached[plan.name] = want
            n += 1
        # Left from an earlier run: addresses and policy tries of endpoints that are gone (looked for
        # when the endpoints change, not per sync: walking the kernel's map costs its size).
        swept = frozenset((p.address, p.ep_id) for p in plans)
        if swept == self._swept:
            return n
        self._swept = swept
        live = {p.address for p in plans}
        for address in maps.endpoint_items(self.loader.maps["endpoints"]):
            if address not in live:
                maps.delete_endpoint(self.loader.maps["endpoints"], address)
        ids = {p.ep_id for p in plans}
        for ep_id in [i for i in self.loader.policy_maps if i not in ids]:
            self.loader.drop_policy_map(ep_id)
        return n

    def _reset_flows(self, plans: Sequence[EndpointPlan], port_of: ProxyPortOf,
                     identity_of: Callable[[str], int]) -> int:
        """Established TCP (and UDP: DNS) flows whose new verdict is a redirect: point them at the proxy."""
        by_address = {p.address: p for p in plans}

        def needs_proxy(ct: maps.CtEntry) -> int:
            if ct.src_identity == HOST_IDENTITY:
                return 0  # the node's own (Envoy's upstream) connections are not redirected
            src, dst = by_address.get(ct.saddr), by_address.get(ct.daddr)
            proto = Protocol(ct.protocol)
            if src is not None:
                hit = src.map_state.egress.lookup(identity_of(ct.daddr), proto, ct.dport)
                if hit is not None and hit[2].verdict is Verdict.REDIRECT:
                    return port_of(Direction.EGRESS, hit[1], hit[2])
            if dst is not None:
                src_id = src.identity if src is not None else identity_of(ct.saddr)
                hit = dst.map_state.ingress.lookup(src_id, proto, ct.dport)
                if hit is not None and hit[2].verdict is Verdict.REDIRECT:
                    return port_of(Direction.INGRESS, hit[1], hit[2])
            return 0

        n = self.datapath.reset_flows_to_proxy(needs_proxy)
        if n:
            _log.info("%d established flow(s) now need L7 policy: reset on their next packet", n)
        return n

    # -- state out ------------------------------------------------------------------------

    def policy_rows(self, ep_id: int) -> list[dict[str, object]]:
        return self.datapath.policy_rows(ep_id)

    def drop_counts(self) -> dict[int, int]:
        return self.datapath.drop_counts()

    def attached(self) -> dict[str, str]:
        """Endpoint name -> the interface its programs are attached to."""
        return {name: a[2] for name, a in self._attached.items()}


def proxy_key(direction: Direction, port: int) -> str:
    return f"{direction.value}/{port}"


#: ``proxy_ports`` key of the DNS proxy's port (UDP and TCP), where egress ``dns`` rules redirect
DNS_PROXY_KEY = "dns"


def _proxy_port_of(proxy_ports: Mapping[str, int]) -> ProxyPortOf:
    def port_of(direction: Direction, l4: L4Key, entry: PolicyEntry) -> int:
        if l4.port_lo != l4.port_hi:
            return 0  # L7 on a port range: no proxy (written as a deny)
        if entry.l7 is not None and entry.l7.protocol == "dns":
            # the DNS proxy, not Envoy; only for what endpoints send (Cilium's DNS proxy is egress)
            if direction is Direction.EGRESS and l4.protocol in (Protocol.UDP, Protocol.TCP):
                return proxy_ports.get(DNS_PROXY_KEY, 0)
            return 0
        if l4.protocol is not Protocol.TCP:
            return 0  # L7 on UDP: no proxy (written as a deny)
        return proxy_ports.get(proxy_key(direction, l4.port_lo), 0)

    return port_of


def cleanup(pin_dir: str, interfaces: Iterable[str]) -> None:
    """Remove what the datapath left in the kernel: programs on ``interfaces``, pinned maps and
    the proxy route. For ``cilia cleanup``, with the agent stopped."""
    loader = Loader(pin_dir)
    for ifname in interfaces:
        loader.attached.add(ifname)
    try:
        for ifname in list(loader.attached):
            loader.detach(ifname)
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)
        proxyroute.remove()


def cleanup_network(pin_dir: str, devices: Iterable[str]) -> list[str]:
    """Detach the cross-node program from the underlay ``devices``, remove routes and tunnel."""
    loader = Loader(pin_dir)
    for ifname in devices:
        loader.detach(ifname)
    return crossnode.cleanup()

"""Reaching other nodes' endpoints: routes to their pod prefixes, and the VXLAN tunnel.

Two modes, as Cilium 1.0 offered:

- ``direct`` (direct routing): a route per other node, its pod prefix via its node IP on the
  underlay. The receiving node takes the sender's identity from its ipcache, which the kvstore
  fills with every node's endpoints.
- ``vxlan`` (``cilia agent --tunnel vxlan``): one VXLAN device ``cilia_vxlan`` in external
  (collect-metadata) mode; other nodes' pod prefixes are routed into it, ``to_overlay`` picks the
  remote node from the ``tunnels`` map and puts the sender's identity in the VNI, and
  ``from_overlay`` on the receiver reads it back (see datapath.c). The device does no ARP: the
  inner frame is addressed to the sender's own device and the receiver takes it as its own.

In both modes ``from_network`` sits at ingress of the underlay device (the one holding the node
IP), so flows from other nodes and outside hosts to L7 ports are handed to Envoy. Routes are
made with pyroute2 under their own protocol number, so that only ours are ever replaced or
removed. Everything acts on the calling thread's network namespace (the node's).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .loader import Loader
from .netns import NetnsError, netlink

_log = logging.getLogger(__name__)

TunnelMode = Literal["disabled", "vxlan"]
VXLAN_DEVICE = "cilia_vxlan"
VXLAN_PORT = 8472  # Cilium's (Linux's historical VXLAN port)
VXLAN_OVERHEAD = 50  # outer IPv4 + UDP + VXLAN + inner Ethernet
ROUTE_PROTO = 0xC1  # marks the routes this module owns
IFF_NOARP = 0x80


@dataclass(frozen=True, slots=True)
class PeerNode:
    """Another node, as announced in the kvstore."""

    name: str
    ip: str
    pod_cidr: str


class CrossNode:
    def __init__(self, loader: Loader, node_ip: str, tunnel: TunnelMode = "disabled") -> None:
        self.loader = loader
        self.node_ip = node_ip
        self.tunnel = tunnel
        self.underlay = ""  # the device holding node_ip
        self._lock = threading.Lock()
        self._routes: dict[str, str] = {}  # pod prefix -> node IP, as installed
        self.last_error: str | None = None

    @property
    def mode(self) -> str:
        return "vxlan" if self.tunnel == "vxlan" else "direct"

    def start(self) -> None:
        """Attach to the underlay device (and make the tunnel device); raises NetnsError if this
        node has no interface with its node IP."""
        self.underlay = _device_of(self.node_ip)
        self.loader.attach_network(self.underlay, overlay=False)
        if self.tunnel == "vxlan":
            _make_vxlan(self.underlay)
            self.loader.attach_network(VXLAN_DEVICE, overlay=True)
        _log.info("cross-node datapath: %s routing, underlay %s (%s)", self.mode, self.underlay, self.node_ip)

    def sync(self, peers: Iterable[PeerNode]) -> None:
        """Route to exactly these nodes' pod prefixes (and tunnel to them in vxlan mode)."""
        want: dict[str, str] = {}
        for p in peers:
            if p.ip == self.node_ip:
                continue
            try:
                cidr = str(ipaddress.ip_network(p.pod_cidr))
                if ipaddress.ip_address(p.ip).version != 4:
                    raise ValueError("only IPv4 node addresses are routed")
            except ValueError as e:
                _log.warning("node %s: not routed: %s", p.name, e)
                continue
            want[cidr] = p.ip
        with self._lock:
            try:
                self._sync_routes(want)
                if self.tunnel == "vxlan":
                    from . import maps

                    maps.sync_tunnels(self.loader.maps["tunnels"],
                                      {ipaddress.IPv4Network(c): ip for c, ip in want.items()})
                self.last_error = None
            except (OSError, ValueError) as e:
                self.last_error = str(e)
                _log.warning("cross-node routes: %s", e)

    def _sync_routes(self, want: Mapping[str, str]) -> None:
        with netlink("routes to other nodes") as ipr:
            vx = ipr.link_lookup(ifname=VXLAN_DEVICE) if self.tunnel == "vxlan" else []
            have = {f"{r.get_attr('RTA_DST')}/{r['dst_len']}": r for r in _our_routes(ipr)}
            for cidr, gw in want.items():
                if self._routes.get(cidr) == gw and cidr in have:
                    continue
                if vx:
                    # the node IP as source: the receiver knows it (remote-node), not every address here
                    ipr.route("replace", dst=cidr, oif=vx[0], scope="link", prefsrc=self.node_ip, proto=ROUTE_PROTO)
                else:
                    ipr.route("replace", dst=cidr, gateway=gw, proto=ROUTE_PROTO)
                self._routes[cidr] = gw
            for cidr in [c for c in have if c not in want]:
                _del_route(ipr, have[cidr])
                self._routes.pop(cidr, None)

    def stop(self) -> None:
        """Nothing to do: routes, device and programs stay, so traffic keeps flowing while the
        agent is away (a restarted agent syncs them again)."""

    def routes(self) -> dict[str, str]:
        with self._lock:
            return dict(self._routes)


def _our_routes(ipr: Any) -> list[Any]:
    return [r for r in ipr.get_routes(family=socket.AF_INET, table=254) if r.get("proto") == ROUTE_PROTO]


def _del_route(ipr: Any, route: Any) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        ipr.route("del", dst=f"{route.get_attr('RTA_DST')}/{route['dst_len']}", proto=ROUTE_PROTO)
    except NetlinkError as e:
        if e.code != 3:  # ESRCH: gone already
            raise


def _device_of(address: str) -> str:
    with netlink(f"the device holding {address}") as ipr:
        for msg in ipr.get_addr(family=socket.AF_INET):
            if msg.get_attr("IFA_LOCAL") == address or msg.get_attr("IFA_ADDRESS") == address:
                links = ipr.get_links(msg["index"])
                return str(links[0].get_attr("IFLA_IFNAME"))
    raise NetnsError(19, f"--node-ip {address}: no interface of this node has that address")


def underlay_devices(node_ip: str) -> list[str]:
    """The device holding ``node_ip``, if this node still has it (for cleanup)."""
    try:
        return [_device_of(node_ip)]
    except NetnsError:
        return []


def _make_vxlan(underlay: str) -> None:
    """The tunnel device, external mode, no ARP, MTU fitted to the underlay; kept if present."""
    with netlink(f"VXLAN device {VXLAN_DEVICE}") as ipr:
        found = ipr.link_lookup(ifname=VXLAN_DEVICE)
        if not found:
            under = ipr.get_links(ipr.link_lookup(ifname=underlay)[0])[0]
            mtu = int(under.get_attr("IFLA_MTU") or 1500) - VXLAN_OVERHEAD
            if mtu < 1500:
                _log.warning("underlay %s leaves VXLAN an MTU of %d: endpoints with 1500 need PMTU discovery",
                             underlay, mtu)
            ipr.link("add", ifname=VXLAN_DEVICE, kind="vxlan", vxlan_collect_metadata=1, vxlan_port=VXLAN_PORT,
                     vxlan_learning=0, mtu=mtu)
            found = ipr.link_lookup(ifname=VXLAN_DEVICE)
        idx = found[0]
        ipr.link("set", index=idx, flags=IFF_NOARP, change=IFF_NOARP)
        ipr.link("set", index=idx, state="up")
    for conf in (VXLAN_DEVICE, "all"):  # replies to remote pods leave by the same device: loose is enough
        try:
            with open(f"/proc/sys/net/ipv4/conf/{conf}/rp_filter", "w", encoding="ascii") as f:
                f.write("0\n")
        except OSError:
            pass


def cleanup() -> list[str]:
    """Remove our routes and the tunnel device (``cilia cleanup``, agent stopped)."""
    done = []
    try:
        with netlink("cross-node routes") as ipr:
            routes = _our_routes(ipr)
            for r in routes:
                _del_route(ipr, r)
            if routes:
                done.append(f"removed {len(routes)} route(s) to other nodes' pods")
            found = ipr.link_lookup(ifname=VXLAN_DEVICE)
            if found:
                ipr.link("del", index=found[0])
                done.append(f"removed the tunnel device {VXLAN_DEVICE}")
    except NetnsError as e:
        _log.warning("cross-node cleanup: %s", e)
    return done

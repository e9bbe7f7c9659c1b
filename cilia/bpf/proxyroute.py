"""Deliver redirected packets to Envoy: Cilium's fwmark rule and local routing table.

``datapath.c`` hands a packet for another address to Envoy's transparent listener with
``bpf_sk_assign`` and marks it MARK_TO_PROXY; the socket is used only if the packet is routed to
the local stack, so packets with that mark are looked up in a table whose one route delivers
everything locally (``ip rule add fwmark 0x200/0xf00 lookup 2005``, as Cilium does). Also turns
on IPv4 forwarding, which traffic between endpoints on the node needs. Both act on the network
namespace of the calling thread, through pyroute2.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Any

from .netns import RTPROT_BOOT, NetnsError, netlink

_log = logging.getLogger(__name__)

TO_PROXY_MARK = 0x0200  # MARK_TO_PROXY in datapath.c
MARK_MASK = 0x0F00
ROUTE_TABLE = 2005  # Cilium's table for proxy delivery
RULE_PRIORITY = 9

_RULE = {"family": socket.AF_INET, "fwmark": TO_PROXY_MARK, "fwmask": MARK_MASK, "table": ROUTE_TABLE,
         "priority": RULE_PRIORITY}


def _ours(ipr: Any) -> list[Any]:
    return [r for r in ipr.get_rules(family=socket.AF_INET, priority=RULE_PRIORITY)
            if r.get("priority") == RULE_PRIORITY and r.get("table") == ROUTE_TABLE]


def installed() -> bool:
    with netlink("list rules") as ipr:
        return bool(_ours(ipr))


def install() -> None:
    """Add the rule and route (idempotent) and enable forwarding."""
    with netlink(f"proxy rule and table {ROUTE_TABLE}") as ipr:
        if not _ours(ipr):
            ipr.rule("add", **_RULE)
        lo = ipr.link_lookup(ifname="lo")[0]
        ipr.route("replace", type="local", dst="0.0.0.0/0", oif=lo, table=ROUTE_TABLE, scope="host",
                  proto=RTPROT_BOOT)
    with open("/proc/sys/net/ipv4/ip_forward", "w", encoding="ascii") as f:
        f.write("1\n")


def remove() -> None:
    """Remove the rule and the table's routes; safe to repeat (what cannot be removed is logged)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with netlink(f"remove proxy rule and table {ROUTE_TABLE}") as ipr:
            for _ in _ours(ipr):
                ipr.rule("del", **_RULE)
            for route in ipr.get_routes(family=socket.AF_INET, table=ROUTE_TABLE):
                if route.get("table") != ROUTE_TABLE:
                    continue  # only this table is flushed, whatever the filter did
                try:  # scope and protocol must match too, or the kernel finds no such route
                    ipr.route("del", table=ROUTE_TABLE, type=route["type"], dst_len=route["dst_len"],
                              dst=route.get("dst") or "0.0.0.0", oif=route.get("oif"), scope=route["scope"],
                              proto=route["proto"])
                except NetlinkError as e:
                    if e.code != errno.ESRCH:
                        raise
    except NetnsError as e:
        _log.warning("proxy route: %s", e)

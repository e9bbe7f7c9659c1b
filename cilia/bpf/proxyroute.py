"""Deliver redirected packets to Envoy: Cilium's fwmark rule and local routing table.

``datapath.c`` hands a packet for another address to Envoy's transparent listener with
``bpf_sk_assign`` and marks it MARK_TO_PROXY; the socket is used only if the packet is routed to
the local stack, so packets with that mark are looked up in a table whose one route delivers
everything locally (``ip rule add fwmark 0x200/0xf00 lookup 2005``, as Cilium does). Also turns
on IPv4 forwarding, which traffic between endpoints on the node needs. Both act on the network
namespace of the calling process.
"""

from __future__ import annotations

from .netns import ip

TO_PROXY_MARK = 0x0200  # MARK_TO_PROXY in datapath.c
MARK_MASK = 0x0F00
ROUTE_TABLE = 2005  # Cilium's table for proxy delivery
RULE_PRIORITY = 9

_RULE = ["fwmark", f"{TO_PROXY_MARK:#x}/{MARK_MASK:#x}", "lookup", str(ROUTE_TABLE)]


def installed() -> bool:
    rules = ip("-4", "rule", "show", "pref", str(RULE_PRIORITY)).stdout
    return f"lookup {ROUTE_TABLE}" in rules


def install() -> None:
    """Add the rule and route (idempotent) and enable forwarding."""
    if not installed():
        ip("-4", "rule", "add", *_RULE, "pref", str(RULE_PRIORITY))
    ip("-4", "route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE))
    with open("/proc/sys/net/ipv4/ip_forward", "w", encoding="ascii") as f:
        f.write("1\n")


def remove() -> None:
    """Remove the rule and the table's route; safe to repeat."""
    while installed():
        if ip("-4", "rule", "del", *_RULE, "pref", str(RULE_PRIORITY), check=False).returncode != 0:
            break
    ip("-4", "route", "flush", "table", str(ROUTE_TABLE), check=False)

"""IP prefix -> identity, looked up by longest prefix (the BPF ipcache's model)."""

from __future__ import annotations

import bisect
import ipaddress

from .identity import RESERVED
from .model import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class IPCache:
    def __init__(self) -> None:
        # per family, per prefix length: network address -> identity
        self._tables: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        self._entries: dict[IPNetwork, int] = {}
        self._defaults: dict[IPNetwork, int] = {}
        self._sorted: list[tuple[IPNetwork, int]] | None = None  # items(), kept in step with every change

    def set_world_defaults(self) -> None:
        """Addresses nothing else claims belong to the world identities (also
        after a policy prefix 0.0.0.0/0 or ::/0 that overrode them is deleted)."""
        for prefix, name in (("0.0.0.0/0", "world-ipv4"), ("::/0", "world-ipv6")):
            net = ipaddress.ip_network(prefix)
            self._defaults[net] = RESERVED[name][0]
            self.upsert(net, RESERVED[name][0])

    def upsert(self, prefix: IPNetwork, identity: int) -> None:
        old = self._entries.get(prefix)
        if old != identity and self._sorted is not None:
            # keep the sorted copy in step (a learned DNS answer adds one entry to many)
            if old is None:
                bisect.insort(self._sorted, (prefix, identity), key=_order)
            else:
                self._sorted[bisect.bisect_left(self._sorted, _order((prefix, old)), key=_order)] = (prefix, identity)
        self._entries[prefix] = identity
        table = self._tables[prefix.version].setdefault(prefix.prefixlen, {})
        table[int(prefix.network_address)] = identity

    def delete(self, prefix: IPNetwork) -> None:
        if prefix in self._defaults:
            self.upsert(prefix, self._defaults[prefix])
            return
        old = self._entries.pop(prefix, None)
        if old is None:
            return
        if self._sorted is not None:
            del self._sorted[bisect.bisect_left(self._sorted, _order((prefix, old)), key=_order)]
        table = self._tables[prefix.version].get(prefix.prefixlen, {})
        table.pop(int(prefix.network_address), None)

    def get(self, prefix: IPNetwork) -> int | None:
        return self._entries.get(prefix)

    def lookup(self, address: IPAddress | str) -> tuple[IPNetwork, int]:
        """The longest prefix holding ``address`` and its identity."""
        addr = ipaddress.ip_address(address)
        bits = 32 if addr.version == 4 else 128
        value = int(addr)
        tables = self._tables[addr.version]
        for length in sorted(tables, reverse=True):
            masked = value >> (bits - length) << (bits - length) if length else 0
            ident = tables[length].get(masked)
            if ident is not None:
                net_type = ipaddress.IPv4Network if addr.version == 4 else ipaddress.IPv6Network
                return net_type((masked, length)), ident
        raise KeyError(str(addr))

    def items(self) -> list[tuple[IPNetwork, int]]:
        """Every entry in address order (a copy; sorted once per change: every realize reads it)."""
        if self._sorted is None:
            self._sorted = sorted(self._entries.items(), key=_order)
        return list(self._sorted)


def _order(kv: tuple[IPNetwork, int]) -> tuple[int, int, int]:
    """(version, network, length) as plain integers: comparing ip_network objects is slow Python."""
    return kv[0].version, int(kv[0].network_address), kv[0].prefixlen

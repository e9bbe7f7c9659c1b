"""IP prefix -> identity, looked up by longest prefix (the BPF ipcache's model)."""

from __future__ import annotations

import ipaddress
import itertools
from bisect import bisect_left
from dataclasses import dataclass

from .identity import RESERVED
from .model import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_VERSIONS = itertools.count(1)  # ipcache versions, unique in the process (across IPCache objects)
LOG_MAX = 4096  # changes listed between two take_changes; more: consumers compare everything


@dataclass(frozen=True, slots=True)
class IPCacheChanges:
    """What changed from version ``since`` to ``version``, in order (identity None: deleted), so a
    consumer that holds ``since`` applies these instead of comparing every entry."""

    since: int
    version: int
    changes: tuple[tuple[IPNetwork, int | None], ...]


class IPCache:
    def __init__(self) -> None:
        # per family, per prefix length: network address -> identity
        self._tables: dict[int, dict[int, dict[int, int]]] = {4: {}, 6: {}}
        self._entries: dict[IPNetwork, int] = {}
        self._defaults: dict[IPNetwork, int] = {}
        # items() in address order, kept between calls: a few changes are applied to it by bisect
        # (other nodes' endpoints change the ipcache often, one or two at a time); many (a bulk
        # load) drop it for one sort
        self._sorted: list[tuple[IPNetwork, int]] | None = None
        self._keys: list[tuple[int, int, int]] = []  # _sorted's sort keys, for the bisect
        self._pending: dict[IPNetwork, int | None] = {}  # changes since _sorted (None: deleted)
        # each identity's prefixes in address order, kept as entries come and go (an identity's tuple
        # is a new object only when its prefixes change: sinks compare them by identity)
        self._by_identity: dict[int, tuple[IPNetwork, ...]] = {}
        # each identity's tuple as the last by_identity() gave it, for those changed since: an
        # identity whose prefixes came back to the same set (added and deleted in between) keeps it
        self._given: dict[int, tuple[IPNetwork, ...] | None] = {}
        self.version = next(_VERSIONS)
        self._log: list[tuple[IPNetwork, int | None]] | None = []  # since _log_since (None: too many)
        self._log_since = self.version

    def set_world_defaults(self) -> None:
        """Addresses nothing else claims belong to the world identities (also
        after a policy prefix 0.0.0.0/0 or ::/0 that overrode them is deleted)."""
        for prefix, name in (("0.0.0.0/0", "world-ipv4"), ("::/0", "world-ipv6")):
            net = ipaddress.ip_network(prefix)
            self._defaults[net] = RESERVED[name][0]
            self.upsert(net, RESERVED[name][0])

    def upsert(self, prefix: IPNetwork, identity: int) -> None:
        old = self._entries.get(prefix)
        if old != identity:
            self._changed(prefix, identity)
            if old is not None:
                self._leave(old, prefix)
            self._given.setdefault(identity, self._by_identity.get(identity))
            mine = (*self._by_identity.get(identity, ()), prefix)
            self._by_identity[identity] = tuple(sorted(mine, key=_key)) if len(mine) > 1 else mine
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
        self._changed(prefix, None)
        self._leave(old, prefix)
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
        """Every entry in address order (a copy: every realize reads it)."""
        if self._sorted is None:
            self._sorted = sorted(self._entries.items(), key=lambda kv: _key(kv[0]))
            self._keys = [_key(p) for p, _ in self._sorted]
        else:
            for prefix, identity in self._pending.items():
                key = _key(prefix)
                i = bisect_left(self._keys, key)
                present = i < len(self._keys) and self._keys[i] == key
                if identity is None:
                    if present:
                        del self._keys[i], self._sorted[i]
                elif present:
                    self._sorted[i] = (prefix, identity)
                else:
                    self._keys.insert(i, key)
                    self._sorted.insert(i, (prefix, identity))
        self._pending.clear()
        return list(self._sorted)

    def by_identity(self) -> dict[int, tuple[IPNetwork, ...]]:
        """Each identity's prefixes in address order (a copy of the mapping; the tuples are kept)."""
        for identity, given in self._given.items():
            if given is not None and self._by_identity.get(identity) == given:
                self._by_identity[identity] = given
        self._given.clear()
        return dict(self._by_identity)

    def _leave(self, identity: int, prefix: IPNetwork) -> None:
        self._given.setdefault(identity, self._by_identity.get(identity))
        left = tuple(p for p in self._by_identity.get(identity, ()) if p != prefix)
        if left:
            self._by_identity[identity] = left
        else:
            self._by_identity.pop(identity, None)

    def take_changes(self) -> IPCacheChanges | None:
        """The changes since the last call (None: too many were made to list)."""
        log, since = self._log, self._log_since
        self._log, self._log_since = [], self.version
        return None if log is None else IPCacheChanges(since, self.version, tuple(log))

    def _changed(self, prefix: IPNetwork, identity: int | None) -> None:
        self.version = next(_VERSIONS)
        if self._log is not None:
            self._log.append((prefix, identity))
            if len(self._log) > LOG_MAX:
                self._log = None
        if self._sorted is None:
            return
        self._pending[prefix] = identity
        if len(self._pending) > 64 + len(self._entries) // 16:
            self._sorted, self._pending = None, {}


def _key(prefix: IPNetwork) -> tuple[int, int, int]:
    """The order of (version, network, length) by plain integers: comparing ip_network objects is slow Python."""
    return prefix.version, int(prefix.network_address), prefix.prefixlen

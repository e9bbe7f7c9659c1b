"""A resolved map state as BPF policy-map entries (pure; no kernel needed).

The kernel map is an LPM trie per endpoint, keyed like Cilium's ``cilium_policy_<EPID>``::

    prefixlen | identity (be32) | egress (u8) | protocol (u8) | dport (be16)

Identity and direction are always matched whole (40 bits). A wildcard protocol stops the prefix
there; a named protocol adds 8 bits and a port range becomes the aligned port blocks covering it
(a prefix of the 16 port bits each). A port range on the ANY protocol is written once per
protocol that has ports (ICMP's "port" is its type), since a prefix cannot skip the protocol byte.

Why two lookups are enough, and give what ``DirectionMapState.lookup`` gives: the map state is
closed under intersection, so for a flow the matching keys of one identity group nest, the
narrowest is present, and its aligned block holding the port is the longest prefix that matches.
When several keys produce the same trie key, the most specific (``L4Key.specificity``) keeps it.
An identity's group already holds its intersections with the ANY group, so whenever the exact
identity matches at all, its answer is at least as specific: the datapath looks the identity up
first and falls back to identity 0.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from cilia.policy.mapstate import ANY_IDENTITY, MAX_PORT, DirectionMapState, L4Key, PolicyEntry, Verdict
from cilia.policy.model import Direction, Protocol

#: protocols the datapath classifies with a port (ICMP/ICMPv6: the type)
PORTED_PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP, Protocol.ICMP, Protocol.ICMPV6)

KEY_SIZE = 12
# value: proxy_port u16, flags u8, pad u8, rule_id u32, packets u64, bytes u64
VALUE = struct.Struct("<HBxIQQ")
VALUE_SIZE = VALUE.size
FLAG_DENY = 1
_BASE_BITS = 40  # identity + direction


def _key(identity: int, egress: bool, protocol: int, port: int, port_bits: int) -> bytes:
    prefixlen = _BASE_BITS if protocol == 0 else _BASE_BITS + 8 + port_bits
    return struct.pack("<I", prefixlen) + struct.pack(">IBBH", identity, int(egress), protocol, port)


assert len(_key(0, False, 0, 0, 0)) == KEY_SIZE


@dataclass(frozen=True, slots=True)
class PolicyKey:
    identity: int
    egress: bool
    protocol: int  # 0: any
    port: int  # first port of the block
    port_bits: int  # how many leading port bits are fixed (16: one port)

    def pack(self) -> bytes:
        return _key(self.identity, self.egress, self.protocol, self.port, self.port_bits)

    @classmethod
    def unpack(cls, raw: bytes) -> PolicyKey:
        (prefixlen,) = struct.unpack_from("<I", raw)
        identity, egress, protocol, port = struct.unpack_from(">IBBH", raw, 4)
        bits = max(0, prefixlen - _BASE_BITS - 8) if prefixlen > _BASE_BITS else 0
        return cls(identity, bool(egress), protocol if prefixlen > _BASE_BITS else 0, port, bits)

    @property
    def port_range(self) -> tuple[int, int]:
        if self.protocol == 0 or self.port_bits == 0:
            return 0, MAX_PORT
        return self.port, self.port + (1 << (16 - self.port_bits)) - 1

    def __str__(self) -> str:
        if self.protocol == 0:
            return "ANY"
        proto = Protocol(self.protocol).label if self.protocol in Protocol._value2member_map_ else str(self.protocol)
        lo, hi = self.port_range
        if lo == 0 and hi == MAX_PORT:
            return f"ANY/{proto}"
        return f"{lo}/{proto}" if lo == hi else f"{lo}-{hi}/{proto}"


@dataclass(frozen=True, slots=True)
class PolicyValue:
    proxy_port: int
    deny: bool
    rule_id: int

    def pack(self, packets: int = 0, nbytes: int = 0) -> bytes:
        return VALUE.pack(self.proxy_port, FLAG_DENY if self.deny else 0, self.rule_id, packets, nbytes)

    @classmethod
    def unpack(cls, raw: bytes) -> tuple[PolicyValue, int, int]:
        proxy_port, flags, rule_id, packets, nbytes = VALUE.unpack(raw)
        return cls(proxy_port, bool(flags & FLAG_DENY), rule_id), packets, nbytes


def port_blocks(lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """The fewest aligned blocks covering ``lo..hi``, as (first port, fixed leading bits)."""
    while lo <= hi:
        size = lo & -lo if lo else 1 << 16
        while size > hi - lo + 1:
            size >>= 1
        yield lo, 16 - size.bit_length() + 1
        lo += size


#: what the datapath does with one entry: (proxy port, deny) for a map-state entry on an L4 key
ProxyPortOf = Callable[[Direction, L4Key, PolicyEntry], int]


def direction_entries(state: DirectionMapState, proxy_port_of: ProxyPortOf,
                      rule_id_of: Callable[[PolicyEntry], int]) -> dict[bytes, tuple[PolicyValue, L4Key]]:
    """Every trie entry of one direction: packed key -> (value, the map-state key it came from)."""
    out: dict[bytes, tuple[PolicyValue, L4Key]] = {}
    out.update(identity_entries(state.direction, ANY_IDENTITY, state.any_group, proxy_port_of, rule_id_of))
    for ident, group in state.groups.items():
        out.update(identity_entries(state.direction, ident, group, proxy_port_of, rule_id_of))
    return out


def identity_entries(direction: Direction, ident: int, group: Mapping[L4Key, PolicyEntry], proxy_port_of: ProxyPortOf,
                     rule_id_of: Callable[[PolicyEntry], int]) -> dict[bytes, tuple[PolicyValue, L4Key]]:
    """The trie entries of one peer identity (0: ANY) in one direction. Keys hold the identity, so
    identities never share one: a trie is the union of its identities' entries."""
    egress = direction is Direction.EGRESS
    out: dict[bytes, tuple[PolicyValue, L4Key]] = {}
    for l4, entry in group.items():
        if entry.verdict is Verdict.DENY:
            value = PolicyValue(0, True, rule_id_of(entry))
        elif entry.verdict is Verdict.REDIRECT:
            port = proxy_port_of(direction, l4, entry)
            # No proxy to send it to: fail closed, as a deny the rule names.
            value = PolicyValue(port, port == 0, rule_id_of(entry))
        else:
            value = PolicyValue(0, False, rule_id_of(entry))
        for key in _keys(ident, egress, l4):
            packed = key.pack()
            have = out.get(packed)
            if have is None or l4.specificity() > have[1].specificity():
                out[packed] = (value, l4)
    return out


def _keys(ident: int, egress: bool, l4: L4Key) -> Iterator[PolicyKey]:
    full = l4.port_lo == 0 and l4.port_hi == MAX_PORT
    if l4.protocol is Protocol.ANY:
        if full:
            yield PolicyKey(ident, egress, 0, 0, 0)
            return
        protocols: tuple[Protocol, ...] = PORTED_PROTOCOLS
    else:
        protocols = (l4.protocol,)
    for proto in protocols:
        if full:
            yield PolicyKey(ident, egress, int(proto), 0, 0)
        else:
            for port, bits in port_blocks(l4.port_lo, l4.port_hi):
                yield PolicyKey(ident, egress, int(proto), port, bits)


def lpm_lookup(entries: dict[bytes, tuple[PolicyValue, L4Key]], identity: int, egress: bool,
               protocol: int, port: int) -> tuple[PolicyValue, L4Key] | None:
    """What the kernel's two trie lookups return (a model, for tests and ``policy trace``)."""
    for ident in (identity, 0) if identity else (0,):
        for bits in range(16, -1, -1):
            base = port & ~((1 << (16 - bits)) - 1) & 0xFFFF if bits else 0
            hit = entries.get(_key(ident, egress, protocol, base, bits))
            if hit is not None:
                return hit
        hit = entries.get(_key(ident, egress, 0, 0, 0))
        if hit is not None:
            return hit
    return None

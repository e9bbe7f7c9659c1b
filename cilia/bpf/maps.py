"""The datapath's maps as Python values: packing, and syncing with only the changed entries.

Layouts mirror the structs in ``datapath.c``. Addresses are stored in network order.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .bpfmap import Map

IPCACHE_KEY = struct.Struct("<I4s")
IPCACHE_VAL = struct.Struct("<I")
ENDPOINT_KEY = struct.Struct("4s")
ENDPOINT_VAL = struct.Struct("<IIII")
CT_KEY = struct.Struct(">4s4sHHB3x")
CT_VAL = struct.Struct("<HBxIQQQ")
EVENT = struct.Struct("<BBBBHHIII4s4s2s2sIII")


def ip4(addr: str | ipaddress.IPv4Address) -> bytes:
    return socket.inet_aton(str(addr))


AUDIT_INGRESS = 1  # EP_AUDIT_* in datapath.c
AUDIT_EGRESS = 2


@dataclass(frozen=True, slots=True)
class EndpointEntry:
    ep_id: int
    ifindex: int
    identity: int
    flags: int = 0  # AUDIT_INGRESS | AUDIT_EGRESS


def sync_ipcache(m: Map, want: Iterable[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]],
                 current: dict[bytes, bytes] | None = None) -> int:
    """Make the ipcache trie hold exactly ``want`` (IPv4 prefixes); returns entries written or removed.
    ``current``: what it holds, kept by the caller (updated in place); None reads it from the kernel."""
    target: dict[bytes, bytes] = {}
    for prefix, identity in want:
        if prefix.version != 4:
            continue
        target[IPCACHE_KEY.pack(prefix.prefixlen, prefix.network_address.packed)] = IPCACHE_VAL.pack(identity)
    written, removed = _sync(m, target, current, None)
    return written + removed


def update_ipcache(m: Map, upserts: Mapping[ipaddress.IPv4Network | ipaddress.IPv6Network, int],
                   deletes: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
                   current: dict[bytes, bytes]) -> int:
    """Change only these ipcache entries (IPv4 prefixes), writes before deletes (as a full sync);
    ``current`` (what the trie holds) is kept in step. Returns entries written or removed."""
    n = 0
    for prefix, identity in upserts.items():
        if prefix.version != 4:
            continue
        key, value = IPCACHE_KEY.pack(prefix.prefixlen, prefix.network_address.packed), IPCACHE_VAL.pack(identity)
        if current.get(key) != value:
            m.update(key, value)
            current[key] = value
            n += 1
    for prefix in deletes:
        if prefix.version != 4:
            continue
        key = IPCACHE_KEY.pack(prefix.prefixlen, prefix.network_address.packed)
        if current.pop(key, None) is not None:
            m.delete(key)
            n += 1
    return n


def ipcache_items(m: Map) -> dict[ipaddress.IPv4Network, int]:
    out = {}
    for k, v in m.items():
        plen, addr = IPCACHE_KEY.unpack(k)
        out[ipaddress.IPv4Network((addr, plen))] = IPCACHE_VAL.unpack(v)[0]
    return out


def set_endpoint(m: Map, address: str, entry: EndpointEntry) -> None:
    m.update(ENDPOINT_KEY.pack(ip4(address)), ENDPOINT_VAL.pack(entry.ep_id, entry.ifindex, entry.identity,
                                                                entry.flags))


def delete_endpoint(m: Map, address: str) -> None:
    m.delete(ENDPOINT_KEY.pack(ip4(address)))


def endpoint_items(m: Map) -> dict[str, EndpointEntry]:
    out = {}
    for k, v in m.items():
        ep_id, ifindex, identity, flags = ENDPOINT_VAL.unpack(v)
        out[socket.inet_ntoa(k)] = EndpointEntry(ep_id, ifindex, identity, flags)
    return out


def sync_policy(m: Map, target: Mapping[bytes, bytes], current: dict[bytes, bytes] | None = None) -> tuple[int, int]:
    """Write ``target`` (packed key -> packed value with zero counters) into an endpoint's policy
    trie, leaving unchanged entries alone so their packet and byte counters keep counting.

    ``current`` is what the trie holds (key -> value without counters), kept by the caller so a
    change costs the entries it changes, not the size of the trie; None reads it from the kernel.
    It is updated in place. Returns (written, removed)."""
    return _sync(m, target, current, 8)  # compare proxy port, flags, rule id; not the counters


def _sync(m: Map, target: Mapping[bytes, bytes], current: dict[bytes, bytes] | None,
          width: int | None) -> tuple[int, int]:
    """Make ``m`` hold ``target``, comparing the first ``width`` bytes of values (None: all)."""
    if current is None:
        current = {k: v[:width] for k, v in m.items()}
    written = 0
    for k, v in target.items():
        if current.get(k) != v[:width]:
            m.update(k, v)
            current[k] = v[:width]
            written += 1
    stale = [k for k in current if k not in target]
    for k in stale:
        m.delete(k)
        del current[k]
    return written, len(stale)


@dataclass(frozen=True, slots=True)
class CtEntry:
    saddr: str
    daddr: str
    sport: int
    dport: int
    protocol: int
    proxy_port: int
    src_identity: int
    packets: int
    nbytes: int
    last_seen: int = 0  # bpf_ktime_get_ns() of its last packet: CLOCK_MONOTONIC, as time.monotonic_ns()


def ct_items(m: Map) -> list[CtEntry]:
    out = []
    for k, v in m.items():
        sa, da, sp, dp, proto = CT_KEY.unpack(k)
        proxy_port, _flags, src_id, packets, nbytes, seen = CT_VAL.unpack(v)
        out.append(CtEntry(socket.inet_ntoa(sa), socket.inet_ntoa(da), sp, dp, proto, proxy_port, src_id,
                           packets, nbytes, seen))
    return out


def ct_set_proxy(m: Map, entry: CtEntry, proxy_port: int) -> None:
    """Point an existing flow at the proxy: its next packet is answered with a reset, and the
    client's new connection goes through Envoy."""
    key = CT_KEY.pack(ip4(entry.saddr), ip4(entry.daddr), entry.sport, entry.dport, entry.protocol)
    raw = m.lookup(key)
    if raw is None:
        return
    _, flags, src_id, packets, nbytes, seen = CT_VAL.unpack(raw)
    m.update(key, CT_VAL.pack(proxy_port, flags, src_id, packets, nbytes, seen))


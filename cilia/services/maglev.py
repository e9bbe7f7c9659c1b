"""Backend selection tables for the BPF load balancer, in pure Python (no I/O).

Every service has a row of slots in the kernel; a new connection takes the backend in one slot:
- Maglev (``maglev_table``): the slot is the flow hash modulo the table size, and the table is
  filled from each backend's own permutation of the slots (Eisenbud et al., NSDI 2016), so a
  backend change moves about 1/N of the flows. Weights: in each filling round a backend claims
  as many slots as its weight, so its share of the table is proportional to its weight.
- weighted round-robin / weighted random (``weighted_sequence``): a smooth weighted round-robin
  sequence (each backend ``weight`` times per cycle, interleaved), stepped through in order or
  indexed at random by the kernel.

The table size is a prime (Maglev needs it, so every skip visits every slot). Cilium's default is
16381; ours is 1021 (loader.LB_TABLE_SIZE) because the rows of every possible service id live in
one preallocated array (16384 ids x 1021 x 4 bytes = 67 MB): with up to ~100 backends that is
still ≥ 10 slots each, enough for Maglev's balance (the test measures disruption at 10 backends).

``flow_hash`` is the kernel's hash of a flow (lb_datapath.h), bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import socket
import struct
from collections.abc import Sequence

_M32 = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & _M32


def _mix(h: int, k: int) -> int:
    k = (k * 0xCC9E2D51) & _M32
    k = _rotl(k, 15)
    k = (k * 0x1B873593) & _M32
    h ^= k
    h = _rotl(h, 13)
    return (h * 5 + 0xE6546B64) & _M32


def flow_hash(saddr: str, daddr: str, sport: int, dport: int, protocol: int) -> int:
    """The kernel's flow hash (lb_flow_hash): addresses and ports as they lie in the packet
    (network order), each 32-bit word read little-endian, as the BPF program loads them."""
    (sa,) = struct.unpack("<I", socket.inet_aton(saddr))
    (da,) = struct.unpack("<I", socket.inet_aton(daddr))
    (sp,) = struct.unpack("<H", struct.pack(">H", sport))
    (dp,) = struct.unpack("<H", struct.pack(">H", dport))
    h = 0x5EED
    for word in (sa, da, sp | (dp << 16), protocol):
        h = _mix(h, word)
    h ^= 16
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def _hashes(name: str) -> tuple[int, int]:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


def maglev_table(backends: Sequence[tuple[str, int]], size: int) -> list[int]:
    """The Maglev lookup table for ``backends`` ((name, weight): the name, e.g. "10.0.0.1:80",
    seeds its permutation, so a backend keeps its preferences whoever else is there): ``size``
    slots, each the index of a backend in ``backends``. Empty when there are no backends."""
    if not backends:
        return []
    if size < 2 or any(size % d == 0 for d in range(2, math.isqrt(size) + 1)):
        raise ValueError(f"Maglev table size {size} is not a prime")
    if len(backends) == 1 and backends[0][1] >= 1:
        return [0] * size  # one backend has every slot, whatever its permutation
    offsets: list[int] = []
    skips: list[int] = []
    for name, weight in backends:
        if weight < 1:
            raise ValueError(f"backend {name}: weight {weight} is not a positive integer")
        h1, h2 = _hashes(name)
        offsets.append(h1 % size)
        skips.append(h2 % (size - 1) + 1)
    table = [-1] * size
    next_pref = [0] * len(backends)
    filled = 0
    while True:
        for i, (_name, weight) in enumerate(backends):
            for _ in range(weight):
                # the backend's next preferred slot that is still free
                while True:
                    slot = (offsets[i] + next_pref[i] * skips[i]) % size
                    next_pref[i] += 1
                    if table[slot] < 0:
                        break
                table[slot] = i
                filled += 1
                if filled == size:
                    return table


def weighted_sequence(weights: Sequence[int]) -> list[int]:
    """Smooth weighted round-robin: each index ``weight`` times (after dividing the weights by
    their common divisor), interleaved so no backend gets a run while another waits."""
    if not weights:
        return []
    if any(w < 1 for w in weights):
        raise ValueError(f"weights {list(weights)}: each must be a positive integer")
    g = math.gcd(*weights)
    reduced = [w // g for w in weights]
    total = sum(reduced)
    current = [0] * len(reduced)
    out = []
    for _ in range(total):
        for i, w in enumerate(reduced):
            current[i] += w
        best = max(range(len(reduced)), key=lambda i: current[i])
        current[best] -= total
        out.append(best)
    return out

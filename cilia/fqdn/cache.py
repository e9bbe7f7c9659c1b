"""The DNS cache behind toFQDNs: name -> addresses, each with the time its answer expires.

Pure: the caller gives the time (``now``, seconds since the epoch, so a persisted cache means the
same after a restart) and, at collection, the addresses that conntrack still holds flows to.

- ``learn`` records an allowed answer; a TTL below ``min_ttl`` counts as ``min_ttl``
  (``--tofqdns-min-ttl``). It reports whether the name gained an address: a repeated answer only
  pushes expiry times out, which changes no policy.
- ``collect`` removes an address ``grace`` seconds after its answer expired, unless a flow to it
  is still open (Cilium keeps such "zombies" until conntrack no longer has them).
- Names compare as DNS names do (case-insensitive, no trailing dot); addresses in their
  canonical text form.

One heap entry per (name, address) finds what is due without scanning every name, so a
collection costs what expires, not the size of the cache.
"""

from __future__ import annotations

import heapq
import ipaddress
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..policy.l7.dns import normalize

DEFAULT_MIN_TTL = 0  # Cilium's --tofqdns-min-ttl since 1.13 (it was 3600): honour the server's TTL
DEFAULT_GRACE = 10.0  # seconds an expired address is kept before it may go
RECHECK = 5.0  # an expired address kept for an open flow is looked at again this much later


@dataclass(frozen=True, slots=True)
class CachedName:
    """One name as listed: its addresses with their expiry times, and who asked last."""

    name: str
    ips: dict[str, float]
    endpoint: str

    def to_json(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "endpoint": self.endpoint,
                "ips": [{"ip": ip, "expires": exp, "ttl": max(0, int(exp - now))}
                        for ip, exp in sorted(self.ips.items())]}


class _Entry:
    __slots__ = ("ips", "endpoint")

    def __init__(self, endpoint: str) -> None:
        self.ips: dict[str, float] = {}
        self.endpoint = endpoint


class FqdnCache:
    def __init__(self, min_ttl: int = DEFAULT_MIN_TTL, grace: float = DEFAULT_GRACE) -> None:
        if min_ttl < 0 or grace < 0:
            raise ValueError("min_ttl and grace must not be negative")
        self.min_ttl = min_ttl
        self.grace = grace
        self.learned_total = 0  # addresses added by answers
        self.expired_total = 0  # addresses removed after their answer expired
        self._lock = threading.Lock()
        self._names: dict[str, _Entry] = {}
        self._due: list[tuple[float, str, str]] = []  # (when it may go, name, ip)

    def __len__(self) -> int:
        return len(self._names)

    def ip_count(self) -> int:
        with self._lock:
            return sum(len(e.ips) for e in self._names.values())

    def learn(self, name: str, ips: Iterable[str], ttl: int, now: float, endpoint: str = "") -> frozenset[str] | None:
        """Record an answer. Returns the name's addresses if it gained one (the policy must now
        select them), None if nothing new was learned. Raises ValueError for a bad address or name."""
        key = normalize(name)
        if not key:
            raise ValueError("empty DNS name")
        expires = now + max(int(ttl), self.min_ttl)
        gained = False
        with self._lock:
            entry = self._names.get(key)
            held: dict[str, float] = entry.ips if entry is not None else {}
            # an address held already is canonical and valid: parsing it again is the cost of a repeat
            addrs = [ip if ip in held else str(ipaddress.ip_address(ip)) for ip in ips]
            if entry is None:
                if not addrs:
                    return None
                entry = self._names[key] = _Entry(endpoint)
            elif endpoint:
                entry.endpoint = endpoint
            for ip in addrs:
                old = entry.ips.get(ip)
                if old is None:
                    gained = True
                    self.learned_total += 1
                    heapq.heappush(self._due, (expires + self.grace, key, ip))
                if old is None or expires > old:
                    entry.ips[ip] = expires  # a later expiry is found when its heap entry comes due
            return frozenset(entry.ips) if gained else None

    def refresh(self, key: str, ips: Iterable[str], ttl: int, now: float, endpoint: str = "") -> bool:
        """``learn`` for an answer with nothing new, cheaply: ``key`` already normalized, every
        address already held in canonical form. True: their expiry times moved; False: some
        address is not held (nothing was changed: ``learn`` it)."""
        expires = now + max(int(ttl), self.min_ttl)
        with self._lock:
            entry = self._names.get(key)
            if entry is None:
                return False
            held = entry.ips
            if not all(ip in held for ip in ips):
                return False
            for ip in ips:
                if expires > held[ip]:
                    held[ip] = expires
            if endpoint:
                entry.endpoint = endpoint
            return True

    def restore(self, name: str, ips: Mapping[str, float], endpoint: str = "") -> None:
        """Put back persisted addresses with their own expiry times (the later one wins)."""
        key = normalize(name)
        with self._lock:
            entry = self._names.get(key)
            if entry is None:
                entry = self._names[key] = _Entry(endpoint)
            for ip, expires in ips.items():
                ip = str(ipaddress.ip_address(ip))
                old = entry.ips.get(ip)
                if old is None:
                    heapq.heappush(self._due, (float(expires) + self.grace, key, ip))
                if old is None or expires > old:
                    entry.ips[ip] = float(expires)
            if not entry.ips:
                del self._names[key]

    def collect(self, now: float, live: Callable[[], set[str]]) -> dict[str, frozenset[str]]:
        """Remove addresses whose answer expired more than ``grace`` ago and that no open flow
        uses (``live()``: addresses conntrack holds; called only if something is due). Returns the
        names whose addresses changed, with what they hold now (empty: the name is gone)."""
        changed: dict[str, frozenset[str]] = {}
        held: set[str] | None = None
        with self._lock:
            while self._due and self._due[0][0] <= now:
                _, key, ip = heapq.heappop(self._due)
                entry = self._names.get(key)
                expires = entry.ips.get(ip) if entry is not None else None
                if entry is None or expires is None:
                    continue  # cleaned meanwhile
                if expires + self.grace > now:  # a later answer extended it
                    heapq.heappush(self._due, (expires + self.grace, key, ip))
                    continue
                if held is None:
                    held = live()
                if ip in held:
                    heapq.heappush(self._due, (now + RECHECK, key, ip))
                    continue
                del entry.ips[ip]
                self.expired_total += 1
                changed[key] = frozenset(entry.ips)
                if not entry.ips:
                    del self._names[key]
        return changed

    def clean(self, name: str | None = None) -> dict[str, frozenset[str]]:
        """Forget ``name`` (every name with None); returns the names removed, each with no address."""
        with self._lock:
            keys = list(self._names) if name is None else [k for k in (normalize(name),) if k in self._names]
            for key in keys:
                del self._names[key]
            if name is None:
                self._due.clear()
            return {k: frozenset() for k in keys}

    def get(self, name: str) -> frozenset[str]:
        with self._lock:
            entry = self._names.get(normalize(name))
            return frozenset(entry.ips) if entry is not None else frozenset()

    def names(self) -> dict[str, frozenset[str]]:
        """Every name and its addresses (what the policy engine is fed)."""
        with self._lock:
            return {k: frozenset(e.ips) for k, e in self._names.items()}

    def entries(self, name: str | None = None) -> list[CachedName]:
        with self._lock:
            keys = sorted(self._names) if name is None else [k for k in (normalize(name),) if k in self._names]
            return [CachedName(k, dict(self._names[k].ips), self._names[k].endpoint) for k in keys]

    def snapshot(self) -> dict[str, Any]:
        """The whole cache as JSON-ready data (``restore`` each item to read it back)."""
        with self._lock:
            return {"names": {k: {"ips": dict(e.ips), "endpoint": e.endpoint} for k, e in self._names.items()}}

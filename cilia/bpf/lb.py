"""The load balancer's BPF maps (lb_datapath.h) as the agent drives them: services in, rows out.

``LoadBalancer.sync(services)`` makes the maps hold exactly ``services``, writing only entries
whose bytes differ; a service object seen last time is skipped without packing anything, so a
change costs the services it changes, not how many there are. The first sync after an agent
restart reads what the pinned maps hold (backend ids included) and rewrites nothing that is
already right: connections in flight keep their backends and counters keep counting.

Order of writes for one service (packets read the maps meanwhile): backends first, then the
slot row, then the service entry that says how many slots are in use, and only then the removal
of backends that left. A packet never finds a slot naming a backend that is not there yet or
any more.

Bad input raises ``LbError`` naming the service and field before anything is written.
"""

from __future__ import annotations

import mmap
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cilia.services.maglev import maglev_table, weighted_sequence
from cilia.services.model import Frontend, Service

from .bpfmap import Map
from .loader import Loader

SVC_KEY = struct.Struct("<4s2sBx")  # struct lb_svc_key
SVC_VAL = struct.Struct("<IIIBBxx")  # struct lb_svc_val
BACKEND_KEY = struct.Struct("<I")
BACKEND_VAL = struct.Struct("<4s2sBxI")  # struct lb_backend
COUNT_VAL = struct.Struct("<QQQQ")  # struct lb_count
U32 = struct.Struct("<I")

ALGORITHMS = {"maglev": 0, "random": 1, "weighted-rr": 2}  # LB_ALG_*
ALGORITHM_NAMES = {v: k for k, v in ALGORITHMS.items()}
STATES = {"active": 0, "terminating": 1, "not-ready": 2}
STATE_NAMES = {v: k for k, v in STATES.items()}
PROTOCOLS = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}
PROTOCOL_NAMES = {v: k for k, v in PROTOCOLS.items()}
F_NODEPORT = 1


class LbError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class LbSyncResult:
    services_written: int = 0
    services_removed: int = 0
    backends_written: int = 0
    backends_removed: int = 0
    rows_written: int = 0


class LoadBalancer:
    def __init__(self, loader: Loader) -> None:
        self.table_size = loader.lb_table_size
        self.services_max = loader.lb_services_max
        self.backends_max = loader.lb_backends_max
        # A slot row holds every backend a few times at least, or Maglev cannot balance them.
        self.max_backends_per_service = min(256, self.table_size // 4)
        self._maps = loader.maps
        slots = self._maps["lb_slots"]
        # u32 backend ids, row after row (stored in pairs by the kernel: see lb_datapath.h)
        self._slots = mmap.mmap(slots.fd, (self.services_max * self.table_size + 1) // 2 * 8, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
        self._last: dict[int, Service] = {}  # what the last sync wrote, by id
        self._frontends: dict[Frontend, int] = {}  # their frontends
        self._read_kernel()

    def close(self) -> None:
        self._slots.close()

    def _map(self, name: str) -> Map:
        return self._maps[name]

    def _read_kernel(self) -> None:
        """What the pinned maps hold (from this or an earlier agent)."""
        self._svc: dict[int, tuple[bytes, bytes]] = {}  # service id -> (key, value) in lb_services
        for k, v in self._map("lb_services").items():
            self._svc[SVC_VAL.unpack(v)[0]] = (k, v)
        self._backends: dict[int, bytes] = {}  # backend id -> value in lb_backends
        self._backend_ids: dict[int, dict[tuple[str, int], int]] = {}  # service id -> (addr, port) -> id
        for k, v in self._map("lb_backends").items():
            (bid,) = BACKEND_KEY.unpack(k)
            addr, port, _state, sid = BACKEND_VAL.unpack(v)
            self._backends[bid] = v
            self._backend_ids.setdefault(sid, {})[(socket.inet_ntoa(addr), int.from_bytes(port, "big"))] = bid
        self._next_id = max(self._backends, default=0) + 1
        self._free_ids: list[int] = []

    # -- checks ---------------------------------------------------------------------------

    def check(self, changed: Iterable[Service], want: dict[int, Service]) -> None:
        """Raise LbError for anything the maps cannot hold; nothing is written. ``changed``: the
        services of ``want`` (all, by id) that differ from the last sync; the others were
        checked when they changed, so a change costs the services it changes."""
        frontends: dict[Frontend, int] = {}
        for s in changed:
            where = f"service {s.id}"
            if not 1 <= s.id < self.services_max:
                raise LbError(f"{where}: id must be 1..{self.services_max - 1}")
            fe = s.frontend
            _address(fe.address, f"{where}: frontend.address")
            if not 1 <= fe.port <= 65535:
                raise LbError(f"{where}: frontend.port {fe.port} out of range 1..65535")
            if fe.protocol not in PROTOCOLS:
                raise LbError(f"{where}: frontend.protocol {fe.protocol!r} (TCP or UDP)")
            other = frontends.get(fe, self._frontends.get(fe))
            if other is not None and other != s.id and other in want and want[other].frontend == fe:
                raise LbError(f"{where}: frontend {fe} is already service {other}'s")
            frontends[fe] = s.id
            if s.algorithm not in ALGORITHMS:
                raise LbError(f"{where}: algorithm {s.algorithm!r} ({', '.join(ALGORITHMS)})")
            if not 0 <= s.affinity_seconds <= 86400 * 365:
                raise LbError(f"{where}: affinity_seconds {s.affinity_seconds} out of range")
            if len(s.backends) > self.max_backends_per_service:
                raise LbError(f"{where}: backends: {len(s.backends)} exceed the {self.max_backends_per_service} "
                              "a service can hold")
            seen: set[tuple[str, int]] = set()
            for i, b in enumerate(s.backends):
                bwhere = f"{where}: backends[{i}]"
                _address(b.address, f"{bwhere}.address")
                if not 1 <= b.port <= 65535:
                    raise LbError(f"{bwhere}.port {b.port} out of range 1..65535")
                if not isinstance(b.weight, int) or isinstance(b.weight, bool) or b.weight < 1:
                    raise LbError(f"{bwhere}.weight {b.weight!r} is not a positive integer")
                if b.state not in STATES:
                    raise LbError(f"{bwhere}.state {b.state!r} ({', '.join(STATES)})")
                if (b.address, b.port) in seen:
                    raise LbError(f"{bwhere}: {b} listed twice")
                seen.add((b.address, b.port))
            if s.algorithm != "maglev" and s.active:
                seq = len(weighted_sequence([b.weight for b in s.active]))
                if seq > self.table_size:
                    raise LbError(f"{where}: weights: the reduced weights add up to {seq}, more than the "
                                  f"{self.table_size} slots of a service")
        total = sum(len(s.backends) for s in want.values())
        if total > self.backends_max:
            raise LbError(f"backends: {total} in all exceed the backend map's {self.backends_max}")

    # -- sync -----------------------------------------------------------------------------

    def sync(self, services: Iterable[Service]) -> LbSyncResult:
        want: dict[int, Service] = {}
        for s in services:
            if s.id in want:
                raise LbError(f"service {s.id}: id used twice")
            want[s.id] = s
        changed = []
        for sid, svc in want.items():
            last = self._last.get(sid)
            if last is not svc and last != svc:
                changed.append(svc)
        self.check(changed, want)
        counts = [0, 0, 0, 0, 0]
        for sid in [s for s in self._svc if s not in want]:
            self._remove_service(sid, counts)
        # Frontends that move are let go before any is taken: one may pass to another service.
        for svc in changed:
            old = self._svc.get(svc.id)
            if old is not None and old[0] != _key(svc.frontend):
                self._map("lb_services").delete(old[0])
                self._svc[svc.id] = (b"", old[1])
        for svc in changed:
            self._write_service(svc, counts)
            last = self._last.get(svc.id)
            if last is not None and self._frontends.get(last.frontend) == svc.id:
                del self._frontends[last.frontend]
            self._frontends[svc.frontend] = svc.id
            self._last[svc.id] = svc
        return LbSyncResult(*counts)

    def _alloc_id(self) -> int:
        if self._free_ids:
            return self._free_ids.pop()
        bid = self._next_id
        self._next_id += 1
        return bid

    def _write_service(self, svc: Service, counts: list[int]) -> None:
        sid = svc.id
        ids = self._backend_ids.setdefault(sid, {})
        backends = self._map("lb_backends")
        target: dict[int, bytes] = {}
        for b in svc.backends:
            bid = ids.get((b.address, b.port))
            if bid is None:
                bid = ids[(b.address, b.port)] = self._alloc_id()
            target[bid] = BACKEND_VAL.pack(socket.inet_aton(b.address), b.port.to_bytes(2, "big"),
                                           STATES[b.state], sid)
        for bid, value in target.items():
            if self._backends.get(bid) != value:
                backends.update(BACKEND_KEY.pack(bid), value)
                self._backends[bid] = value
                counts[2] += 1

        row = self._row(svc, ids)
        if row:
            off = sid * self.table_size * 4
            packed = struct.pack(f"<{len(row)}I", *row)
            if self._slots[off:off + len(packed)] != packed:
                self._slots[off:off + len(packed)] = packed
                counts[4] += 1

        key = _key(svc.frontend)
        value = SVC_VAL.pack(sid, len(row), svc.affinity_seconds, ALGORITHMS[svc.algorithm],
                             F_NODEPORT if svc.type == "NodePort" else 0)
        old = self._svc.get(sid)
        if old is None:  # a new service (or an id used again): its counters start from zero
            self._map("lb_counters").update(U32.pack(sid), COUNT_VAL.pack(0, 0, 0, 0))
        if old != (key, value):
            self._map("lb_services").update(key, value)
            self._svc[sid] = (key, value)
            counts[0] += 1

        for addr_port, bid in [(k, v) for k, v in ids.items() if v not in target]:
            backends.delete(BACKEND_KEY.pack(bid))
            del ids[addr_port]
            self._backends.pop(bid, None)
            self._free_ids.append(bid)
            counts[3] += 1

    def _row(self, svc: Service, ids: dict[tuple[str, int], int]) -> list[int]:
        """The service's slots (backend ids); empty without an active backend."""
        active = sorted(svc.active, key=lambda b: (b.address, b.port))
        if not active:
            return []
        bids = [ids[(b.address, b.port)] for b in active]
        if svc.algorithm == "maglev":
            picks = maglev_table([(str(b), b.weight) for b in active], self.table_size)
        else:
            seq = weighted_sequence([b.weight for b in active])
            picks = seq * (self.table_size // len(seq))  # whole cycles only: weights stay exact
        return [bids[i] for i in picks]

    def _remove_service(self, sid: int, counts: list[int]) -> None:
        key, _ = self._svc.pop(sid)
        if key:
            self._map("lb_services").delete(key)
        counts[1] += 1
        for bid in self._backend_ids.pop(sid, {}).values():
            self._map("lb_backends").delete(BACKEND_KEY.pack(bid))
            self._backends.pop(bid, None)
            self._free_ids.append(bid)
            counts[3] += 1
        last = self._last.pop(sid, None)
        if last is not None and self._frontends.get(last.frontend) == sid:
            del self._frontends[last.frontend]

    # -- state out --------------------------------------------------------------------------

    def counters(self, sid: int) -> dict[str, int]:
        raw = self._map("lb_counters").lookup(U32.pack(sid))
        conns, packets, nbytes, no_backend = COUNT_VAL.unpack(raw) if raw else (0, 0, 0, 0)
        return {"connections": conns, "packets": packets, "bytes": nbytes, "no_backend_drops": no_backend}

    def rows(self) -> list[dict[str, Any]]:
        """Like ``cilium bpf lb list``: every service in the kernel's maps, its backends and counters."""
        backends: dict[int, list[dict[str, Any]]] = {}
        for k, v in self._map("lb_backends").items():
            (bid,) = BACKEND_KEY.unpack(k)
            addr, port, state, sid = BACKEND_VAL.unpack(v)
            backends.setdefault(sid, []).append({
                "id": bid, "address": f"{socket.inet_ntoa(addr)}:{int.from_bytes(port, 'big')}",
                "state": STATE_NAMES.get(state, str(state))})
        out = []
        for k, v in self._map("lb_services").items():
            addr, port, proto = SVC_KEY.unpack(k)
            sid, slots, affinity, alg, flags = SVC_VAL.unpack(v)
            last = self._last.get(sid)
            weights = {str(b): b.weight for b in last.backends} if last is not None else {}
            bs = sorted(backends.get(sid, []), key=lambda b: b["address"])
            for b in bs:
                b["weight"] = weights.get(b["address"], 0)  # 0: not known (before the first sync)
            out.append({
                "id": sid, "frontend": f"{socket.inet_ntoa(addr)}:{int.from_bytes(port, 'big')}",
                "protocol": PROTOCOL_NAMES.get(proto, str(proto)),
                "type": "NodePort" if flags & F_NODEPORT else "ClusterIP",
                "algorithm": ALGORITHM_NAMES.get(alg, str(alg)), "affinity_seconds": affinity, "slots": slots,
                "name": f"{last.namespace}/{last.name}" if last is not None and last.name else "",
                "backends": bs, **self.counters(sid)})
        out.sort(key=lambda r: r["id"])
        return out


def _key(fe: Frontend) -> bytes:
    return SVC_KEY.pack(socket.inet_aton(fe.address), fe.port.to_bytes(2, "big"), PROTOCOLS[fe.protocol])


def _address(text: str, where: str) -> None:
    try:
        socket.inet_pton(socket.AF_INET, text)
    except (OSError, TypeError):
        raise LbError(f"{where} {text!r} is not an IPv4 address") from None

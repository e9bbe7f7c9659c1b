"""The BPF datapath as the agent sees it: endpoints, ipcache and resolved policy in, decoded
events out. Writes only the map entries that changed.

Every policy-map value carries a rule id (a CRC of the deciding rules' ``file:line`` text), so a
drop or verdict event names the YAML that decided it; ids are stable across agent restarts, so a
restarted agent rewrites nothing that did not change and the counters keep counting.
"""

from __future__ import annotations

import operator
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from itertools import compress
from typing import Any

from cilia.policy.mapstate import L4Key, MapState, PolicyEntry, origins_name
from cilia.policy.model import Direction, IPNetwork, Protocol

from . import maps
from .loader import Loader
from .netns import accept_local
from .policykey import PolicyKey, PolicyValue, ProxyPortOf, identity_entries

NO_RULE = "no rule allows it"
DROP_REASONS = {
    133: "Policy denied",
    181: "Policy denied by denylist",
    132: "Invalid source ip",
    142: "Unknown L3 protocol",
    180: "No proxy to redirect to",
    158: "Service backend not found",  # a service with no active backend (lb_datapath.h)
}
VERDICTS = {1: "FORWARDED", 2: "DROPPED", 4: "AUDIT", 5: "REDIRECTED"}
EVENT_TYPES = {1: "drop", 4: "trace", 5: "policy-verdict"}
TRACE = 4
OBSERVATION_POINTS = {1: "from-endpoint", 2: "to-endpoint", 3: "to-proxy"}  # a trace event's reason field


def no_proxy(_d: Direction, _k: L4Key, _e: PolicyEntry) -> int:
    return 0


@dataclass(frozen=True, slots=True)
class DatapathEvent:
    time: float
    type: str  # drop | trace | policy-verdict
    verdict: str  # FORWARDED | DROPPED | REDIRECTED
    reason: int
    reason_text: str
    direction: str  # whose policy decided: "egress" (sender's) or "ingress" (receiver's)
    protocol: str
    source: str
    source_port: int
    destination: str
    destination_port: int  # ICMP: the type
    source_identity: int
    destination_identity: int
    endpoint_id: int
    proxy_port: int
    rule: str
    ifindex: int
    length: int
    observation_point: str = ""  # trace events: from-endpoint | to-endpoint | to-proxy
    # A flow through a service: the frontend the sender addressed ("10.96.0.10:80"; destination
    # is then the backend) and the service's id in the BPF maps. Empty/0 otherwise.
    service_frontend: str = ""
    service_id: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Datapath:
    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self.rules: dict[int, str] = {}
        self._written: dict[int, dict[bytes, bytes]] = {}  # per endpoint: what its trie holds
        self._ipcache_written: dict[bytes, bytes] | None = None  # what the ipcache trie holds
        self._ipcache_last: list[tuple[IPNetwork, int]] | None = None  # the items it was last synced to
        self._ipcache_version = 0  # the agent ipcache's version the trie holds (0: unknown)
        # per endpoint: the proxy ports, each peer identity's map-state group and packed entries, and
        # the serial of the map-state snapshot (per direction) they express
        self._packed: dict[int, tuple[object, dict[Direction, dict[int, tuple[object, dict[bytes, bytes]]]],
                                      dict[Direction, int]]] = {}
        self._events: list[Callable[[DatapathEvent], None]] = []
        # whether the last sync_policy may have turned an established flow's verdict into a redirect
        # (it wrote an entry with a proxy port, or removed one, which can uncover a broader redirect)
        self.redirects_moved = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trace_until = 0.0

    # -- state in ----------------------------------------------------------------------

    def sync_ipcache(self, items: Iterable[tuple[IPNetwork, int]], version: int = 0) -> int:
        """Make the ipcache trie hold ``items``, which are the agent ipcache's ``version`` (0: none)."""
        # what the trie holds is kept (read from the kernel once), and the last items given: a
        # sync writes what changed since (a learned DNS answer: one entry), not every entry
        # The agent's ipcache keeps its (prefix, identity) pairs as the same tuple objects while they
        # hold, so what is new is found by object identity, without hashing every prefix.
        want = list(items)
        last = self._ipcache_last
        m = self.loader.maps["ipcache"]
        self._ipcache_version = 0  # until written
        if self._ipcache_written is None:
            self._ipcache_written = {k: bytes(v) for k, v in m.items()}
            n = maps.sync_ipcache(m, want, self._ipcache_written)
        elif last is None:  # the last write was a patch: compare all
            n = maps.sync_ipcache(m, want, self._ipcache_written)
        else:
            before = set(map(id, last))  # map/compress: C loops, a learned answer must not pay per entry
            added = list(compress(want, map(operator.not_, map(before.__contains__, map(id, want)))))
            if len(want) - len(added) == len(last):  # nothing went: the new pairs, in order (last wins)
                n = maps.update_ipcache(m, dict(added), (), self._ipcache_written)
            else:
                n = maps.sync_ipcache(m, want, self._ipcache_written)  # something went: compare all
        self._ipcache_last = want  # held, so no id is reused while compared
        self._ipcache_version = version
        return n

    def patch_ipcache(self, changes: Iterable[tuple[IPNetwork, int | None]], since: int, version: int) -> bool:
        """Apply ``changes`` (identity None: deleted; the last change of a prefix wins) if the trie
        holds the agent ipcache's version ``since``: a learned answer writes its own entry without
        looking at the others. False (nothing done) if it does not: then ``sync_ipcache``."""
        if not since or since != self._ipcache_version or self._ipcache_written is None:
            return False
        upserts: dict[IPNetwork, int] = {}
        deletes: set[IPNetwork] = set()
        for prefix, identity in changes:
            if identity is None:
                upserts.pop(prefix, None)
                deletes.add(prefix)
            else:
                deletes.discard(prefix)
                upserts[prefix] = identity
        self._ipcache_version, self._ipcache_last = 0, None  # until written; the id diff's items are stale
        maps.update_ipcache(self.loader.maps["ipcache"], upserts, deletes, self._ipcache_written)
        self._ipcache_version = version
        return True

    def reread_ipcache(self) -> None:
        """Read the ipcache trie from the kernel at the next sync (after the maps were reopened)."""
        self._ipcache_written = None
        self._ipcache_last = None
        self._ipcache_version = 0

    def upsert_endpoint(self, ep_id: int, address: str, ifname: str, identity: int, flags: int = 0) -> int:
        """Attach to the endpoint's host-side interface and register its address (``flags``: audit
        mode per direction, maps.AUDIT_*); returns ifindex."""
        self.loader.policy_map(ep_id)  # exists (empty: everything dropped) before traffic is judged
        ifindex = self.loader.attach(ifname)
        # the node's own flows to L7 ports come back in here with a local source (bounce_to_proxy
        # in datapath.c): the kernel drops those as martians unless the device accepts them
        accept_local(ifname, self.loader.netns)
        maps.set_endpoint(self.loader.maps["endpoints"], address, maps.EndpointEntry(ep_id, ifindex, identity, flags))
        return ifindex

    def remove_endpoint(self, ep_id: int, address: str, ifname: str | None) -> None:
        maps.delete_endpoint(self.loader.maps["endpoints"], address)
        if ifname:
            self.loader.detach(ifname)
        self.loader.drop_policy_map(ep_id)
        self._written.pop(ep_id, None)
        self._packed.pop(ep_id, None)

    def rule_id(self, entry: PolicyEntry) -> int:
        text = origins_name(entry)
        rid = zlib.crc32(text.encode()) or 1
        self.rules[rid] = text
        return rid

    def sync_policy(self, ep_id: int, state: MapState, proxy_port_of: ProxyPortOf = no_proxy,
                    ports: object = None) -> tuple[int, int]:
        """Make endpoint ``ep_id``'s policy trie express ``state``; returns (written, removed).

        ``ports`` names what ``proxy_port_of`` answers (e.g. the proxy port table); given, the packed
        entries of a peer identity whose map-state group is the same object as at the last sync
        are reused (identities selected by the same rules share a group, and a group is replaced,
        never changed), so a new learned address costs its own entries, not the whole trie's; and if
        the last sync wrote the snapshot this one was made from (``DirectionMapState.base``), only the
        identities it moved are looked at."""
        memo = self._packed.get(ep_id)
        if ports is None or memo is None or memo[0] != ports:
            memo = (ports, {}, {})
        reuse, serials = memo[1], memo[2]
        current = self._written.get(ep_id)
        incremental = bool(reuse) and current is not None  # the trie holds exactly what ``reuse`` says
        packed: dict[Direction, dict[int, tuple[object, dict[bytes, bytes]]]] = {}
        moved: list[tuple[dict[bytes, bytes], dict[bytes, bytes]]] = []  # (old, new) entries of changed groups
        self._packed.pop(ep_id, None)  # until the trie holds ``packed``: a failed write rebuilds it all
        for direction in (state.ingress, state.egress):
            before = reuse.get(direction.direction, {})
            if incremental and direction.base and serials.get(direction.direction) == direction.base:
                now = packed[direction.direction] = before  # patched in place: the memo is dropped above
                for ident in (0, *direction.moved):
                    group = direction.any_group if ident == 0 else direction.groups.get(ident)
                    done = now.get(ident)
                    if group is None:
                        if done is not None:
                            moved.append((now.pop(ident)[1], {}))
                    elif done is None or done[0] is not group:
                        now[ident] = self._pack(direction.direction, ident, group, proxy_port_of)
                        moved.append((done[1] if done is not None else {}, now[ident][1]))
                continue
            now = packed[direction.direction] = {}
            for ident, group in ((0, direction.any_group), *direction.groups.items()):
                done = before.get(ident)
                if done is None or done[0] is not group:
                    fresh = self._pack(direction.direction, ident, group, proxy_port_of)
                    moved.append((done[1] if done is not None else {}, fresh[1]))
                    done = fresh
                now[ident] = done
            moved += [(before[ident][1], {}) for ident in before.keys() - now.keys()]  # identities gone
        synced = {state.ingress.direction: state.ingress.serial, state.egress.direction: state.egress.serial}
        if not incremental:
            self.redirects_moved = True  # not looked at entry by entry
            done_all = self.write_policy(ep_id, {k: v for by_ident in packed.values() for _, entries in
                                                 by_ident.values() for k, v in entries.items()})
            self._packed[ep_id] = (ports, packed, synced)
            return done_all
        assert current is not None
        m = self.loader.policy_map(ep_id)
        written = removed = 0
        redirects = False
        for old, new in moved:
            for k, v in new.items():
                if current.get(k) != v[:8]:  # proxy port, flags, rule id: not the counters
                    m.update(k, v)
                    current[k] = v[:8]
                    written += 1
                    redirects = redirects or v[:2] != b"\0\0"  # the proxy port
            for k in old.keys() - new.keys():
                if current.pop(k, None) is not None:
                    m.delete(k)
                    removed += 1
        self._packed[ep_id] = (ports, packed, synced)
        self.redirects_moved = redirects or bool(removed)
        return written, removed

    def _pack(self, direction: Direction, ident: int, group: Mapping[L4Key, PolicyEntry],
              proxy_port_of: ProxyPortOf) -> tuple[object, dict[bytes, bytes]]:
        """A peer identity's group and its packed trie entries."""
        entries = identity_entries(direction, ident, group, proxy_port_of, self.rule_id)
        return group, {k: value.pack() for k, (value, _l4) in entries.items()}

    def write_policy(self, ep_id: int, target: dict[bytes, bytes]) -> tuple[int, int]:
        """Write packed entries (see policykey) as endpoint ``ep_id``'s whole trie, changing only
        what differs from what was written before (read back from the kernel after a restart)."""
        current = self._written.get(ep_id)
        if current is None:
            current = self._written[ep_id] = {k: v[:8] for k, v in self.loader.policy_map(ep_id).items()}
        return maps.sync_policy(self.loader.policy_map(ep_id), target, current)

    # -- state out ---------------------------------------------------------------------

    def policy_rows(self, ep_id: int) -> list[dict[str, Any]]:
        """Like ``cilium bpf policy get``: one row per trie entry, with its counters."""
        rows = []
        for k, v in self.loader.policy_map(ep_id).items():
            key = PolicyKey.unpack(k)
            value, packets, nbytes = PolicyValue.unpack(v)
            rows.append({"verdict": "deny" if value.deny else ("redirect" if value.proxy_port else "allow"),
                         "direction": "egress" if key.egress else "ingress", "identity": key.identity,
                         "port": str(key), "proxy_port": value.proxy_port, "packets": packets, "bytes": nbytes,
                         "rule": self.rules.get(value.rule_id, f"rule {value.rule_id}")})
        rows.sort(key=lambda r: (r["direction"], r["identity"], r["port"]))
        return rows

    def conntrack(self) -> list[maps.CtEntry]:
        return maps.ct_items(self.loader.maps["conntrack"])

    def reset_flows_to_proxy(self, needs_proxy: Callable[[maps.CtEntry], int]) -> int:
        """Point established flows that now need L7 at their proxy port; a TCP flow's next packet
        gets a reset and the client reconnects through Envoy; a UDP flow's (DNS) next datagram goes to
        the DNS proxy. Returns how many."""
        m = self.loader.maps["conntrack"]
        n = 0
        for entry in self.conntrack():
            if entry.protocol in (Protocol.TCP, Protocol.UDP) and not entry.proxy_port:  # UDP: DNS
                port = needs_proxy(entry)
                if port:
                    maps.ct_set_proxy(m, entry, port)
                    n += 1
        return n

    # -- events ------------------------------------------------------------------------

    def subscribe(self, callback: Callable[[DatapathEvent], None]) -> None:
        self._events.append(callback)

    def start_events(self) -> None:
        self.loader.open_events(self._on_raw)
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll, name="bpf-events", daemon=True)
        self._thread.start()

    def stop_events(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def trace_for(self, seconds: float) -> None:
        """Emit trace events (every packet passed) for the next ``seconds``; each call extends it."""
        if not self._trace_until:
            self.loader.set_config(0, 1)
        self._trace_until = time.monotonic() + seconds

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.loader.poll_events(100)
            if self._trace_until and time.monotonic() > self._trace_until:
                self._trace_until = 0.0  # nobody asked for a while: stop paying for it
                self.loader.set_config(0, 0)

    def _on_raw(self, raw: bytes) -> None:
        ev = self.decode(raw[:maps.EVENT.size])
        for cb in list(self._events):
            cb(ev)

    def decode(self, raw: bytes) -> DatapathEvent:
        (etype, verdict, egress, proto, reason, proxy_port, ep_id, src_id, dst_id, saddr, daddr, sport, dport,
         rule_id, ifindex, length, svc_addr, svc_port, svc_id) = maps.EVENT.unpack(raw)
        try:
            proto_name = Protocol(proto).label
        except ValueError:
            proto_name = str(proto)
        rule = self.rules.get(rule_id, f"rule {rule_id}") if rule_id else (NO_RULE if verdict in (2, 4) else "")
        obs = OBSERVATION_POINTS.get(reason, str(reason)) if etype == TRACE else ""
        if etype == TRACE:
            reason = 0
        return DatapathEvent(
            time=time.time(), type=EVENT_TYPES.get(etype, str(etype)), verdict=VERDICTS.get(verdict, str(verdict)),
            reason=reason, reason_text=DROP_REASONS.get(reason, "") if reason else "",
            direction="egress" if egress else "ingress", protocol=proto_name,
            source=socket.inet_ntoa(saddr), source_port=int.from_bytes(sport, "big"),
            destination=socket.inet_ntoa(daddr), destination_port=int.from_bytes(dport, "big"),
            source_identity=src_id, destination_identity=dst_id, endpoint_id=ep_id, proxy_port=proxy_port,
            rule=rule, ifindex=ifindex, length=length, observation_point=obs,
            service_frontend=(f"{socket.inet_ntoa(svc_addr)}:{int.from_bytes(svc_port, 'big')}" if svc_id else ""),
            service_id=svc_id)

    def drop_counts(self) -> dict[int, int]:
        out = {}
        for k, v in self.loader.maps["drop_counts"].items():
            n = int.from_bytes(v, "little")
            if n:
                out[int.from_bytes(k, "little")] = n
        return out


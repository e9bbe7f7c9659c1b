"""One flow record for everything the agent sees decided, like Hubble's ``flow.Flow``.

Three sources feed it: the kernel's drop and verdict events (``kind`` ``l3/l4``), Envoy's access
logs (``http``, and ``tcp`` for connections the network RBAC refused) and the L7 parsers
(``kafka``, ``cassandra``, ``memcache``, a plugin's name). Each becomes a ``Flow`` when it
arrives, with both sides' identity, labels and endpoint read from a ``Who`` snapshot the agent
replaces at every change (so recording never waits for the agent's lock), and the rule that
decided it (policy, path, file:line). Verdicts are Hubble's: FORWARDED, DROPPED, REDIRECTED
(handed to the proxy), AUDIT (would have been dropped; the endpoint or policy is in audit mode),
ERROR (the proxy could not parse the traffic) and TRACED (seen, but no policy decided it: a
protocol step the proxy answered itself, such as a Cassandra version the client falls back from).

Flows leave the agent in Hubble's JSON form (``cilia.agent.hubble``). ``FlowFilter`` is what
``cilia observe`` filters on (Hubble's filter names); ``FlowFile`` appends flows as JSON lines to
a file that rotates by size.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bpf.datapath import DatapathEvent
from ..envoy.accesslog import AccessRecord
from ..l7parsers.base import Record
from ..envoy.l7service import ConnectionInfo
from ..policy.ipcache import IPCache
from ..policy.labels import LabelSet
from ..policy.mapstate import MapState
from ..policy.selectors import LabelSelector
from ..policy.model import IPNetwork
from ..services.model import Service
from .flow import Flow, Peer, Verdict
from .flowquery import HttpStatus
from .hubble import export_line, pod_name, policy_match_type

__all__ = ["Flow", "Peer", "Verdict"]  # the flow itself lives in .flow; importers of flows get it here too

if TYPE_CHECKING:
    from ..dnsproxy.server import DNSRecord  # a type only: the agent's flows need no dnspython


# --- who is who ------------------------------------------------------------------------------

PEERS_MAX = 4096  # named sides kept per snapshot


class Who:
    """A snapshot of endpoints, identities' labels and the ipcache, to name flows' sides.

    A revision's snapshot is made from the last one and what changed (``changed``): an endpoint
    add costs the same at any count. Label lists and the ipcache's lookup table are made when a
    flow first needs them, not at each revision."""

    def __init__(self, endpoints: Mapping[str, tuple[tuple[str, ...], int]], labels: Mapping[int, LabelSet],
                 ipcache: Iterable[tuple[IPNetwork, int]], endpoint_ids: Mapping[int, str] | None = None,
                 map_states: Mapping[str, MapState] | None = None,
                 service_names: Mapping[str, tuple[str, str]] | None = None) -> None:
        self._endpoints: dict[str, tuple[tuple[str, ...], int]] = dict(endpoints)
        self._map_states: dict[str, MapState] = dict(map_states or {})  # what decides, for the match type
        self._by_address = {ip: (name, ident) for name, (ips, ident) in endpoints.items() for ip in ips}
        # every endpoint of an identity; the first by name names the identity's side
        self._endpoints_of_identity: dict[int, tuple[str, ...]] = {}
        for name, (_, ident) in endpoints.items():
            self._endpoints_of_identity[ident] = (*self._endpoints_of_identity.get(ident, ()), name)
        self._label_sets = labels
        self._label_lists: dict[int, tuple[LabelSet, tuple[str, ...]]] = {}  # shared with later snapshots
        self._ipcache_items = ipcache
        self._ipcache: IPCache | None = None
        self.endpoint_ids = dict(endpoint_ids or {})  # BPF endpoint id -> name
        self._id_of_endpoint = {name: i for i, name in self.endpoint_ids.items()}
        self._services: Mapping[str, tuple[str, str]] = service_names or {}  # frontend -> (namespace, name)
        self._peers: dict[tuple[str, int, int | None], Peer] = {}  # named sides, see peer

    def changed(self, endpoints: Mapping[str, tuple[tuple[str, ...], int] | None], labels: Mapping[int, LabelSet],
                ipcache: Iterable[tuple[IPNetwork, int]], endpoint_ids: Mapping[str, int | None],
                map_states: Mapping[str, MapState | None] | None = None,
                service_names: Mapping[str, tuple[str, str]] | None = None) -> Who:
        """A new snapshot: this one with ``endpoints`` replaced (None: gone) and their ids
        (``endpoint_ids``, by name) and map states set, and the revision's labels and ipcache. This
        one is kept as it is (flows being named read it without a lock)."""
        new = Who.__new__(Who)
        new._endpoints = dict(self._endpoints)
        new._map_states = dict(self._map_states)
        for name, ms in (map_states or {}).items():
            if ms is None:
                new._map_states.pop(name, None)
            else:
                new._map_states[name] = ms
        new._by_address = dict(self._by_address)
        new._endpoints_of_identity = dict(self._endpoints_of_identity)
        for name, now in endpoints.items():
            before = new._endpoints.pop(name, None)
            if before is not None:
                for ip in before[0]:
                    if new._by_address.get(ip, ("", 0))[0] == name:
                        del new._by_address[ip]
                left = tuple(n for n in new._endpoints_of_identity.get(before[1], ()) if n != name)
                if left:
                    new._endpoints_of_identity[before[1]] = left
                else:
                    new._endpoints_of_identity.pop(before[1], None)
            if now is not None:
                new._endpoints[name] = now
                new._by_address.update((ip, (name, now[1])) for ip in now[0])
                new._endpoints_of_identity[now[1]] = (*new._endpoints_of_identity.get(now[1], ()), name)
        new._label_sets = labels
        new._label_lists = self._label_lists
        new._ipcache_items = ipcache
        new._ipcache = None
        new.endpoint_ids = dict(self.endpoint_ids)
        new._id_of_endpoint = dict(self._id_of_endpoint)
        new._services = self._services if service_names is None else service_names
        new._peers = {}
        for name, endpoint_id in endpoint_ids.items():
            old = new._id_of_endpoint.pop(name, None)
            if old is not None and new.endpoint_ids.get(old) == name:
                del new.endpoint_ids[old]
            if endpoint_id is not None:
                new.endpoint_ids[endpoint_id] = name
                new._id_of_endpoint[name] = endpoint_id
        return new

    @classmethod
    def empty(cls) -> Who:
        return cls({}, {}, ())

    def labels(self, identity: int | None) -> tuple[str, ...]:
        if identity is None or (labels := self._label_sets.get(identity)) is None:
            return ()
        done = self._label_lists.get(identity)
        if done is None or done[0] is not labels:
            if len(self._label_lists) >= 1 << 16:
                self._label_lists.clear()
            done = self._label_lists[identity] = (labels, tuple(labels.to_list()))
        return done[1]

    def endpoint_identity(self, name: str) -> int | None:
        ep = self._endpoints.get(name)
        return ep[1] if ep is not None else None

    def endpoint_with_identity(self, identity: int) -> str:
        names = self._endpoints_of_identity.get(identity)
        return min(names) if names else ""  # by name: the same whatever order they came in

    def _lookup(self, address: str) -> int | None:
        ipcache = self._ipcache
        if ipcache is None:  # the first flow of this revision naming an address no endpoint has
            ipcache = IPCache()
            for prefix, ident in self._ipcache_items:
                ipcache.upsert(prefix, ident)
            self._ipcache = ipcache
        try:
            return ipcache.lookup(address)[1]
        except (KeyError, ValueError):
            return None

    def peer(self, address: str, port: int = 0, identity: int | None = None) -> Peer:
        """A side by its address (its identity from the ipcache unless given). Kept per snapshot:
        busy flows (a DNS client's queries) name the same sides over and over."""
        key = (address, port, identity)
        found = self._peers.get(key)
        if found is not None:
            return found
        name, ident = self._by_address.get(address, ("", None))
        if identity is None:
            identity = ident
        if identity is None and address:
            identity = self._lookup(address)
        if len(self._peers) >= PEERS_MAX:
            self._peers.clear()
        found = self._peers[key] = Peer(address, port, identity, self.labels(identity), name)
        return found

    def match_type(self, endpoint: str, direction: str, identity: int | None, protocol: str, port: int) -> int:
        """Hubble's policy_match_type of the entry of ``endpoint``'s policy deciding a connection
        with ``identity`` (0: none decided, or an endpoint or peer not known)."""
        ms = self._map_states.get(endpoint)
        if ms is None or identity is None or direction not in ("ingress", "egress"):
            return 0
        return policy_match_type(ms.ingress if direction == "ingress" else ms.egress, identity, protocol, port)

    def endpoint_names(self) -> Iterable[str]:
        return self._endpoints.keys()

    def service(self, frontend: str) -> tuple[str, str]:
        """(namespace, name) of the service at ``frontend`` ("address:port"); ("", "") if none."""
        found = self._services.get(frontend)
        if found is None:
            found = self._services.get("0.0.0.0:" + frontend.rpartition(":")[2], ("", ""))
        return found

    def endpoint_peer(self, name: str, port: int = 0) -> Peer:
        ips, ident = self._endpoints.get(name, ((), None))
        return Peer(ips[0] if ips else "", port, ident, self.labels(ident), name)


def names_of_services(services: Iterable[Service]) -> dict[str, tuple[str, str]]:
    """Frontend "address:port" -> (namespace, name) of the named services (a NodePort on every
    node address is "0.0.0.0:port")."""
    return {f"{s.frontend.address}:{s.frontend.port}": (s.namespace or "default", s.name) for s in services if s.name}


# --- conversions -------------------------------------------------------------------------------

def from_access(r: AccessRecord, who: Who) -> Flow:
    """An Envoy access-log record: an HTTP request, or a connection the network RBAC refused
    (or, in audit mode, would have refused)."""
    source = who.peer(r.source_address, r.source_port)
    destination = who.peer(r.destination_address, r.destination_port)
    if r.kind == "http":
        l7: dict[str, Any] = {"method": r.method, "path": r.path, "host": r.authority, "protocol": r.protocol,
                              "status": r.status}
        if r.denied or r.audit:
            verdict, reason = (Verdict.DROPPED if r.denied else Verdict.AUDIT), "Policy denied (L7)"
        else:
            verdict, reason = Verdict.FORWARDED, ""
    else:
        l7 = {}
        verdict = Verdict.DROPPED if r.denied else Verdict.AUDIT if r.audit else Verdict.FORWARDED
        reason = "Policy denied" if r.denied or r.audit else ""
    ingress = "egress" not in r.log_name
    endpoint = (destination if ingress else source).endpoint
    match = 0 if r.kind == "http" else who.match_type(endpoint, "ingress" if ingress else "egress",
                                                      (source if ingress else destination).identity, "TCP",
                                                      destination.port)
    return Flow(r.time.timestamp(), verdict, r.kind, source, destination, "TCP", "ingress" if ingress else "egress",
                reason, l7, r.rule, endpoint, r.node_id, r.log_name,
                latency=r.duration, upstream_reply=r.upstream_reply, match_type=match)


_VERDICTS = {"FORWARDED": Verdict.FORWARDED, "DROPPED": Verdict.DROPPED, "REDIRECTED": Verdict.REDIRECTED,
             "AUDIT": Verdict.AUDIT}


def from_datapath(ev: DatapathEvent, who: Who, node: str) -> Flow:
    """A kernel drop or policy-verdict event."""
    source = who.peer(ev.source, ev.source_port, ev.source_identity or None)
    destination = who.peer(ev.destination, ev.destination_port, ev.destination_identity or None)
    verdict = _VERDICTS.get(ev.verdict, Verdict.ERROR)
    reason = ev.reason_text if verdict in (Verdict.DROPPED, Verdict.AUDIT) else ""
    endpoint = who.endpoint_ids.get(ev.endpoint_id, "")
    match = who.match_type(endpoint, ev.direction, (source if ev.direction == "ingress" else destination).identity,
                           ev.protocol, ev.destination_port)
    frontend = ev.service_frontend  # the load balancer's events name the frontend the source addressed
    return Flow(ev.time, verdict, "l3/l4", source, destination, ev.protocol, ev.direction, reason, {}, ev.rule,
                endpoint, node, "", ev.proxy_port, match_type=match,
                service_frontend=frontend, service=who.service(frontend) if frontend else ("", ""))


def _address(text: str) -> tuple[str, int]:
    """Envoy's ``%DOWNSTREAM_*_ADDRESS%``: ``ip:port`` or ``[ipv6]:port`` ("" and 0 if absent)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return "", 0
    return host.strip("[]"), int(port)


def from_l7(time: float, info: ConnectionInfo, record: Record, who: Who, node: str) -> Flow:
    """A request an L7 parser decided (or the bytes it could not parse: ERROR; a protocol step
    the parser answered without asking policy: TRACED). The connection's addresses are Envoy's
    (the stream's metadata); the peer is named by its identity, the local side by endpoint."""
    client, server = _address(info.source), _address(info.destination)
    peer_name = who.endpoint_with_identity(info.peer_identity)
    if info.direction == "ingress":
        peer = Peer(*client, info.peer_identity, who.labels(info.peer_identity), peer_name)
        local = who.endpoint_peer(info.endpoint, server[1] or info.port)
        source, destination = peer, replace(local, address=server[0] or local.address)
    else:
        peer = Peer(server[0], server[1] or info.port, info.peer_identity, who.labels(info.peer_identity), peer_name)
        local = who.endpoint_peer(info.endpoint, client[1])
        source, destination = replace(local, address=client[0] or local.address), peer
    d = record.decision
    if record.handshake:
        verdict, reason = Verdict.TRACED, ""
    elif "error" in record.summary:
        verdict, reason = Verdict.ERROR, d.reason
    elif d.audit:
        verdict, reason = Verdict.AUDIT, d.reason
    elif d.allowed:
        verdict, reason = Verdict.FORWARDED, ""
    else:
        verdict, reason = Verdict.DROPPED, d.reason
    l7 = {**record.summary, "negotiation": d.reason} if record.handshake else dict(record.summary)
    return Flow(time, verdict, info.protocol, source, destination, "TCP", info.direction, reason,
                l7, d.rule, info.endpoint, node, info.listener)


def from_dns(r: DNSRecord, who: Who, node: str) -> Flow:
    """A query the DNS proxy handled: forwarded (answered by the server), refused (DROPPED: the
    client got REFUSED), AUDIT, or ERROR (malformed and dropped, or SERVFAIL)."""
    source = who.peer(*r.source)
    if r.endpoint and source.endpoint != r.endpoint:  # (the same name nearly always: no copy then)
        source = replace(source, endpoint=r.endpoint)
    destination = who.peer(r.server[0], r.server[1], r.peer_identity or None)
    verdict = {"forwarded": Verdict.FORWARDED, "denied": Verdict.DROPPED, "audit": Verdict.AUDIT}.get(
        r.verdict, Verdict.ERROR)
    l7: dict[str, Any] = {"query": r.query, "qtype": r.qtype, "rcode": r.rcode}
    if r.ips:
        l7["ips"] = list(r.ips)
        l7["ttl"] = r.ttl
    if r.cnames:
        l7["cnames"] = list(r.cnames)
    return Flow(r.time, verdict, "dns", source, destination, r.protocol, "egress",
                r.reason if verdict is not Verdict.FORWARDED else "", l7, r.rule, r.endpoint, node, "dns-proxy",
                latency=r.latency, upstream_reply=r.upstream)


# --- filtering -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlowFilter:
    """What ``cilia observe`` asks for, named as ``hubble observe`` names it. Every given
    criterion must hold; the values of one criterion are alternatives (any may match), except
    label selectors, each of which must hold. Pods are ``[namespace/]name`` (a name prefix, as
    Hubble's); "either side" criteria (pods, labels, ips, ports, identities, namespaces) match
    the source or the destination."""

    from_labels: tuple[LabelSelector, ...] = ()
    to_labels: tuple[LabelSelector, ...] = ()
    verdicts: frozenset[str] = frozenset()
    protocols: frozenset[str] = frozenset()  # a kind (http, kafka, l3/l4...) or an L4 protocol (tcp, udp...)
    since: float | None = None  # UNIX times
    until: float | None = None
    labels: tuple[LabelSelector, ...] = ()  # either side
    pods: tuple[str, ...] = ()
    from_pods: tuple[str, ...] = ()
    to_pods: tuple[str, ...] = ()
    namespaces: frozenset[str] = frozenset()
    ips: frozenset[str] = frozenset()
    ports: frozenset[int] = frozenset()
    identities: frozenset[int] = frozenset()
    types: frozenset[str] = frozenset()  # Hubble's event types: l7, drop, policy-verdict
    http_status: tuple[HttpStatus, ...] = ()
    http_methods: frozenset[str] = frozenset()  # upper case
    http_paths: tuple[re.Pattern[str], ...] = ()

    def matches(self, f: Flow) -> bool:
        if self.since is not None and f.time < self.since:
            return False
        if self.until is not None and f.time > self.until:
            return False
        if self.verdicts and f.verdict.value not in self.verdicts:
            return False
        if self.types and f.event_type not in self.types:
            return False
        if self.protocols and f.kind not in self.protocols and f.l4_protocol.lower() not in self.protocols:
            return False
        sides = (f.source, f.destination)
        if self.ips and not any(p.address in self.ips for p in sides):
            return False
        if self.ports and not any(p.port in self.ports for p in sides):
            return False
        if self.identities and not any(p.identity in self.identities for p in sides):
            return False
        if self.namespaces and not any(pod_name(p)[0] in self.namespaces for p in sides):
            return False
        if not (_pod_matches(sides, self.pods) and _pod_matches((f.source,), self.from_pods)
                and _pod_matches((f.destination,), self.to_pods)):
            return False
        if not (_selects(f.source, self.from_labels) and _selects(f.destination, self.to_labels)):
            return False
        if self.labels and not (_selects(f.source, self.labels) or _selects(f.destination, self.labels)):
            return False
        return self._http_matches(f)

    def _http_matches(self, f: Flow) -> bool:
        if not (self.http_status or self.http_methods or self.http_paths):
            return True
        if f.kind != "http":
            return False
        if self.http_status and not any(s.matches(f.l7.get("status")) for s in self.http_status):
            return False
        if self.http_methods and str(f.l7.get("method", "")).upper() not in self.http_methods:
            return False
        path = str(f.l7.get("path", ""))
        return not self.http_paths or any(p.search(path) for p in self.http_paths)


class UnknownPod(LookupError):
    """A flow filter names a pod nothing here has (no endpoint, no recorded flow)."""


def unknown_pods(flow_filter: FlowFilter, who: Who, seen: Iterable[Peer]) -> None:
    """Raise ``UnknownPod`` for the first pod ``flow_filter`` names that matches no endpoint of
    ``who`` and no side in ``seen`` (a pod gone since keeps its recorded flows findable)."""
    wanted = [(option, want) for option, pods in (("--pod", flow_filter.pods), ("--from-pod", flow_filter.from_pods),
                                                  ("--to-pod", flow_filter.to_pods)) for want in pods]
    if not wanted:
        return
    sides = [who.endpoint_peer(name) for name in who.endpoint_names()]
    sides += seen
    for option, want in wanted:
        if not any(_pod_matches((side,), (want,)) for side in sides):
            raise UnknownPod(f"{option} {want}: no such pod (no endpoint and no recorded flow has it; "
                             "see cilia endpoint list)")


def _pod_matches(sides: tuple[Peer, ...], pods: tuple[str, ...]) -> bool:
    if not pods:
        return True
    for peer in sides:
        namespace, pod = pod_name(peer)
        for want in pods:
            ns, sep, name = want.rpartition("/")
            if sep and ns != namespace:
                continue
            if (pod and pod.startswith(name)) or (peer.endpoint and peer.endpoint.startswith(name)):
                return True
    return False


def _selects(peer: Peer, selectors: tuple[LabelSelector, ...]) -> bool:
    if not selectors:
        return True
    labels = LabelSet.parse(list(peer.labels))
    return all(s.matches(labels) for s in selectors)


# --- the rotating JSON-lines file ------------------------------------------------------------------

class FlowFile:
    """Flows appended to ``path`` as JSON lines; past ``max_bytes`` the file is rotated, keeping
    ``backups`` older ones (``path.1`` ...), like logrotate would."""

    def __init__(self, path: Path, max_bytes: int = 100 << 20, backups: int = 5) -> None:
        self.path = path
        self._handler = _PrivateRotatingHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, seq: int, flow: Flow) -> None:
        record = logging.LogRecord("cilia.flows", logging.INFO, "", 0, json.dumps(export_line(flow, seq)), None, None)
        self._handler.handle(record)

    def close(self) -> None:
        self._handler.close()


class _PrivateRotatingHandler(logging.handlers.RotatingFileHandler):
    """Flow files are owner-only whatever the umask (they name every peer and request), and a file
    is on disk before it is renamed into the backups."""

    def _open(self) -> io.TextIOWrapper:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)  # also narrows a file an older agent left wider
        return open(fd, "a", encoding=self.encoding, errors=self.errors)

    def doRollover(self) -> None:  # noqa: N802 (logging's naming)
        if self.stream is not None:
            self.stream.flush()
            os.fsync(self.stream.fileno())
        super().doRollover()

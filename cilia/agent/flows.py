"""One flow record for everything the agent sees decided, like Hubble's ``flow.Flow``.

Three sources feed it: the kernel's drop and verdict events (``kind`` ``l3/l4``), Envoy's access
logs (``http``, and ``tcp`` for connections the network RBAC refused) and the L7 parsers
(``kafka``, ``cassandra``, ``memcache``, a plugin's name). Each becomes a ``Flow`` when it
arrives, with both sides' identity, labels and endpoint read from a ``Who`` snapshot the agent
replaces at every change (so recording never waits for the agent's lock), and the rule that
decided it (policy, path, file:line). Verdicts are Hubble's: FORWARDED, DROPPED, REDIRECTED
(handed to the proxy), AUDIT (would have been dropped; the endpoint or policy is in audit mode)
and ERROR (the proxy could not parse the traffic).

``FlowFilter`` is what ``cilia observe`` filters on; ``FlowFile`` appends flows as JSON lines to
a file that rotates by size.
"""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from pathlib import Path
from typing import Any

from ..bpf.datapath import DatapathEvent
from ..envoy.accesslog import AccessRecord
from ..l7parsers.base import Record
from ..envoy.l7service import ConnectionInfo
from ..policy.ipcache import IPCache
from ..policy.labels import LabelSet
from ..policy.model import IPNetwork


class Verdict(str, Enum):
    FORWARDED = "FORWARDED"
    DROPPED = "DROPPED"
    REDIRECTED = "REDIRECTED"
    AUDIT = "AUDIT"
    ERROR = "ERROR"


@dataclass(frozen=True, slots=True)
class Peer:
    address: str = ""
    port: int = 0
    identity: int | None = None
    labels: tuple[str, ...] = ()
    endpoint: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address, "port": self.port, "identity": self.identity,
                               "labels": list(self.labels)}
        if self.endpoint:
            out["endpoint"] = self.endpoint
        return out


@dataclass(frozen=True, slots=True)
class Flow:
    time: float
    verdict: Verdict
    kind: str  # l3/l4 | tcp | http | kafka | cassandra | memcache | <plugin>
    source: Peer
    destination: Peer
    l4_protocol: str = "TCP"
    direction: str = ""  # whose policy decided: the destination's ingress or the source's egress
    drop_reason: str = ""
    l7: Mapping[str, Any] = field(default_factory=dict)
    rule: str = ""
    endpoint: str = ""  # the endpoint whose policy decided
    node: str = ""
    listener: str = ""
    proxy_port: int = 0

    @property
    def type(self) -> str:
        return "L3_L4" if self.kind in ("l3/l4", "tcp") else "L7"

    def to_json(self, seq: int) -> dict[str, Any]:
        return {"seq": seq, "time": datetime.fromtimestamp(self.time, UTC).isoformat(), "verdict": self.verdict.value,
                "type": self.type, "kind": self.kind, "l4_protocol": self.l4_protocol, "direction": self.direction,
                "drop_reason": self.drop_reason, "source": self.source.to_json(),
                "destination": self.destination.to_json(), "l7": dict(self.l7), "rule": self.rule,
                "endpoint": self.endpoint, "node": self.node, "listener": self.listener, "proxy_port": self.proxy_port}


# --- who is who ------------------------------------------------------------------------------

class Who:
    """A snapshot of endpoints, identities' labels and the ipcache, to name flows' sides."""

    def __init__(self, endpoints: Mapping[str, tuple[tuple[str, ...], int]], labels: Mapping[int, LabelSet],
                 ipcache: Iterable[tuple[IPNetwork, int]], endpoint_ids: Mapping[int, str] | None = None) -> None:
        self._by_address = {ip: (name, ident) for name, (ips, ident) in endpoints.items() for ip in ips}
        self._identity_of_endpoint = {name: ident for name, (_, ident) in endpoints.items()}
        # Reverse lookups, built once: the L7 path names a side per request.
        self._address_of_endpoint: dict[str, str] = {}
        for address, (name, _) in self._by_address.items():
            self._address_of_endpoint.setdefault(name, address)
        self._endpoint_of_identity: dict[int, str] = {}
        for name, ident in self._identity_of_endpoint.items():
            self._endpoint_of_identity.setdefault(ident, name)
        self._labels = {ident: tuple(ls.to_list()) for ident, ls in labels.items()}
        self._ipcache = IPCache()
        for prefix, ident in ipcache:
            self._ipcache.upsert(prefix, ident)
        self.endpoint_ids = dict(endpoint_ids or {})

    @classmethod
    def empty(cls) -> Who:
        return cls({}, {}, ())

    def labels(self, identity: int | None) -> tuple[str, ...]:
        return self._labels.get(identity, ()) if identity is not None else ()

    def endpoint_identity(self, name: str) -> int | None:
        return self._identity_of_endpoint.get(name)

    def endpoint_with_identity(self, identity: int) -> str:
        return self._endpoint_of_identity.get(identity, "")

    def peer(self, address: str, port: int = 0, identity: int | None = None) -> Peer:
        """A side by its address (its identity from the ipcache unless given)."""
        name, ident = self._by_address.get(address, ("", None))
        if identity is None:
            identity = ident
        if identity is None and address:
            try:
                identity = self._ipcache.lookup(address)[1]
            except (KeyError, ValueError):
                identity = None
        return Peer(address, port, identity, self.labels(identity), name)

    def endpoint_peer(self, name: str, port: int = 0) -> Peer:
        ident = self._identity_of_endpoint.get(name)
        address = self._address_of_endpoint.get(name, "")
        return Peer(address, port, ident, self.labels(ident), name)


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
    return Flow(r.time.timestamp(), verdict, r.kind, source, destination, "TCP", "ingress" if ingress else "egress",
                reason, l7, r.rule, (destination if ingress else source).endpoint, r.node_id, r.log_name)


_VERDICTS = {"FORWARDED": Verdict.FORWARDED, "DROPPED": Verdict.DROPPED, "REDIRECTED": Verdict.REDIRECTED,
             "AUDIT": Verdict.AUDIT}


def from_datapath(ev: DatapathEvent, who: Who, node: str) -> Flow:
    """A kernel drop or policy-verdict event."""
    source = who.peer(ev.source, ev.source_port, ev.source_identity or None)
    destination = who.peer(ev.destination, ev.destination_port, ev.destination_identity or None)
    verdict = _VERDICTS.get(ev.verdict, Verdict.ERROR)
    reason = ev.reason_text if verdict in (Verdict.DROPPED, Verdict.AUDIT) else ""
    return Flow(ev.time, verdict, "l3/l4", source, destination, ev.protocol, ev.direction, reason, {}, ev.rule,
                who.endpoint_ids.get(ev.endpoint_id, ""), node, "", ev.proxy_port)


def from_l7(time: float, info: ConnectionInfo, record: Record, who: Who, node: str) -> Flow:
    """A request an L7 parser decided (or the bytes it could not parse: ERROR)."""
    local = who.endpoint_peer(info.endpoint, info.port)
    peer_name = who.endpoint_with_identity(info.peer_identity)
    peer = Peer("", 0, info.peer_identity, who.labels(info.peer_identity), peer_name)
    source, destination = (peer, local) if info.direction == "ingress" else (local, peer)
    d = record.decision
    if "error" in record.summary:
        verdict, reason = Verdict.ERROR, d.reason
    elif d.audit:
        verdict, reason = Verdict.AUDIT, d.reason
    elif d.allowed:
        verdict, reason = Verdict.FORWARDED, ""
    else:
        verdict, reason = Verdict.DROPPED, d.reason
    return Flow(time, verdict, info.protocol, source, destination, "TCP", info.direction, reason,
                dict(record.summary), d.rule, info.endpoint, node, info.listener)


# --- filtering -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FlowFilter:
    """What ``cilia observe`` asks for; every given criterion must hold (labels: all of them)."""

    from_labels: tuple[str, ...] = ()
    to_labels: tuple[str, ...] = ()
    verdicts: frozenset[str] = frozenset()
    protocols: frozenset[str] = frozenset()  # a kind (http, kafka, l3/l4...) or an L4 protocol (tcp, udp...)
    since: float | None = None  # a UNIX time

    def matches(self, f: Flow) -> bool:
        if self.since is not None and f.time < self.since:
            return False
        if self.verdicts and f.verdict.value not in self.verdicts:
            return False
        if self.protocols and f.kind not in self.protocols and f.l4_protocol.lower() not in self.protocols:
            return False
        return _has_labels(f.source, self.from_labels) and _has_labels(f.destination, self.to_labels)


def _has_labels(peer: Peer, wanted: tuple[str, ...]) -> bool:
    if not wanted:
        return True
    have = set(peer.labels) | {label.split(":", 1)[1] for label in peer.labels if ":" in label}
    return all(w in have for w in wanted)


def parse_labels(text: str) -> tuple[str, ...]:
    """``k=v,k2=v2`` (a source prefix like ``k8s:`` is optional) for --from-label/--to-label."""
    return tuple(x.strip() for x in text.split(",") if x.strip())


# --- the rotating JSON-lines file ------------------------------------------------------------------

class FlowFile:
    """Flows appended to ``path`` as JSON lines; past ``max_bytes`` the file is rotated, keeping
    ``backups`` older ones (``path.1`` ...), like logrotate would."""

    def __init__(self, path: Path, max_bytes: int = 100 << 20, backups: int = 5) -> None:
        self.path = path
        self._handler = _PrivateRotatingHandler(path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def write(self, seq: int, flow: Flow) -> None:
        record = logging.LogRecord("cilia.flows", logging.INFO, "", 0, json.dumps(flow.to_json(seq)), None, None)
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

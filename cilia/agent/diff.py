"""Policy impact preview (``cilia policy diff``): which recorded flows a candidate policy would
decide differently, before anything is applied.

Each recorded flow is turned back into the request it was (both sides by their labels, or by
address when outside the cluster; the protocol and port; the HTTP, Kafka or ``l7proto`` request)
and traced (``cilia.policy.trace``, the same evaluation as ``cilia policy trace`` and the data
path) against today's policies and against today's with the candidate files' policies added or
replacing theirs by name. A flow whose verdict would change is reported with both verdicts and
the rule that would decide it. Nothing is applied; the agent's policy is not touched.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..policy import Peer, Policy, Protocol, TraceRequest, trace
from ..policy.identity import LOCAL_CIDR_BASE, MIN_ALLOCATED
from ..policy.flows import GenericL7Request, HTTPRequest, KafkaRequest, L7Request
from ..policy.l7.kafka import parse_api_key
from ..policy.labels import LabelSet
from .flow import Flow, Verdict
from .hubble import export_line

_PROTOCOLS = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP, "ICMP": Protocol.ICMP,
              "ICMPV6": Protocol.ICMPV6}


@dataclass(frozen=True)
class Change:
    seq: int
    flow: Flow
    now: bool  # allowed under today's policies
    candidate: bool  # allowed with the candidate
    rule: str  # what decides it with the candidate
    reason: str


def _side(peer_labels: tuple[str, ...], address: str, identity: int | None, endpoint: str) -> Peer | None:
    if endpoint or (identity is not None and MIN_ALLOCATED <= identity < LOCAL_CIDR_BASE):
        return Peer(labels=LabelSet.parse(list(peer_labels))) if peer_labels else None
    if address:
        try:
            return Peer(address=ipaddress.ip_address(address))
        except ValueError:
            return None
    return None


def requests_of(flow: Flow) -> list[TraceRequest]:
    """The requests a recorded flow was (several for a multi-key memcache request); empty when it
    cannot be replayed (an unparseable stream, a side known by neither labels nor address)."""
    if flow.verdict is Verdict.ERROR:
        return []
    src = _side(flow.source.labels, flow.source.address, flow.source.identity, flow.source.endpoint)
    dst = _side(flow.destination.labels, flow.destination.address, flow.destination.identity,
                flow.destination.endpoint)
    protocol = _PROTOCOLS.get(flow.l4_protocol.upper())
    if src is None or dst is None or protocol is None:
        return []
    port = flow.destination.port
    return [TraceRequest(src, dst, protocol, port, l7) for l7 in _l7_of(flow)]


def _l7_of(flow: Flow) -> list[L7Request | None]:
    l7 = flow.l7
    if flow.kind in ("l3/l4", "tcp"):
        return [None]
    if flow.kind == "http":
        return [HTTPRequest(str(l7.get("method", "")), str(l7.get("path", "")), str(l7.get("host", "")))]
    if flow.kind == "kafka":
        try:
            api_key = parse_api_key(str(l7.get("api_key", "")))
            version = int(str(l7.get("api_version", "0")))
        except ValueError:
            return []
        topics = tuple(t for t in str(l7.get("topic", "")).split(",") if t)
        return [KafkaRequest(api_key, version, str(l7.get("client_id", "")), topics)]
    fields = {str(k): str(v) for k, v in l7.items()}
    actions, tables = fields.get("query_action", "").split(","), fields.get("query_table", "").split(",")
    if flow.kind == "cassandra" and len(actions) > 1 and len(actions) == len(tables):  # a batch: every statement
        return [GenericL7Request.of("cassandra", {"query_action": a, "query_table": t})
                for a, t in zip(actions, tables)]
    if flow.kind == "memcache" and " " in fields.get("key", ""):  # every key of the request must pass
        return [GenericL7Request.of("memcache", {**fields, "key": key}) for key in fields["key"].split()]
    return [GenericL7Request.of(flow.kind, fields)]


def _decide(policies: Sequence[Policy], requests: Sequence[TraceRequest],
            cache: dict[tuple[int, TraceRequest], tuple[bool, str, str]], generation: int) -> tuple[bool, str, str]:
    rules: list[str] = []
    for request in requests:
        key = (generation, request)
        hit = cache.get(key)
        if hit is None:
            result = trace(policies, request)
            deciding = result.to_json()["deciding_rules"]
            named = "; ".join(f"{d['path']} ({d['file']}:{d['line']})" if d.get("file") else str(d["path"])
                              for d in deciding if d.get("matched") is not False)
            reason = result.ingress.reason if not result.ingress.allowed else result.egress.reason
            hit = cache[key] = (result.allowed, named, reason)
        if not hit[0]:
            return hit
        rules.append(hit[1])
    return True, "; ".join(dict.fromkeys(r for r in rules if r)), ""


def policy_diff(current: Sequence[Policy], candidate: Sequence[Policy],
                flows: Sequence[tuple[int, Flow]]) -> dict[str, Any]:
    """Replay ``flows`` against ``current`` and ``current`` with ``candidate`` (by key)."""
    merged = {p.key: p for p in current}
    merged.update({p.key: p for p in candidate})
    after = list(merged.values())
    cache: dict[tuple[int, TraceRequest], tuple[bool, str, str]] = {}
    changes: list[Change] = []
    replayed = 0
    for seq, flow in flows:
        requests = requests_of(flow)
        if not requests:
            continue
        replayed += 1
        now, _, _ = _decide(current, requests, cache, 0)
        then, rule, reason = _decide(after, requests, cache, 1)
        if now != then:
            changes.append(Change(seq, flow, now, then, rule, reason))
    return {"considered": len(flows), "replayed": replayed, "skipped": len(flows) - replayed,
            "changed": [{"flow": export_line(c.flow, c.seq), "now": _word(c.now), "candidate": _word(c.candidate),
                         "rule": c.rule, "reason": c.reason} for c in changes]}


def _word(allowed: bool) -> str:
    return "allowed" if allowed else "denied"

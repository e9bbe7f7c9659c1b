"""Property tests: resolution agrees with a brute-force evaluator.

Random small policies (written as YAML, so the parser runs too) and random flows
are decided three ways that must agree:

* ``oracle.decide``: straight from the parsed rules, no identities or map states;
* ``cilia.policy.trace``: a fresh engine per flow, as ``cilia policy trace`` does;
* one ``PolicyEngine`` holding every endpoint at once, built in a random order of
  endpoint upserts and policy batches, looked up like the datapath does.

Two more properties check the engine against itself: an engine driven through
a random history of changes holds the same map states as one built in one go
from the final state, and every map-state lookup (the most specific entry) gives
what the union of all raw rule entries covering the flow gives.

Examples are derandomized, so a failure reproduces on every run; the failing
policy YAML, flow and build order are printed with the assertion. For a deeper
search, ``CILIA_PROPERTY_SCALE=20`` runs twenty times as many examples.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from dataclasses import replace
from typing import Any

from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from cilia.policy import (
    Direction, Endpoint, LabelSet, Peer, PolicyEngine, TraceRequest, Verdict, parse_text, trace,
)
from cilia.policy.flows import HTTPRequest
from cilia.policy.l7.evaluate import evaluate
from cilia.policy.mapstate import ANY_IDENTITY, MapState, PolicyEntry, RawEntry
from cilia.policy.model import PORT_PROTOCOLS, Policy, Protocol
from cilia.policy.peers import AnyPeer

from tests.policy import strategies as S
from tests.policy.oracle import Flow, Side, decide

BASE = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SCALE = float(os.environ.get("CILIA_PROPERTY_SCALE", "1"))


def examples(n: int) -> int:
    return max(1, int(n * SCALE))


def parse(docs: list[S.Doc]) -> tuple[str, list[Policy]]:
    text = S.document_text(docs)
    result = parse_text(text, "gen.yaml")
    assert result.problems == [], f"generated policy does not parse:\n{text}\n{result.problems}"
    note(f"policies:\n{text}")
    return text, result.policies


# --- the engine's verdict, looked up like the datapath ------------------------------------

End = str | ipaddress.IPv4Address  # endpoint name or outside address


def _identity(engine: PolicyEngine, end: End) -> int:
    if isinstance(end, str):
        return engine.identity_of(end).id
    return engine.ipcache.lookup(end)[1]


def _direction_allows(ms: MapState, direction: Direction, peer: int, flow: Flow) -> bool:
    hit = ms.direction(direction).lookup(peer, flow.protocol, flow.port)
    if hit is None or hit[2].verdict is Verdict.DENY:
        return False
    entry = hit[2]
    if entry.verdict is Verdict.REDIRECT and entry.l7 is not None and flow.http is not None:
        return evaluate(entry.l7, flow.http).allowed
    return True


def engine_allows(engine: PolicyEngine, src: End, dst: End, flow: Flow) -> bool:
    egress = ingress = True
    if isinstance(src, str):
        egress = _direction_allows(engine.endpoint_policy(src).map_state, Direction.EGRESS,
                                   _identity(engine, dst), flow)
    if isinstance(dst, str):
        ingress = _direction_allows(engine.endpoint_policy(dst).map_state, Direction.INGRESS,
                                    _identity(engine, src), flow)
    return egress and ingress


def _peer(side: Side) -> Peer:
    return Peer(labels=side.labels) if side.labels is not None else Peer(address=side.address)


# --- 0. the oracle itself, on cases decided by hand ----------------------------------------

_KNOWN = S.to_yaml({
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "deathstar"},
    "specs": [
        {"endpointSelector": {"matchLabels": {"class": "deathstar"}},
         "ingress": [{"fromEndpoints": [{"matchLabels": {"org": "empire"}}],
                      "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                   "rules": {"http": [{"method": "POST", "path": "/v1/.*"}]}}]}]},
        {"endpointSelector": {"matchLabels": {"class": "deathstar"}},
         "ingress": [{"fromEntities": ["world"]}],
         "ingressDeny": [{"fromCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}]}]},
    ],
}) + "---\n" + S.to_yaml({
    "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
    "metadata": {"name": "quiet", "namespace": "other"},
    "spec": {"endpointSelector": {}, "ingress": [{}]},
})


def _labels(text: str) -> Side:
    return Side(labels=LabelSet.parse(text))


def _addr(text: str) -> Side:
    return Side(address=ipaddress.IPv4Address(text))


KNOWN_CASES = [
    # (source, destination, protocol, port, request, allowed)
    (_labels("org=empire"), _labels("class=deathstar"), Protocol.TCP, 80, None, True),
    (_labels("org=empire"), _labels("class=deathstar"), Protocol.TCP, 80, HTTPRequest("POST", "/v1/land"), True),
    (_labels("org=empire"), _labels("class=deathstar"), Protocol.TCP, 80, HTTPRequest("PUT", "/v1/land"), False),
    (_labels("org=empire"), _labels("class=deathstar"), Protocol.TCP, 443, None, False),
    (_labels("org=empire"), _labels("class=deathstar"), Protocol.UDP, 80, None, False),
    (_labels("org=alliance"), _labels("class=deathstar"), Protocol.TCP, 80, None, False),
    (_labels("org=empire,io.kubernetes.pod.namespace=other"), _labels("class=deathstar"),
     Protocol.TCP, 80, None, False),
    (_addr("8.8.8.8"), _labels("class=deathstar"), Protocol.TCP, 22, None, True),
    (_addr("10.1.2.3"), _labels("class=deathstar"), Protocol.TCP, 22, None, True),
    (_addr("10.200.0.1"), _labels("class=deathstar"), Protocol.TCP, 22, None, False),
    (_labels("org=empire"), _labels("class=other"), Protocol.TCP, 22, None, True),
    (_labels("org=empire"), _labels("class=other,io.kubernetes.pod.namespace=other"), Protocol.TCP, 22, None, False),
    (_labels("org=empire,io.kubernetes.pod.namespace=other"), _addr("8.8.8.8"), Protocol.ICMP, 8, None, True),
]


def test_the_oracle_and_trace_decide_hand_checked_cases() -> None:
    policies = parse_text(_KNOWN, "known.yaml").policies
    assert [p.name for p in policies] == ["deathstar", "quiet"]
    for src, dst, protocol, port, request, allowed in KNOWN_CASES:
        flow = Flow(src, dst, protocol, port, request)
        assert decide(policies, flow).allowed == allowed, f"oracle: {flow}"
        traced = trace(policies, TraceRequest(_peer(src), _peer(dst), protocol, port, request))
        assert traced.allowed == allowed, f"trace: {flow}\n{traced.render()}"


# --- 1. trace and an engine holding every endpoint agree with the oracle ----------------------


def _build_engine(draw: Any, policies: list[Policy], endpoints: Sequence[tuple[str, Any]]) -> PolicyEngine:
    """Upsert endpoints and apply policies in a random interleaving and batching,
    some of it inside ``engine.batch()``."""
    order = draw(st.permutations(policies))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(order) - 1)), max_size=2)))
    batches = [list(order[a:b]) for a, b in zip([0, *cuts], [*cuts, len(order)]) if order[a:b]]
    ops: list[tuple[str, Any]] = [("ep", ep) for ep in endpoints] + [("apply", b) for b in batches]
    ops = list(draw(st.permutations(ops)))
    bulk = draw(st.integers(0, len(ops)))  # the first `bulk` ops run inside engine.batch()
    note(f"build order: {[(op, [p.name for p in x] if op == 'apply' else x[0]) for op, x in ops]}, "
         f"batched: {bulk}")
    engine = PolicyEngine()
    with engine.batch() if bulk else nullcontext():
        for op, arg in ops[:bulk]:
            _run(engine, op, arg)
    for op, arg in ops[bulk:]:
        _run(engine, op, arg)
    return engine


def _run(engine: PolicyEngine, op: str, arg: Any) -> None:
    if op == "ep":
        engine.upsert_endpoint(Endpoint(arg[0], arg[1]))
    else:
        engine.apply(arg)


@settings(BASE, max_examples=examples(300))
@given(docs=S.policy_sets(1, 3), cluster=S.clusters, extra=st.lists(S.endpoint_labels, max_size=3),
       data=st.data())
def test_trace_and_engine_agree_with_brute_force(
        docs: list[S.Doc], cluster: S.Cluster, extra: list[Any], data: st.DataObject) -> None:
    text, policies = parse(docs)
    endpoints = [(f"e{i}", labels) for i, labels in enumerate((*cluster.endpoints, *extra))]
    engine = _build_engine(data.draw, policies, endpoints)
    for i, (src, dst, *_) in enumerate(cluster.flows):
        flow = cluster.flow(i)
        expected = decide(policies, flow)
        traced = trace(policies, TraceRequest(_peer(flow.src), _peer(flow.dst), flow.protocol,
                                              flow.port, flow.http))
        assert traced.allowed == expected.allowed, (
            f"\n{text}\nflow: {flow}\noracle: {expected}\ntrace:\n{traced.render()}")
        if flow.protocol is Protocol.TCP and i % 3 == 0:
            # protocol ANY: allowed only if TCP, UDP and SCTP all are
            each = all(decide(policies, replace(flow, protocol=p)).allowed for p in PORT_PROTOCOLS)
            traced = trace(policies, TraceRequest(_peer(flow.src), _peer(flow.dst), Protocol.ANY,
                                                  flow.port, flow.http))
            assert traced.allowed == each, f"\n{text}\nflow: {flow} over ANY\ntrace:\n{traced.render()}"
        src_end = f"e{src}" if isinstance(src, int) else src
        dst_end = f"e{dst}" if isinstance(dst, int) else dst
        got = engine_allows(engine, src_end, dst_end, flow)
        assert got == expected.allowed, f"\n{text}\nflow: {flow}\noracle: {expected}\nengine: {got}"


# --- 3. incremental changes end where a fresh build does -------------------------------------

NAMES = ("p0", "p1", "p2")
EP_NAMES = ("e0", "e1", "e2", "e3")
EP_IPS = (None, "172.16.0.1", "172.16.0.2")

_NAME_SETS = [(n,) for n in NAMES] + [(a, b) for a in NAMES for b in NAMES if a < b]
_apply = st.tuples(st.just("apply"), st.one_of(
    *(st.tuples(*(S.policy_docs(n) for n in names)) for names in _NAME_SETS)))
_delete = st.tuples(st.just("delete"), st.integers(0, 5))
_upsert = st.tuples(st.just("upsert"), st.sampled_from(EP_NAMES), S.endpoint_labels, st.sampled_from(EP_IPS))
_remove = st.tuples(st.just("remove"), st.integers(0, 5))
_op_kinds = st.sampled_from((_apply, _apply, _upsert, _upsert, _upsert, _delete, _remove))


@st.composite
def _one_op(draw: st.DrawFn) -> Any:
    """A random change; upserts and applies are the most frequent."""
    return draw(draw(_op_kinds))


_ops = _one_op()


def _origin(o: Any) -> str:
    return f"{o.policy} {o.path} {o.source}"


def canonical(engine: PolicyEngine, ms: MapState) -> dict[Direction, tuple[bool, frozenset[tuple[Any, ...]]]]:
    """A map state with identities written as their labels (numbers differ between engines)."""
    def who(ident: int) -> str:
        if ident == ANY_IDENTITY:
            return "any"
        found = engine.allocator.get(ident)
        return str(found.labels) if found is not None else f"<released identity {ident}>"

    out = {}
    for direction in Direction:
        dms = ms.direction(direction)
        entries = set()
        for ident, key, entry in dms.entries():
            l7 = entry.l7
            entries.add((
                who(ident), str(key), entry.verdict.value,
                l7.protocol if l7 else None, l7.allow_all if l7 else None,
                tuple(sorted(f"{r.source} {_origin(o)}" for r, o in l7.rules)) if l7 else (),
                tuple(sorted(_origin(o) for o in entry.origins)),
            ))
        out[direction] = (dms.enforced, frozenset(entries))
    return out


@settings(BASE, max_examples=examples(200))
@given(ops=st.lists(st.tuples(_ops, st.booleans(), st.booleans()), min_size=1, max_size=12), data=st.data())
def test_incremental_changes_match_a_fresh_build(ops: list[Any], data: st.DataObject) -> None:
    """Each op is (change, batched, read): consecutive batched changes run in one
    ``engine.batch()``; ``read`` reads every endpoint's policy after the change
    (as an agent would), so later changes patch built map states instead of
    building them lazily. Map states read along the way must not change later:
    consumers hold and diff them."""
    engine = PolicyEngine()
    policies: dict[tuple[str, str, str], Policy] = {}
    endpoints: dict[str, Endpoint] = {}
    held: list[tuple[str, int, MapState, Any]] = []
    i = 0
    while i < len(ops):
        batched = ops[i][1]
        j = i
        while j < len(ops) and ops[j][1] == batched:
            j += 1
        with engine.batch() if batched else nullcontext():
            for k in range(i, j):
                (op, _, read) = ops[k]
                _change(engine, policies, endpoints, k, op)
                if read:
                    for name in endpoints:
                        ms = engine.endpoint_policy(name).map_state
                        held.append((name, k, ms, _frozen(ms)))
        i = j
    for name, k, ms, before in held:
        assert _frozen(ms) == before, f"the map state of {name} read after op {k} changed later"
    fresh = PolicyEngine()
    fresh.apply(list(policies.values()))
    for ep in data.draw(st.permutations(list(endpoints.values()))):
        fresh.upsert_endpoint(ep)
    assert sorted(e.name for e in engine.endpoints()) == sorted(endpoints)
    for name in endpoints:
        got = canonical(engine, engine.endpoint_policy(name).map_state)
        want = canonical(fresh, fresh.endpoint_policy(name).map_state)
        for direction in Direction:
            extra = sorted(got[direction][1] - want[direction][1])
            missing = sorted(want[direction][1] - got[direction][1])
            assert got[direction] == want[direction], (
                f"{name} {direction}: enforced {got[direction][0]} vs {want[direction][0]}\n"
                f"only incremental: {extra}\nonly fresh: {missing}")
    for address in S.ADDRESSES:
        got_id = engine.allocator.get(engine.ipcache.lookup(address)[1])
        want_id = fresh.allocator.get(fresh.ipcache.lookup(address)[1])
        assert got_id is not None and want_id is not None
        assert got_id.labels == want_id.labels, address
    # and the result still agrees with the brute-force evaluator
    names = sorted(endpoints)
    ends: list[End] = [*names, *(ipaddress.IPv4Address(a) for a in S.ADDRESSES)]
    for _ in range(4 if names else 0):
        src = data.draw(st.sampled_from(ends))
        dst = data.draw(st.sampled_from(names)) if not isinstance(src, str) else data.draw(st.sampled_from(ends))
        protocol, port, request = data.draw(S.flow_l4)
        flow = Flow(_side(endpoints, src), _side(endpoints, dst), protocol, port, request)
        expected = decide(list(policies.values()), flow)
        assert engine_allows(engine, src, dst, flow) == expected.allowed, f"flow {flow}: oracle {expected}"


def _frozen(ms: MapState) -> Any:
    return tuple((d.enforced, frozenset(d.entries())) for d in (ms.ingress, ms.egress))


def _change(engine: PolicyEngine, policies: dict[tuple[str, str, str], Policy],
            endpoints: dict[str, Endpoint], i: int, op: Any) -> None:
    """Apply one random change to ``engine`` and to the model of its final state."""
    if op[0] == "apply":
        _, parsed = parse(list(op[1]))
        note(f"op {i}: apply {[p.key for p in parsed]}")
        engine.apply(parsed)
        policies.update((p.key, p) for p in parsed)
    elif op[0] == "delete" and policies:
        key = sorted(policies)[op[1] % len(policies)]
        note(f"op {i}: delete {key}")
        engine.delete([key])
        del policies[key]
    elif op[0] == "upsert":
        ips = (ipaddress.ip_address(op[3]),) if op[3] else ()
        ep = Endpoint(op[1], op[2], ips)
        note(f"op {i}: upsert {ep}")
        engine.upsert_endpoint(ep)
        endpoints[ep.name] = ep
    elif op[0] == "remove" and endpoints:
        name = sorted(endpoints)[op[1] % len(endpoints)]
        note(f"op {i}: remove {name}")
        engine.remove_endpoint(name)
        del endpoints[name]


def _side(endpoints: dict[str, Endpoint], end: End) -> Side:
    return Side(labels=endpoints[end].labels) if isinstance(end, str) else Side(address=end)


# --- 4. the most specific entry equals the union of every covering rule ----------------------

LOOKUP_PORTS = (0, 1, 22, 79, 80, 85, 90, 91, 443, 999, 1000, 1001, 8080, 65535)
LOOKUP_L4 = ([(p, n) for p in (Protocol.TCP, Protocol.UDP, Protocol.SCTP) for n in LOOKUP_PORTS]
             + [(Protocol.ICMP, t) for t in (0, 8, 128)] + [(Protocol.ICMPV6, 128)])
UNKNOWN_IDENTITY = 424242


def union(raws: Iterable[RawEntry]) -> tuple[str, str | None, bool | None, frozenset[Any], frozenset[Any]] | None:
    """Deny if any covering entry denies; else allowed if any allows, with the L7
    rules of all of them (allow-all if one has no L7 rules or an empty list)."""
    raws = list(raws)
    if not raws:
        return None
    denies = [r for r in raws if r.deny]
    if denies:
        return ("deny", None, None, frozenset(), frozenset(_origin(r.origin) for r in denies))
    origins = frozenset(_origin(r.origin) for r in raws)
    l7 = [r for r in raws if r.l7 is not None]
    if not l7:
        return ("allow", None, None, frozenset(), origins)
    protocols = {r.l7.protocol for r in l7 if r.l7 is not None}
    assert len(protocols) == 1
    allow_all = len(l7) < len(raws) or any(r.l7 is not None and not r.l7.rules for r in l7)
    rules = frozenset() if allow_all else frozenset(
        (rule, _origin(r.origin)) for r in l7 if r.l7 is not None for rule in r.l7.rules)
    return ("redirect", protocols.pop(), allow_all, rules, origins)


def as_union(entry: PolicyEntry) -> tuple[str, str | None, bool | None, frozenset[Any], frozenset[Any]]:
    l7 = entry.l7
    return (entry.verdict.value, l7.protocol if l7 else None, l7.allow_all if l7 else None,
            frozenset((r, _origin(o)) for r, o in l7.rules) if l7 else frozenset(),
            frozenset(_origin(o) for o in entry.origins))


@settings(BASE, max_examples=examples(100))
@given(docs=S.policy_sets(), cluster=S.clusters, data=st.data())
def test_lookup_equals_union_of_raw_entries(docs: list[S.Doc], cluster: S.Cluster, data: st.DataObject) -> None:
    _, policies = parse(docs)
    engine = _build_engine(data.draw, policies, [(f"e{i}", labels) for i, labels in enumerate(cluster.endpoints)])
    identities = engine.identities()
    for i in range(len(cluster.endpoints)):
        ep = engine.endpoint_policy(f"e{i}")
        for direction in Direction:
            dp = ep.selector_policy.direction(direction)
            dms = ep.map_state.direction(direction)
            for ident in [*identities, None]:
                entries = [e for e in dp.entries
                           if isinstance(e.peer, AnyPeer) or (ident is not None and e.peer.selects(ident))]
                ident_id = ident.id if ident is not None else UNKNOWN_IDENTITY
                for protocol, port in LOOKUP_L4:
                    want = union(e.raw for e in entries if e.raw.l4.matches(protocol, port))
                    hit = dms.lookup(ident_id, protocol, port)
                    got = as_union(hit[2]) if hit is not None else None
                    assert got == want, (
                        f"e{i} {direction} identity {ident} {port}/{protocol.label}: "
                        f"lookup {hit} vs union {want}")

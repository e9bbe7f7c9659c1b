"""toFQDNs learned and expired answer by answer: the engine's map state equals a from-scratch
engine given the same names, each snapshot's delta (``base``, ``moved``, ``distinct``) says
exactly how it differs from the snapshot before it, and the ipcache's change log replays to its
items (what the BPF sync patches by)."""

from __future__ import annotations

import random

import pytest

from cilia.policy import PolicyEngine
from cilia.policy.mapstate import DirectionMapState, MapState
from tests.policy.test_engine_fqdn import engine_with

POLICY = """
endpointSelector: {matchLabels: {app: client}}
egress:
- toFQDNs: [{matchPattern: "*.a.test"}]
  toPorts: [{ports: [{port: "443", protocol: TCP}]}]
- toFQDNs: [{matchName: x.a.test}, {matchName: y.b.test}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
- toFQDNs: [{matchPattern: "*.b.test"}]
"""
NAMES = ["x.a.test", "y.a.test", "z.a.test", "y.b.test", "w.b.test", "other.test"]
ADDRESSES = [f"192.0.2.{i}" for i in range(1, 9)]  # few, so names share them


def by_labels(engine: PolicyEngine, direction: DirectionMapState) -> dict[str, object]:
    """Groups keyed by the peer identity's labels (two engines number CIDR identities differently)."""
    labels = engine.identity_labels()
    return {str(labels[ident]): dict(group) for ident, group in direction.groups.items()}


def check_delta(before: DirectionMapState, after: DirectionMapState) -> bool:
    """True if ``after`` is a delta on ``before`` (and then the delta is exact)."""
    assert after.distinct is not None
    assert {id(g) for g in after.distinct} == {id(g) for g in after.groups.values()}
    if after.base != before.serial or after.base == 0:
        return False
    patched = dict(before.groups)
    for ident in after.moved:
        patched.pop(ident, None)
        if ident in after.groups:
            patched[ident] = after.groups[ident]
    assert patched.keys() == after.groups.keys()
    assert all(patched[i] is after.groups[i] for i in patched)
    assert all(before.groups.get(i) is not after.groups.get(i) for i in after.moved)
    return True


@pytest.mark.parametrize("seed", range(4))
def test_incremental_learning_equals_from_scratch(seed: int) -> None:
    rnd = random.Random(seed)
    engine = engine_with(POLICY)
    learned: dict[str, list[str]] = {}
    last: MapState = engine.endpoint_policy("client").map_state
    deltas = 0
    engine.ipcache.take_changes()
    held = dict(engine.ipcache.items())  # what a consumer of the ipcache's changes holds
    for _ in range(60):
        name = rnd.choice(NAMES)
        ips = [] if rnd.random() < 0.3 else rnd.sample(ADDRESSES, rnd.randint(1, 3))
        learned[name] = ips
        engine.update_fqdn({name: ips})
        now = engine.endpoint_policy("client").map_state
        if now is not last:
            deltas += check_delta(last.egress, now.egress)
            check_delta(last.ingress, now.ingress)
        last = now
        changes = engine.ipcache.take_changes()
        assert changes is not None and changes.version == engine.ipcache.version
        for prefix, identity in changes.changes:
            if identity is None:
                del held[prefix]
            else:
                held[prefix] = identity
        assert held == dict(engine.ipcache.items())
        scratch = engine_with(POLICY)
        scratch.update_fqdn({n: a for n, a in learned.items() if a})
        fresh = scratch.endpoint_policy("client").map_state
        assert by_labels(engine, now.egress) == by_labels(scratch, fresh.egress)
        assert dict(now.egress.any_group) == dict(fresh.egress.any_group)
    assert deltas > 10  # most answers are deltas on the previous snapshot

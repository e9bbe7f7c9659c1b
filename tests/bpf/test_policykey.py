"""The policy-map encoding: two LPM lookups over the written entries give what the map state
(and so `cilia policy trace`) gives, for random policies. Pure Python: no kernel needed; the
kernel's own answers are compared with trace in test_datapath_differential.py."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cilia.bpf.policykey import PolicyKey, direction_entries, lpm_lookup, port_blocks
from cilia.policy import Endpoint, PolicyEngine, parse_text
from cilia.policy.mapstate import L4Key, PolicyEntry, Verdict
from cilia.policy.model import Direction, Protocol

from tests.policy import strategies

PORTS = (0, 1, 21, 22, 79, 80, 81, 85, 443, 999, 8080, 32767, 32768, 65535)
PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP, Protocol.ICMP, Protocol.ICMPV6, 47)


def test_port_blocks_cover_exactly() -> None:
    for lo, hi in ((0, 65535), (80, 80), (80, 90), (1, 65534), (1024, 2047), (9000, 9002), (0, 0)):
        covered: list[int] = []
        for base, bits in port_blocks(lo, hi):
            size = 1 << (16 - bits)
            assert base % size == 0  # aligned
            covered += range(base, base + size)
        assert covered == list(range(lo, hi + 1))
    assert list(port_blocks(0, 65535)) == [(0, 0)]
    assert str(PolicyKey(5, False, 6, 80, 16)) == "80/TCP"
    assert PolicyKey.unpack(PolicyKey(5, True, 17, 1024, 6).pack()) == PolicyKey(5, True, 17, 1024, 6)


def _proxy(direction: Direction, l4: L4Key, _e: PolicyEntry) -> int:
    return 10000 + l4.port_lo + (1 if direction is Direction.EGRESS else 0)


def _rule_id(entry: PolicyEntry) -> int:
    return hash(entry.origins) & 0xFFFFFFFF


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(docs=strategies.policy_sets(), labels=st.lists(strategies.endpoint_labels, min_size=2, max_size=4))
def test_two_lpm_lookups_equal_the_map_state(docs: list[dict[str, object]], labels: list[object]) -> None:
    loaded = parse_text(strategies.document_text(docs), "random.yaml")
    if not loaded.ok:
        return
    engine = PolicyEngine()
    for i, ls in enumerate(labels):
        engine.upsert_endpoint(Endpoint(f"ep{i}", ls, (ipaddress.ip_address(f"10.1.2.{10 + i}"),)))  # type: ignore[arg-type]
    engine.apply(loaded.policies)
    identities = sorted({i.id for i in engine.identities()} | {1, 2, 9, 999999})
    for i in range(len(labels)):
        state = engine.endpoint_policy(f"ep{i}").map_state
        for direction in (state.ingress, state.egress):
            entries = direction_entries(direction, _proxy, _rule_id)
            egress = direction.direction is Direction.EGRESS
            for ident in identities:
                for proto in PROTOCOLS:
                    for port in PORTS:
                        want = direction.lookup(ident, Protocol(proto) if proto in Protocol._value2member_map_
                                                else proto, port)  # type: ignore[arg-type]
                        got = lpm_lookup(entries, ident, egress, int(proto), port)
                        if want is None:
                            assert got is None, (ident, proto, port, got)
                            continue
                        assert got is not None, (ident, proto, port, want)
                        value, l4 = got
                        entry = want[2]
                        assert l4 == want[1], (ident, proto, port)
                        assert value.deny == (entry.verdict is Verdict.DENY)
                        if entry.verdict is Verdict.REDIRECT:
                            assert value.proxy_port == _proxy(direction.direction, want[1], entry)
                        else:
                            assert value.proxy_port == 0
                        assert value.rule_id == _rule_id(entry)

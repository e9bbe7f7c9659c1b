"""``IPCache.items()`` stays in address order whatever the mix of changes between two calls: a few
applied to the kept order by bisect, many (a bulk load) by one sort; both must give what a full
sort of the entries gives. ``by_identity`` likewise equals inverting every entry anew."""

from __future__ import annotations

import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from cilia.envoy.translate import prefixes_by_identity
from cilia.policy.ipcache import IPCache

NETS = [ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/{24 + i % 9}", strict=False) for i in range(300)] + \
    [ipaddress.ip_network(f"fd00::{i:x}/128") for i in range(40)] + [ipaddress.ip_network("10.0.0.0/8")]

ops = st.lists(st.tuples(st.sampled_from(NETS), st.one_of(st.none(), st.integers(256, 300))), max_size=400)


def reference(entries: dict[object, int]) -> list[tuple[object, int]]:
    return sorted(entries.items(), key=lambda kv: (kv[0].version, int(kv[0].network_address),  # type: ignore[attr-defined]
                                                   kv[0].prefixlen))  # type: ignore[attr-defined]


@settings(max_examples=60, deadline=None)
@given(st.lists(ops, min_size=1, max_size=6))
def test_items_match_a_full_sort_after_every_round_of_changes(rounds: list[list[tuple[object, int | None]]]) -> None:
    cache = IPCache()
    cache.set_world_defaults()
    model = dict(cache.items())
    for changes in rounds:
        for net, identity in changes:
            if identity is None:
                cache.delete(net)  # type: ignore[arg-type]
                if net in model and str(net) not in ("0.0.0.0/0", "::/0"):
                    del model[net]
            else:
                cache.upsert(net, identity)  # type: ignore[arg-type]
                model[net] = identity
        assert cache.items() == reference(model)


@settings(max_examples=60, deadline=None)
@given(st.lists(ops, min_size=1, max_size=6))
def test_prefixes_by_identity_match_a_full_inversion(rounds: list[list[tuple[object, int | None]]]) -> None:
    """``by_identity`` (kept as entries come and go, for the proxy sink) equals inverting every entry
    anew, and an identity whose prefixes did not change keeps its tuple object."""
    cache = IPCache()
    cache.set_world_defaults()
    for changes in rounds:
        before = cache.by_identity()
        for net, identity in changes:
            if identity is None:
                cache.delete(net)  # type: ignore[arg-type]
            else:
                cache.upsert(net, identity)  # type: ignore[arg-type]
        after = cache.by_identity()
        assert after == prefixes_by_identity(cache.items())
        assert all(after[i] is ps for i, ps in before.items() if i in after and after[i] == ps)

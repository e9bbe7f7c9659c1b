"""After answer-by-answer learning and expiry, the policy trie (``Datapath.sync_policy`` patching
only the identities each map-state snapshot moved) holds exactly what a from-scratch write of the
same map state holds, and the ipcache trie (``Datapath.patch_ipcache`` applying the ipcache's
change log) exactly the engine's ipcache, both read back from the kernel."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from tests.bpf.bpf_support import bpf_node
from tests.policy.test_engine_fqdn_incremental import ADDRESSES, NAMES, POLICY

from cilia.bpf import maps
from cilia.bpf.datapath import no_proxy
from cilia.bpf.policykey import identity_entries
from cilia.policy import parse_text
from cilia.policy.mapstate import MapState, PolicyEntry


def from_scratch(state: MapState, rule_id: Callable[[PolicyEntry], int]) -> dict[bytes, bytes]:
    """Every entry of ``state`` packed (proxy port, flags, rule id: without the counters)."""
    out: dict[bytes, bytes] = {}
    for direction in (state.ingress, state.egress):
        for ident, group in ((0, direction.any_group), *direction.groups.items()):
            for key, (value, _l4) in identity_entries(direction.direction, ident, group, no_proxy,
                                                      rule_id).items():
                out[key] = value.pack()[:8]
    return out


@pytest.mark.parametrize("seed", range(2))
def test_trie_after_learning_equals_from_scratch(seed: int) -> None:
    rnd = random.Random(seed)
    with bpf_node() as node:
        ep = node.add_endpoint("client", "10.211.0.30", "app=client")
        loaded = parse_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: fq}\nspec:\n"
                            + "".join(f"  {line}\n" for line in POLICY.strip().splitlines()), "fq.yaml")
        assert loaded.ok, loaded.problems
        node.engine.apply(loaded.policies)
        patched = ipcache_patched = 0
        synced: MapState | None = None
        node.datapath.sync_ipcache(node.engine.ipcache.items(), node.engine.ipcache.version)
        node.engine.ipcache.take_changes()
        for _ in range(40):
            name = rnd.choice(NAMES)
            node.engine.update_fqdn({name: [] if rnd.random() < 0.3 else rnd.sample(ADDRESSES, rnd.randint(1, 3))})
            state = node.engine.endpoint_policy("client").map_state
            if synced is not None and state.egress.base == synced.egress.serial:
                patched += 1
            node.datapath.sync_policy(ep.ep_id, state, no_proxy, ports=())
            synced = state
            kernel = {k: bytes(v)[:8] for k, v in node.loader.policy_map(ep.ep_id).items()}
            assert kernel == from_scratch(state, node.datapath.rule_id)
            changes = node.engine.ipcache.take_changes()
            assert changes is not None
            if node.datapath.patch_ipcache(changes.changes, changes.since, changes.version):
                ipcache_patched += 1
            else:
                node.datapath.sync_ipcache(node.engine.ipcache.items(), changes.version)
            assert maps.ipcache_items(node.loader.maps["ipcache"]) == {
                p: i for p, i in node.engine.ipcache.items() if p.version == 4}
        assert patched > 5  # the patching paths ran
        assert ipcache_patched == 40

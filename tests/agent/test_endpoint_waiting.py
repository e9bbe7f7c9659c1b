"""Issue 13's endpoint states with the in-memory kvstore double (a test double, named as such: the
real etcd runs in tests/kvstore/test_etcd_down.py): an endpoint added while the store is down
waits for its cluster-wide identity with no number (recorded, surviving a restart, reported as
degraded), and the retry loop admits it in one revision once the store answers; one deleted while
it waits never gets an identity allocated."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from cilia.agent.api import render
from cilia.agent.daemon import AgentError
from cilia.agent.state import load_state
from cilia.cluster import keys
from cilia.cluster.identities import ClusterAllocator
from cilia.cluster.session import Session
from cilia.kvstore import MemoryKVStore
from cilia.specs import EndpointSpec
from tests.agent.agent_support import agent_in_process
from tests.kvstore.test_agents_etcd import wait_until


def _identities_text(store: MemoryKVStore) -> str:
    """Every identity key and value in the store, as text."""
    return "\n".join(f"{kv.key} {kv.value!r}" for kv in store.get_prefix(keys.IDENTITIES)[0])


def test_an_endpoint_waits_for_its_identity_across_a_restart_and_is_admitted_in_one_revision(
        tmp_path: Path) -> None:
    store = MemoryKVStore()
    allocator = ClusterAllocator(store, Session(store, "node-a"))
    with agent_in_process(tmp_path / "a", envoy="none", allocator=allocator) as a:
        a.pending.backoff = (0.05, 0.2)
        ready = a.add_endpoint(EndpointSpec("first", ("app=first",), ("10.216.1.10",)))
        store.down = True
        added = a.add_endpoint(EndpointSpec("late", ("app=late",), ("10.216.1.11",)))
        shown = render(added)["endpoint"]
        assert shown["identity"] is None and shown["state"] == "waiting-for-identity"
        assert any(label.endswith("app=late") for label in shown["identity_labels"])
        assert added.revision == ready.revision + 1
        # not in the engine: no number, nothing in the ipcache (a peer sending to it is judged as world)
        assert "late" not in {e.name for e in a.engine.endpoints()}
        assert a.engine.ipcache.lookup("10.216.1.11")[1] in (2, 9)
        status = a.status()
        assert not status["healthy"] and status["waiting_for_identity"] == ["late"]
        metrics = generate_latest(a.metrics.registry).decode()
        assert 'cilia_endpoint_state{endpoint_state="waiting-for-identity"} 1.0' in metrics
        assert 'cilia_endpoint_state{endpoint_state="ready"} 1.0' in metrics
        assert any("waiting for a cluster-wide identity" in r and "late" in r for r in status["reasons"])
        # a ready endpoint is not taken away by the outage: replacing it with new labels is refused
        try:
            a.add_endpoint(EndpointSpec("first", ("app=relabelled",), ("10.216.1.10",)))
            raise AssertionError("a ready endpoint was replaced without an identity")
        except AgentError as e:
            assert e.status == 503 and "keeps its current identity" in str(e)
        assert a.engine.identity_of("first").id == ready.endpoint.identity
        a.remove_endpoint("first")  # (a restart replays ready endpoints through the allocator: not while it is down)
    assert set(load_state(tmp_path / "a").waiting) == {"late"}

    with agent_in_process(tmp_path / "a", envoy="none", allocator=ClusterAllocator(store, Session(store, "node-a"))
                          ) as a:
        a.pending.backoff = (0.05, 0.2)
        listed = {e.spec.name: e for e in a.endpoints().endpoints}
        assert listed["late"].state == "waiting-for-identity" and listed["late"].identity is None
        before = a.revision
        store.down = False
        wait_until("late admitted", lambda: not a.waiting_endpoints())
        assert a.revision == before + 1  # admitted through the normal commit path, in one revision
        late = a.engine.identity_of("late").id
        assert 256 <= late < 65536 and a.engine.ipcache.lookup("10.216.1.11")[1] == late
        assert render(a.endpoints())["endpoints"][0]["state"] == "ready"
        assert a.status()["healthy"] and a.status()["waiting_for_identity"] == []
    assert load_state(tmp_path / "a").waiting == {}


def test_an_endpoint_deleted_while_it_waits_gets_no_identity(tmp_path: Path) -> None:
    store = MemoryKVStore()
    allocator = ClusterAllocator(store, Session(store, "node-a"))
    with agent_in_process(tmp_path / "a", envoy="none", allocator=allocator) as a:
        a.pending.backoff = (0.05, 0.2)
        store.down = True
        a.add_endpoint(EndpointSpec("gone", ("app=gone",), ("10.216.2.10",)))
        a.remove_endpoint("gone")
        assert a.endpoints().endpoints == () and a.waiting_endpoints() == []
        store.down = False
        a.add_endpoint(EndpointSpec("other", ("app=other",), ("10.216.2.11",)))  # proves the store answers
        text = _identities_text(store)
        assert "other" in text and "gone" not in text  # nothing was allocated for app=gone

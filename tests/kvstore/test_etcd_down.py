"""etcd unreachable: the store's I/O never happens under the agent's lock (other API calls answer
while an endpoint add waits for the store), and other nodes' churn is coalesced: one engine change
per round of arrivals, no state.json rewrite for them."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

from cilia.agent.daemon import AgentError
from cilia.cluster.remotefeed import RemoteBatch, RemoteFeed
from cilia.specs import EndpointSpec
from tests.agent.agent_support import agent_in_process
from tests.kvstore.etcd_support import EtcdCluster
from tests.kvstore.test_agents_etcd import kv, remote_identity, wait_until


def test_api_calls_answer_while_an_endpoint_add_waits_for_a_dead_etcd(etcd1: EtcdCluster, tmp_path: Path) -> None:
    with agent_in_process(tmp_path / "a", envoy="none", node_id="node-a", kvstore=kv(etcd1, ttl=30)) as a:
        assert a.cluster is not None
        a.add_endpoint(EndpointSpec("deathstar", ("org=empire", "class=deathstar"), ("10.213.1.10",)))
        etcd1.stop_all()
        outcome: list[object] = []

        def add() -> None:
            try:
                outcome.append(a.add_endpoint(EndpointSpec("new", ("app=new",), ("10.213.1.20",))))
            except AgentError as e:
                outcome.append(e)

        adder = threading.Thread(target=add)
        adder.start()
        wait_until("the add is inside the store's I/O", a.cluster.allocator._io_lock.locked)
        # while it waits for etcd, the agent's lock is free: these answer before the add ends
        names = [e.spec.name for e in a.endpoints().endpoints]
        status = a.status()
        removed = a.remove_endpoint("deathstar")
        still_waiting = adder.is_alive()
        adder.join(60)
        assert still_waiting, "the add finished before the other calls: nothing was shown"
        assert names == ["deathstar"] and status["kvstore"]["backend"] == "etcd" and removed.revision > 0
        assert isinstance(outcome[0], AgentError) and outcome[0].status == 503
        assert "no cluster-wide identity" in str(outcome[0])
        assert [e.spec.name for e in a.endpoints().endpoints] == []  # never a node-local number


def test_other_nodes_endpoints_do_not_rewrite_state_json(etcd1: EtcdCluster, tmp_path: Path) -> None:
    with agent_in_process(tmp_path / "a", envoy="none", node_id="node-a", kvstore=kv(etcd1)) as a, \
            agent_in_process(tmp_path / "b", envoy="none", node_id="node-b", kvstore=kv(etcd1)) as b:
        a.add_endpoint(EndpointSpec("deathstar", ("org=empire", "class=deathstar"), ("10.213.1.10",)))
        state = (tmp_path / "a" / "state.json").read_bytes()
        for i in range(40):
            b.add_endpoint(EndpointSpec(f"pod{i}", (f"app=pod{i % 4}",), (f"10.213.2.{i + 1}",)))
        wait_until("a knows b's 40 endpoints", lambda: all(
            remote_identity(a, f"10.213.2.{i + 1}") is not None for i in range(40)))
        assert (tmp_path / "a" / "state.json").read_bytes() == state


def test_the_feed_merges_what_arrives_while_a_batch_is_applied() -> None:
    applied: list[RemoteBatch] = []
    first_running, release = threading.Event(), threading.Event()

    def apply(batch: RemoteBatch) -> None:
        applied.append(batch)
        first_running.set()
        release.wait(30)

    net = ipaddress.ip_network
    feed = RemoteFeed(apply)
    feed.start()
    try:
        feed.add({net("10.0.0.1"): 300}, [])
        assert first_running.wait(30)
        for i in range(2, 50):  # all of these arrive while the first batch is being applied
            feed.add({net(f"10.0.0.{i}"): 300 + i}, [])
        feed.add({net("10.0.0.2"): 999}, [net("10.0.0.3")])
        feed.add({}, [net("10.0.0.4")])
        feed.learned([300, 301])
        release.set()
        assert feed.idle.wait(30)
    finally:
        feed.stop()
    assert len(applied) == 2
    second = applied[1]
    assert second.upserts[net("10.0.0.2")] == 999 and net("10.0.0.3") not in second.upserts
    assert set(second.deletes) == {net("10.0.0.3"), net("10.0.0.4")}
    assert len(second.upserts) == 46 and second.learned == {300, 301}

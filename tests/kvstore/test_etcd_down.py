"""etcd unreachable: the store's I/O never happens under the agent's lock (other API calls answer
while an endpoint add waits for the store), an endpoint added meanwhile waits for its cluster-wide
identity with its traffic dropped in the kernel, and other nodes' churn is coalesced: one engine
change per round of arrivals, no state.json rewrite for them."""

from __future__ import annotations

import ipaddress
import threading
import subprocess
import uuid
from pathlib import Path

from cilia.agent.daemon import AgentError
from cilia.agent.results import EndpointAdded
from cilia.cluster import keys
from cilia.cluster.remotefeed import RemoteBatch, RemoteFeed
from cilia.agent.state import load_state
from cilia.specs import EndpointSpec
from tests.agent.agent_support import agent_in_process
from tests.agent.bpf_agent_support import SHIPS, TIMEOUT, BpfAgentNode
from tests.agent.test_agent_bpf import LAND
from tests.agent.test_agent_cni import Runtime, _labels, _land
from tests.helpers import ip, require_bpf
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
        # accepted, waiting for its identity: never a node-local number
        assert isinstance(outcome[0], EndpointAdded), outcome
        assert outcome[0].endpoint.identity is None and outcome[0].endpoint.state == "waiting-for-identity"
        assert [(e.spec.name, e.identity) for e in a.endpoints().endpoints] == [("new", None)]
        assert "no cluster-wide identity" in a.pending.errors["new"]  # why it waits, for status


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
        # their revisions are journaled, so a restarted agent never numbers a revision twice
        assert load_state(tmp_path / "a").revision == a.revision


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


def test_a_pod_added_while_etcd_is_down_is_dropped_in_the_kernel_until_it_has_its_identity(tmp_path: Path) -> None:
    """Issue 13's proof: every etcd member stopped, existing traffic keeps its verdicts, a new pod
    (its namespace and veth made by `endpoint add --create-netns`, or by cilia-cni) is accepted but
    waits for its identity with all its packets dropped in the kernel, and once etcd is back it is
    admitted with a cluster-wide number (one identity per label set in etcd) and reaches deathstar."""
    require_bpf()
    node = BpfAgentNode(tmp_path)
    runtime = Runtime(node, tmp_path)  # a container runtime calling cilia-cni
    etcd: EtcdCluster | None = None
    try:
        node.state_dir.mkdir(parents=True)
        ip("netns", "add", node.node)
        ip("-n", node.node, "link", "set", "lo", "up")
        etcd = EtcdCluster(tmp_path, members=1, netns=node.node)  # on the node's loopback
        node.agent.args = (*node.agent.args, "--envoy", "none", "--kvstore", "etcd",
                           "--kvstore-endpoints", etcd.endpoints_arg)
        node.agent.start(timeout=60)
        node.add_ship("deathstar")
        node.add_ship("xwing")
        node.serve_deathstar()
        assert node.shoot("xwing", *LAND) == "200 Ship landed"  # no policy: everything allowed

        etcd.stop_all()
        added = node.ok("endpoint", "add", "--name", "tiefighter", "--labels", SHIPS["tiefighter"][1], "--ip",
                        node.address("tiefighter"), "--create-netns", "--netns", node.netns("tiefighter"),
                        "-o", "json").json()
        assert added["endpoint"]["identity"] is None and added["endpoint"]["state"] == "waiting-for-identity"
        listed = {e["name"]: e for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]}
        assert listed["tiefighter"]["state"] == "waiting-for-identity" and listed["xwing"]["state"] == "ready"
        assert "waiting-for-identity" in node.ok("endpoint", "get", "tiefighter").out
        status = node.cilia("status", "-o", "json").json()
        assert status["waiting_for_identity"] == ["tiefighter"] and not status["healthy"]
        text = node.cilia("status").out
        assert "(+1 waiting for identity)" in text and "tiefighter" in text  # the Degraded line names it

        monitor = node.monitor("--type", "drop")
        try:
            assert node.shoot("tiefighter", *LAND) == TIMEOUT  # its packets never leave: dropped in the kernel
            drop = monitor.wait_for(lambda e: e["source"]["address"] == node.address("tiefighter"))
        finally:
            monitor.stop()
        assert drop["reason_text"] == "Policy denied" and drop["direction"] == "egress"
        assert drop["source"]["identity"] == 5 and "reserved:init" in drop["source"]["labels"]
        assert drop["endpoint"] == "tiefighter" and drop["source"]["endpoint"] == "tiefighter"
        assert node.shoot("xwing", *LAND) == "200 Ship landed"  # what was known keeps its verdict

        # a pod plugged in by the CNI plugin meanwhile: plumbed and accepted, waiting likewise
        probe_ns, probe_id = runtime.sandbox("probe"), uuid.uuid4().hex
        code, result = runtime.plugin("ADD", probe_id, probe_ns, "probe", runtime.config(**_labels("empire/probe")))
        assert code == 0 and result is not None, result
        assert runtime.plugin("CHECK", probe_id, probe_ns, "probe", {**runtime.config(), "prevResult": result}) \
            == (0, None)
        listed = {e["name"]: e for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]}
        assert listed["probe.default"]["state"] == "waiting-for-identity"
        assert _land(node, probe_ns) == TIMEOUT

        etcd.start_all()
        wait_until("tiefighter admitted", lambda: {e["name"]: e for e in node.ok(
            "endpoint", "list", "-o", "json").json()["endpoints"]}["tiefighter"]["state"] == "ready", timeout=60)
        assert node.shoot("tiefighter", *LAND) == "200 Ship landed"
        wait_until("the CNI pod admitted", lambda: {e["name"]: e for e in node.ok(
            "endpoint", "list", "-o", "json").json()["endpoints"]}["probe.default"]["state"] == "ready", timeout=60)
        assert _land(node, probe_ns) == "200 Ship landed"
        ids = {e["name"]: e["identity"] for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]}
        assert len(set(ids.values())) == 4 and all(256 <= i < 65536 for i in ids.values())
        # no duplicate identity: each ID key in etcd holds another label set, each label set one ID
        by_id, by_labels = _etcd_pairs(node.node, etcd, keys.ID), _etcd_pairs(node.node, etcd, keys.LABELS)
        assert len(by_id) == len(set(by_id.values())) == len(by_labels) == 4
        assert {keys.parse_id_key(k) for k in by_id} == set(ids.values()) == {int(v) for v in by_labels.values()}
        assert node.cilia("status", "-o", "json").json()["waiting_for_identity"] == []
    finally:
        runtime.cleanup()
        node.teardown()
        if etcd is not None:
            etcd.close()


def _etcd_pairs(netns: str, etcd: EtcdCluster, prefix: str) -> dict[str, str]:
    """Every key under ``prefix`` with its value, read by etcdctl inside the node's namespace."""
    out = subprocess.run(["ip", "netns", "exec", netns, "etcdctl", "--endpoints", etcd.endpoints_arg, "get",
                          "--prefix", prefix], env={"ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()
    return dict(zip(out[0::2], out[1::2], strict=True))

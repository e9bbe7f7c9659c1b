"""Two real agents (in this process, and as `python -m cilia agent` processes) on a real 3-member
etcd: each sees the other's endpoints with the same identity numbers, a dead agent's endpoints
vanish with its lease, malformed entries are skipped, and the CLI shows nodes, identities and keys."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent.agent_support import AgentProcess, agent_in_process, run_cli
from cilia.agent.cluster import KVStoreConfig
from cilia.agent.daemon import Agent
from cilia.cluster import keys
from cilia.kvstore.etcd import EtcdKVStore
from cilia.specs import EndpointSpec
from tests.kvstore.etcd_support import EtcdCluster

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "examples" / "starwars" / "sw_l3_l4_policy.yaml"
DEATHSTAR, TIEFIGHTER, XWING = "10.213.1.10", "10.213.2.11", "10.213.2.12"


def wait_until(what: str, predicate: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        time.sleep(0.05)


def kv(cluster: EtcdCluster, ttl: int = 15, node_ip: str | None = None) -> KVStoreConfig:
    return KVStoreConfig("etcd", tuple(cluster.endpoints), lease_ttl=ttl, timeout=3.0, node_ip=node_ip)


def remote_identity(agent: Agent, ip: str) -> int | None:
    return agent.engine.ipcache.get(ipaddress.ip_network(ip))


def ingress_peers(agent: Agent, name: str) -> set[int]:
    ms = agent.engine.endpoint_policy(name).map_state
    return {ident for ident, _, _ in ms.ingress.entries()}


def test_two_agents_share_identities_and_endpoints_and_a_dead_ones_vanish(etcd3: EtcdCluster,
                                                                          tmp_path: Path) -> None:
    with agent_in_process(tmp_path / "a", envoy="none", node_id="node-a",
                          kvstore=kv(etcd3, node_ip="192.0.2.1")) as a:
        a.import_policies([(str(POLICY), POLICY.read_text())])
        a.add_endpoint(EndpointSpec("deathstar", ("org=empire", "class=deathstar"), (DEATHSTAR,)))
        with agent_in_process(tmp_path / "b", envoy="none", node_id="node-b",
                              kvstore=kv(etcd3, ttl=2, node_ip="192.0.2.2")) as b:
            tie = b.add_endpoint(EndpointSpec("tiefighter", ("org=empire", "class=tiefighter"), (TIEFIGHTER,)))
            xwing = b.add_endpoint(EndpointSpec("xwing", ("org=alliance", "class=xwing"), (XWING,)))
            tie_id, xwing_id = tie.endpoint.identity, xwing.endpoint.identity
            wait_until("a knows b's endpoints", lambda: remote_identity(a, TIEFIGHTER) == tie_id
                       and remote_identity(a, XWING) == xwing_id)
            # a's deathstar admits the empire's ship from the other node, not the alliance's
            wait_until("deathstar admits tiefighter", lambda: tie_id in ingress_peers(a, "deathstar"))
            assert xwing_id not in ingress_peers(a, "deathstar")
            wait_until("b knows a's deathstar", lambda: remote_identity(b, DEATHSTAR) is not None)
            assert remote_identity(b, DEATHSTAR) == a.engine.identity_of("deathstar").id

            # the same labels on a get the same number b allocated
            again = a.add_endpoint(EndpointSpec("tie2", ("org=empire", "class=tiefighter"), ("10.213.1.11",)))
            assert again.endpoint.identity == tie_id

            wait_until("both nodes listed", lambda: len(run_cli(a.config.state_dir, "node", "list", "-o",
                                                                "json").json()["nodes"]) == 2)
            nodes = run_cli(a.config.state_dir, "node", "list", "-o", "json").json()["nodes"]
            assert {(n["name"], n["ip"], n["local"]) for n in nodes} == {("node-a", "192.0.2.1", True),
                                                                         ("node-b", "192.0.2.2", False)}
            node_b = run_cli(a.config.state_dir, "node", "get", "node-b", "-o", "json").json()
            assert (node_b["name"], node_b["ip"], node_b["local"]) == ("node-b", "192.0.2.2", False)
            assert "(this node)" in run_cli(a.config.state_dir, "node", "get", "node-a").out
            missing = run_cli(a.config.state_dir, "node", "get", "node-z")
            assert missing.code == 2 and "no node node-z" in missing.err
            wait_until("references mirrored", lambda: set(
                {i["id"]: i for i in run_cli(a.config.state_dir, "identity", "list", "--cluster", "-o",
                                             "json").json()["identities"]}[tie_id]["nodes"]) == {"node-a", "node-b"})
            shared = run_cli(a.config.state_dir, "identity", "list", "--cluster", "-o", "json").json()
            by_id = {i["id"]: i for i in shared["identities"]}
            assert by_id[xwing_id]["nodes"] == ["node-b"]
            got = run_cli(a.config.state_dir, "kvstore", "get", keys.ip_key(TIEFIGHTER), "-o", "json").json()
            assert '"node": "node-b"' in got["entries"][0]["value"] and got["entries"][0]["lease"]
            listed = run_cli(a.config.state_dir, "kvstore", "ls", keys.IPCACHE, "-o", "json").json()
            assert {e["key"] for e in listed["entries"]} >= {keys.ip_key(ip) for ip in (DEATHSTAR, TIEFIGHTER, XWING)}
            refused = run_cli(a.config.state_dir, "kvstore", "ls", "other/", "-o", "json")
            assert refused.code == 2 and "only keys under cilia/" in refused.err
            status = a.status()
            assert status["kvstore"]["connected"] and status["kvstore"]["remote_endpoints"] == 2
            text = run_cli(a.config.state_dir, "status").out
            assert "KVStore:     etcd" in text and "as node node-a, connected, 2 node(s)" in text
            metrics = a.metrics.exposition().decode()
            assert "cilia_kvstore_connected 1.0" in metrics and "cilia_kvstore_remote_endpoints 2.0" in metrics
        # b stopped without revoking its lease (as if killed): its entries go when the lease expires
        wait_until("b's endpoints vanish", lambda: remote_identity(a, TIEFIGHTER) is None
                   and remote_identity(a, XWING) is None, timeout=20)
        assert a.engine.ipcache.lookup(TIEFIGHTER)[1] == 9  # world-ipv4: unknown again
        # tie2 on a still holds the tiefighter identity: the deathstar still admits it
        assert tie_id in ingress_peers(a, "deathstar")
        wait_until("node b gone", lambda: [n["name"] for n in a.cluster.node_list()["nodes"]] == ["node-a"]
                   if a.cluster else False)


def test_malformed_and_widening_entries_are_skipped_and_the_watch_keeps_going(etcd1: EtcdCluster,
                                                                              tmp_path: Path) -> None:
    with agent_in_process(tmp_path / "a", envoy="none", node_id="node-a", kvstore=kv(etcd1)) as a:
        store = EtcdKVStore(etcd1.endpoints)
        try:
            store.put(keys.ip_key("10.213.9.1"), b"not json")
            store.put(keys.ip_key("10.213.9.2"), b'{"ip": "10.213.9.2", "identity": 1, "node": "evil"}')  # host
            store.put(keys.ip_key("10.213.9.3"), b'{"ip": "10.213.9.99", "identity": 300, "node": "x"}')
            store.put(keys.ip_key("nonsense"), b'{"ip": "nonsense", "identity": 300, "node": "x"}')
            store.put(keys.node_key("broken"), b"[]")
            store.put(keys.id_key(4000), b"{{{")
            store.put(keys.ip_key("10.213.9.4"), b'{"ip": "10.213.9.4", "identity": 4000, "node": "x"}')
            store.put(keys.ip_key("10.213.9.5"), b'{"ip": "10.213.9.5", "identity": 301, "node": "y"}')
        finally:
            store.close()
        wait_until("the valid entry arrives", lambda: remote_identity(a, "10.213.9.5") == 301)
        assert remote_identity(a, "10.213.9.4") == 4000  # an identity whose labels do not parse ...
        assert 4000 not in {i.id for i in a.engine.identities()}  # ... is selected by nothing
        for ip in ("10.213.9.1", "10.213.9.2", "10.213.9.3"):
            assert remote_identity(a, ip) is None
        assert a.engine.ipcache.lookup("10.213.9.2")[1] != 1
        st = a.status()["kvstore"]
        assert st["malformed"] >= 5 and st["connected"]


def test_wrong_endpoints_give_a_clear_error_at_start(tmp_path: Path) -> None:
    res = run_cli(tmp_path / "s", "agent", "--envoy", "none", "--kvstore", "etcd", "--kvstore-endpoints",
                  "ftp://127.0.0.1:1")
    assert res.code == 1 and "expected http://HOST:PORT" in res.err
    res = run_cli(tmp_path / "s", "agent", "--envoy", "none", "--kvstore", "etcd")
    assert res.code == 2 and "needs --kvstore-endpoints" in res.err
    res = run_cli(tmp_path / "s", "agent", "--envoy", "none", "--kvstore-endpoints", "http://127.0.0.1:1")
    assert res.code == 2 and "needs --kvstore etcd" in res.err


@pytest.mark.slow
def test_agents_as_processes_see_each_others_endpoints(etcd3: EtcdCluster, tmp_path: Path) -> None:
    common = ("--envoy", "none", "--kvstore", "etcd", "--kvstore-endpoints", etcd3.endpoints_arg,
              "--kvstore-lease-ttl", "3")
    a = AgentProcess(tmp_path / "pa", *common, "--node-id", "node-a")
    b = AgentProcess(tmp_path / "pb", *common, "--node-id", "node-b")
    (tmp_path / "pa").mkdir()
    (tmp_path / "pb").mkdir()
    a.start()
    try:
        b.start()
        try:
            added = run_cli(b.state_dir, "endpoint", "add", "--name", "tiefighter", "--labels",
                            "org=empire,class=tiefighter", "--ip", TIEFIGHTER, "-o", "json")
            assert added.code == 0, added.err
            tie_id = added.json()["endpoint"]["identity"]
            wait_until("a lists b's identity", lambda: any(
                i["id"] == tie_id and i["nodes"] == ["node-b"]
                for i in run_cli(a.state_dir, "identity", "list", "--cluster", "-o", "json").json()["identities"]))
            mine = run_cli(a.state_dir, "endpoint", "add", "--name", "tie2", "--labels",
                           "org=empire,class=tiefighter", "--ip", "10.213.1.11", "-o", "json")
            assert mine.json()["endpoint"]["identity"] == tie_id
        finally:
            b.stop()
    finally:
        a.stop()
    assert "Traceback" not in a.log.read_text() + b.log.read_text()


def test_etcd_lost_keeps_what_the_agent_knew_defers_new_endpoints_and_recovers(etcd3: EtcdCluster,
                                                                               tmp_path: Path) -> None:
    with agent_in_process(tmp_path / "a", envoy="none", node_id="node-a", kvstore=kv(etcd3, ttl=30)) as a, \
            agent_in_process(tmp_path / "b", envoy="none", node_id="node-b", kvstore=kv(etcd3, ttl=30)) as b:
        a.import_policies([(str(POLICY), POLICY.read_text())])
        a.add_endpoint(EndpointSpec("deathstar", ("org=empire", "class=deathstar"), (DEATHSTAR,)))
        tie_id = b.add_endpoint(EndpointSpec("tiefighter", ("org=empire", "class=tiefighter"),
                                             (TIEFIGHTER,))).endpoint.identity
        wait_until("deathstar admits tiefighter", lambda: tie_id in ingress_peers(a, "deathstar"))

        etcd3.stop_member(1)  # one member gone: nothing changes
        xwing_id = b.add_endpoint(EndpointSpec("xwing", ("org=alliance", "class=xwing"), (XWING,))).endpoint.identity
        wait_until("a sees xwing", lambda: remote_identity(a, XWING) == xwing_id)
        etcd3.start_member(1)

        etcd3.stop_all()
        wait_until("status says so", lambda: not a.status()["kvstore"]["connected"], timeout=20)
        assert not a.status()["healthy"]
        # everything known is still enforced: nothing flushed
        assert remote_identity(a, TIEFIGHTER) == tie_id and tie_id in ingress_peers(a, "deathstar")
        waiting = run_cli(a.config.state_dir, "endpoint", "add", "--name", "new", "--labels", "app=new",
                          "--ip", "10.213.1.20")
        assert waiting.code == 0 and "identity waiting-for-identity" in waiting.out, waiting.err
        assert {e.spec.name: e.identity for e in a.endpoints().endpoints}["new"] is None  # no local number
        assert "new" in run_cli(a.config.state_dir, "status").out  # a Degraded line names it
        # the same labels as an endpoint it holds: the number it already has
        same = a.add_endpoint(EndpointSpec("deathstar2", ("org=empire", "class=deathstar"), ("10.213.1.21",)))
        assert same.endpoint.identity == a.engine.identity_of("deathstar").id

        etcd3.start_all()
        wait_until("connected again", lambda: a.status()["kvstore"]["connected"]
                   and b.status()["kvstore"]["connected"], timeout=30)
        wait_until("a admits new", lambda: {e.spec.name: e.state for e in a.endpoints().endpoints}["new"] == "ready")
        new_a = a.engine.identity_of("new").id
        new_b = b.add_endpoint(EndpointSpec("new", ("app=new",), ("10.213.2.20",))).endpoint.identity
        assert new_a == new_b
        wait_until("b sees deathstar2", lambda: remote_identity(b, "10.213.1.21") is not None)
        store = EtcdKVStore(etcd3.endpoints)
        try:
            records = [kv.value for kv in store.get_prefix(keys.ID)[0]]
        finally:
            store.close()
        assert len(records) == len(set(records)) == 4  # deathstar, tiefighter, xwing, new: no duplicates


@pytest.mark.slow
def test_a_killed_and_restarted_agent_republishes_before_deleting_its_stale_keys(etcd3: EtcdCluster,
                                                                                 tmp_path: Path) -> None:
    """kill -9, then start again on the same state: its endpoint's key is never deleted (the old
    lease still holds it until the new run has written it again), a key its previous run left for
    an endpoint it no longer has is deleted, and the identity keeps its number."""
    import signal

    state = tmp_path / "pa"
    state.mkdir()
    args = ("--envoy", "none", "--kvstore", "etcd", "--kvstore-endpoints", etcd3.endpoints_arg,
            "--kvstore-lease-ttl", "20", "--node-id", "node-a")
    a = AgentProcess(state, *args)
    a.start()
    store = EtcdKVStore(etcd3.endpoints)
    events: list[tuple[str, str]] = []
    try:
        added = run_cli(state, "endpoint", "add", "--name", "tiefighter", "--labels", "org=empire,class=tiefighter",
                        "--ip", TIEFIGHTER, "-o", "json")
        assert added.code == 0, added.err
        tie_id = added.json()["endpoint"]["identity"]
        wait_until("published", lambda: store.get(keys.ip_key(TIEFIGHTER)) is not None)
        first_lease = store.get(keys.ip_key(TIEFIGHTER)).lease  # type: ignore[union-attr]
        stale = keys.ip_key("10.213.1.99")  # as if its previous run had an endpoint there
        store.put(stale, b'{"identity": 300, "ip": "10.213.1.99", "node": "node-a"}', lease=first_lease)
        watch = store.watch_prefix(keys.IPCACHE, store.revision() + 1,
                                   lambda evs: events.extend((e.kind.value, e.key) for e in evs), lambda e: None)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        a.start()
        wait_until("stale key deleted", lambda: store.get(stale) is None)
        now = store.get(keys.ip_key(TIEFIGHTER))
        assert now is not None and now.lease != first_lease  # moved to the new run's lease
        assert ("delete", keys.ip_key(TIEFIGHTER)) not in events
        assert events.index(("put", keys.ip_key(TIEFIGHTER))) < events.index(("delete", stale))
        listed = run_cli(state, "endpoint", "list", "-o", "json").json()["endpoints"]
        assert [e["identity"] for e in listed] == [tie_id]
        watch.cancel()
    finally:
        store.close()
        a.stop()

"""Bad input from etcd, against a real agent on a real etcd: foreign and malformed keys are logged
and skipped (the watches keep going, nothing widens), an identity whose labels another writer
changes is denied from then on, a labels key that names no valid identity refuses the allocation
(never a merge of two label sets), and wrong kvstore endpoints are a clear error at start."""

from __future__ import annotations

import http.server
import json
import threading
from pathlib import Path


from cilia.cluster import keys
from cilia.kvstore.etcd import EtcdKVStore
from cilia.netutil import free_port
from cilia.policy import LabelSet
from cilia.policy.labels import endpoint_labels
from cilia.specs import EndpointSpec
from tests.agent.agent_support import agent_in_process, run_cli
from tests.kvstore.etcd_support import EtcdCluster
from tests.kvstore.test_agents_etcd import POLICY, ingress_peers, kv, remote_identity, wait_until

DEATHSTAR = "10.213.1.10"
TIEFIGHTER_LABELS = ["k8s:class=tiefighter", "k8s:io.kubernetes.pod.namespace=default", "k8s:org=empire"]


def entry(ip: str, identity: int, node: str = "node-x") -> bytes:
    return json.dumps({"ip": ip, "identity": identity, "node": node}).encode()


def stored(*labels: str) -> list[str]:
    return sorted(endpoint_labels(LabelSet.parse(list(labels))).to_list())


def test_foreign_and_malformed_keys_are_skipped_and_the_watches_keep_going(etcd1: EtcdCluster,
                                                                           tmp_path: Path) -> None:
    with agent_in_process(tmp_path / "a", envoy="none", node_id="node-a", kvstore=kv(etcd1)) as a:
        a.import_policies([(str(POLICY), POLICY.read_text())])
        a.add_endpoint(EndpointSpec("deathstar", ("org=empire", "class=deathstar"), (DEATHSTAR,)))
        own = a.engine.identity_of("deathstar").id
        store = EtcdKVStore(etcd1.endpoints)
        try:
            store.put(keys.IPCACHE + "10.213.9.6/extra", entry("10.213.9.6/extra", 300))  # a foreign key shape
            store.put(keys.IPCACHE + "10.213.9.7", b"\xff\xfe\x00binary")
            store.put(keys.IPCACHE + "10.213.0.0/16", entry("10.213.0.0/16", 300))  # a prefix would widen
            store.put(keys.ip_key(DEATHSTAR), entry(DEATHSTAR, 300, "node-evil"))  # claims a local address
            store.put(keys.IDENTITIES + "something-else/1", b"x")
            store.put(keys.ID + "-5", b'["k8s:app=x"]')
            store.put(keys.id_key(70000), b'["k8s:app=x"]')  # outside 256-65535
            store.put(keys.REFS + "abc", b"")
            store.put(keys.node_key("n1"), b'{"name": "n1", "ip": "not an address"}')
            # an identity first seen as app=ok, then rewritten by another writer to labels the
            # policy lets into the deathstar
            store.put(keys.id_key(5000), json.dumps(stored("app=ok")).encode())
            store.put(keys.ip_key("10.213.9.8"), entry("10.213.9.8", 5000))
            store.put(keys.ip_key("10.213.9.9"), entry("10.213.9.9", 301))  # after all of it: still arrives
            wait_until("the valid entries arrive", lambda: remote_identity(a, "10.213.9.9") == 301
                       and remote_identity(a, "10.213.9.8") == 5000)
            assert 5000 in {i.id for i in a.engine.identities()}
            store.put(keys.id_key(5000), json.dumps(TIEFIGHTER_LABELS).encode())
            wait_until("the rewrite is seen", lambda: a.cluster is not None and a.cluster.allocator.get(5000) is None)
            # the engine learns it again (its last address went and came back): it stays unknown
            store.delete(keys.ip_key("10.213.9.8"))
            wait_until("gone", lambda: remote_identity(a, "10.213.9.8") is None)
            store.put(keys.ip_key("10.213.9.8"), entry("10.213.9.8", 5000))
            store.put(keys.ip_key("10.213.9.10"), entry("10.213.9.10", 302))
            wait_until("back", lambda: remote_identity(a, "10.213.9.8") == 5000
                       and remote_identity(a, "10.213.9.10") == 302)
        finally:
            store.close()
        assert 5000 not in {i.id for i in a.engine.identities()}
        assert 5000 not in ingress_peers(a, "deathstar")
        assert remote_identity(a, DEATHSTAR) == own  # the local endpoint's address wins
        for ip in ("10.213.9.7", "10.213.0.0/16"):
            assert remote_identity(a, ip) is None
        world = a.engine.ipcache.lookup("198.51.100.1")[1]
        assert a.engine.ipcache.lookup("10.213.77.1")[1] == world  # no prefix entered
        st = a.status()["kvstore"]
        assert st["connected"] and st["malformed"] >= 8
        assert all(w["connected"] for w in st["watches"].values())


def test_a_labels_key_naming_no_valid_identity_refuses_the_allocation(etcd1: EtcdCluster, tmp_path: Path) -> None:
    with agent_in_process(tmp_path / "a", envoy="none", node_id="node-a", kvstore=kv(etcd1)) as a:
        store = EtcdKVStore(etcd1.endpoints)
        try:
            store.put(keys.labels_key(stored("app=garbled")), b"not-a-number")
            store.put(keys.id_key(5002), json.dumps(stored("app=victim")).encode())
            store.put(keys.labels_key(stored("app=thief")), b"5002")  # would merge two label sets
        finally:
            store.close()
        # no identity to be had: they wait for one, all their traffic dropped, and status says why
        garbled = a.add_endpoint(EndpointSpec("garbled", ("app=garbled",), ("10.213.1.30",)))
        thief = a.add_endpoint(EndpointSpec("thief", ("app=thief",), ("10.213.1.31",)))
        assert garbled.endpoint.identity is None and thief.endpoint.identity is None
        assert [(e.spec.name, e.state) for e in a.endpoints().endpoints] == [
            ("garbled", "waiting-for-identity"), ("thief", "waiting-for-identity")]
        reasons = " ".join(a.status()["reasons"])
        assert "is not an identity number" in reasons and "holds other labels" in reasons
        assert 5002 not in {i.id for i in a.engine.identities()}
        fine = a.add_endpoint(EndpointSpec("fine", ("app=fine",), ("10.213.1.32",)))
        assert fine.endpoint.identity not in (5002, 0)


def test_wrong_kvstore_endpoints_are_a_clear_error_at_start(tmp_path: Path) -> None:
    base = ("agent", "--envoy", "none", "--kvstore", "etcd", "--kvstore-endpoints")
    nobody = f"http://127.0.0.1:{free_port()}"
    res = run_cli(tmp_path / "s", *base, nobody)
    assert res.code == 1 and f"error: --kvstore etcd: kvstore {nobody}: etcd unreachable" in res.err
    assert "Traceback" not in res.err

    class NotEtcd(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            self.send_error(404)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotEtcd)  # something else listens there
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        other = f"http://127.0.0.1:{server.server_address[1]}"
        res = run_cli(tmp_path / "s", *base, other)
        assert res.code == 1 and f"error: --kvstore etcd: kvstore {other}:" in res.err
        assert "Traceback" not in res.err
    finally:
        server.shutdown()
        server.server_close()
    res = run_cli(tmp_path / "s", *base, "http://no-such-host.invalid:2379,http://127.0.0.1:2379")
    assert res.code == 1 and "no-such-host.invalid" in res.err and "Traceback" not in res.err

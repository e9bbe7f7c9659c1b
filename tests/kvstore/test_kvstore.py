"""The kvstore interface, the same tests for the etcd backend (real etcd) and the in-memory double:
revisions, create-if-absent, compare-and-delete, leases, watches from a revision, compaction."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cilia.kvstore import EventKind, KVStore, KVStoreUnavailable, MemoryKVStore, Put, WatchCompacted
from cilia.kvstore.etcd import EndpointError, EtcdKVStore, parse_endpoints
from cilia.kvstore.mirror import PrefixMirror
from etcd_support import EtcdCluster


@pytest.fixture(params=["etcd", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KVStore]:
    if request.param == "memory":
        mem = MemoryKVStore()
        yield mem
        mem.close()
        return
    cluster = EtcdCluster(tmp_path, members=1)
    etcd = EtcdKVStore(cluster.endpoints, timeout=3)
    try:
        yield etcd
    finally:
        etcd.close()
        cluster.close()


def compact(store: KVStore) -> None:
    if isinstance(store, MemoryKVStore):
        store.compact()
    else:
        assert isinstance(store, EtcdKVStore)
        revision = store.revision()
        store._run(lambda: store._client.compact(revision))


def test_put_get_prefix_and_revisions(store: KVStore) -> None:
    r1 = store.put("cilia/t/a", b"1")
    r2 = store.put("cilia/t/b", b"2")
    store.put("cilia/u/c", b"3")
    assert r2 > r1
    kv = store.get("cilia/t/a")
    assert kv is not None and kv.value == b"1" and kv.mod_revision == r1 and kv.lease == 0
    items, rev = store.get_prefix("cilia/t/")
    assert [(k.key, k.value) for k in items] == [("cilia/t/a", b"1"), ("cilia/t/b", b"2")]
    assert rev == store.revision() and rev > r2
    assert store.get("cilia/t/missing") is None


def test_create_writes_all_or_nothing(store: KVStore) -> None:
    assert store.create([Put("cilia/c/1", b"a"), Put("cilia/c/2", b"b")])
    assert not store.create([Put("cilia/c/3", b"x"), Put("cilia/c/2", b"y")])  # one exists: nothing written
    assert store.get("cilia/c/3") is None
    assert store.get("cilia/c/2").value == b"b"  # type: ignore[union-attr]
    one, two = store.get("cilia/c/1"), store.get("cilia/c/2")
    assert one is not None and two is not None and one.mod_revision == two.mod_revision  # one transaction


def test_compare_and_delete(store: KVStore) -> None:
    rev = store.put("cilia/d/x", b"1")
    assert not store.delete("cilia/d/x", mod_revision=rev - 1)
    assert store.delete("cilia/d/x", mod_revision=rev)
    assert not store.delete("cilia/d/x")
    r1, r2 = store.put("cilia/d/a", b"1"), store.put("cilia/d/b", b"2")
    store.put("cilia/d/refs/a/n1", b"")
    assert not store.delete_unchanged([("cilia/d/a", r1), ("cilia/d/b", r2)], unless_prefix="cilia/d/refs/a/")
    store.delete("cilia/d/refs/a/n1")
    assert not store.delete_unchanged([("cilia/d/a", r1), ("cilia/d/b", r2 + 100)])
    assert store.delete_unchanged([("cilia/d/a", r1), ("cilia/d/b", r2)], unless_prefix="cilia/d/refs/a/")
    assert store.get("cilia/d/a") is None and store.get("cilia/d/b") is None
    assert store.delete_prefix("cilia/d/") == 0


def test_leases_hold_keys_until_revoked(store: KVStore) -> None:
    lease = store.grant_lease(5)
    store.put("cilia/l/a", b"1", lease=lease)
    assert store.create([Put("cilia/l/b", b"2", lease)])
    assert store.get("cilia/l/a").lease == lease  # type: ignore[union-attr]
    assert store.keep_alive(lease)
    store.revoke_lease(lease)
    assert store.get("cilia/l/a") is None and store.get("cilia/l/b") is None
    assert not store.keep_alive(lease)
    with pytest.raises(Exception):  # noqa: B017 - a write under a lease that is gone fails
        store.put("cilia/l/c", b"3", lease=lease)


def test_watch_from_a_revision_and_compaction(store: KVStore) -> None:
    start = store.put("cilia/w/a", b"1")
    store.put("cilia/w/a", b"2")
    store.delete("cilia/w/a")
    store.put("cilia/other", b"x")
    got: queue.Queue[object] = queue.Queue()
    watch = store.watch_prefix("cilia/w/", start, lambda evs: [got.put(e) for e in evs], got.put)
    store.put("cilia/w/b", b"3")
    events = [got.get(timeout=5) for _ in range(4)]
    assert [(e.kind, e.key, e.value) for e in events] == [  # type: ignore[attr-defined]
        (EventKind.PUT, "cilia/w/a", b"1"), (EventKind.PUT, "cilia/w/a", b"2"),
        (EventKind.DELETE, "cilia/w/a", b""), (EventKind.PUT, "cilia/w/b", b"3")]
    watch.cancel()
    compact(store)
    errors: queue.Queue[object] = queue.Queue()
    store.watch_prefix("cilia/w/", start, lambda evs: None, errors.put)
    assert isinstance(errors.get(timeout=5), WatchCompacted)


def test_the_mirror_relists_after_compaction_and_reports_only_the_difference(store: KVStore) -> None:
    changes: queue.Queue[tuple[dict[str, bytes], list[str]]] = queue.Queue()
    store.put("cilia/m/a", b"1")
    store.put("cilia/m/b", b"1")
    mirror = PrefixMirror(store, "cilia/m/", lambda up, de: changes.put((dict(up), list(de))), backoff=(0.05, 0.2))
    mirror.start()
    try:
        assert changes.get(timeout=5) == ({"cilia/m/a": b"1", "cilia/m/b": b"1"}, [])
        store.create([Put("cilia/m/c", b"1"), Put("cilia/m/d", b"1")])  # one revision, two keys
        seen: dict[str, bytes] = {}
        while len(seen) < 2:
            seen.update(changes.get(timeout=5)[0])
        assert seen == {"cilia/m/c": b"1", "cilia/m/d": b"1"}
        if isinstance(store, MemoryKVStore):
            # the watch breaks: it resumes from the last revision seen, without a list
            store.fail_watches(KVStoreUnavailable("connection lost"))
            store.put("cilia/m/a", b"2")
            assert changes.get(timeout=5) == ({"cilia/m/a": b"2"}, [])
            assert mirror.relists == 1
            # it breaks while keys change and the history is compacted: a list, and only the difference
            store.fail_watches(KVStoreUnavailable("connection lost"))
            store.put("cilia/m/a", b"3")
            store.delete("cilia/m/b")
            store.compact()
            up: dict[str, bytes] = {}
            de: list[str] = []
            while (up, de) != ({"cilia/m/a": b"3"}, ["cilia/m/b"]):
                more_up, more_de = changes.get(timeout=5)
                up.update(more_up)
                de += more_de
            # told its revision is compacted: it lists again
            before = mirror.relists
            store.fail_watches(WatchCompacted(store.revision()))
            deadline = time.monotonic() + 5
            while mirror.relists == before:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        store.put("cilia/m/e", b"1")
        deadline = time.monotonic() + 5
        while mirror.data.get("cilia/m/e") != b"1":
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        mirror.stop()


def test_endpoints_are_checked() -> None:
    assert parse_endpoints(["http://127.0.0.1:2379"]).uri == "127.0.0.1:2379"
    assert parse_endpoints(["http://127.0.0.1:1", "http://127.0.0.2:2"]).uri == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert parse_endpoints(["https://[::1]:1", "https://[::1]:2"]).uri == "ipv6:[::1]:1,[::1]:2"
    assert parse_endpoints(["https://etcd-0:2379"]).tls_name == "etcd-0"
    for bad, why in ((["127.0.0.1:2379"], "expected http://"), (["http://a:1", "https://b:2"], "mix http"),
                     (["http://a:x"], "bad port"), (["http://a:1/v3"], "unexpected path"), ([], "no kvstore")):
        with pytest.raises(EndpointError, match=why):
            parse_endpoints(bad)


def test_an_unreachable_store_is_reported_within_the_timeout(tmp_path: Path) -> None:
    from cilia.netutil import free_port

    store = EtcdKVStore([f"http://127.0.0.1:{free_port()}"], timeout=1)
    try:
        with pytest.raises(KVStoreUnavailable):
            store.revision()
    finally:
        store.close()


def test_one_generated_etcd_client_in_the_agents_process() -> None:
    """aetcd registers etcd's protos (rpc.proto, kv.proto, auth.proto) in the default descriptor
    pool next to Envoy's; a second generated etcd client would register the same files and clash.
    Import what an agent with --kvstore etcd imports, and check who registered them."""
    import subprocess
    import sys

    code = ("import cilia.agent.daemon, cilia.kvstore.etcd, json, sys\n"
            "from google.protobuf import descriptor_pool\n"
            "f = descriptor_pool.Default().FindFileByName('rpc.proto')\n"
            "print(json.dumps([f.package, sorted(m for m in sys.modules if 'etcd' in m.split('.')[0])]))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    package, modules = json.loads(out.stdout)
    assert package == "etcdserverpb"
    assert {m.split(".")[0] for m in modules} == {"aetcd"}

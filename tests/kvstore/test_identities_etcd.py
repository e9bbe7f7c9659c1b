"""Cluster-wide identities on a real 3-member etcd: one ID per label set whoever asks, whenever."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from cilia.cluster import keys
from cilia.cluster.identities import ClusterAllocator
from cilia.cluster.session import Session
from cilia.kvstore.etcd import EtcdKVStore
from cilia.policy import LabelSet
from cilia.policy.identity import IdentityUnavailable
from etcd_support import EtcdCluster


@contextmanager
def node(cluster: EtcdCluster, name: str, ttl: int = 5, grace: float = 60.0) -> Iterator[ClusterAllocator]:
    store = EtcdKVStore(cluster.endpoints, timeout=3)
    session = Session(store, name, ttl=ttl)
    session.start()
    alloc = ClusterAllocator(store, session, grace=grace)
    alloc.start()
    try:
        yield alloc
    finally:
        alloc.stop()
        session.stop()
        store.close()


def labels(i: int) -> LabelSet:
    return LabelSet.parse([f"k8s:app=race{i}", "k8s:io.kubernetes.pod.namespace=default"])


def race(allocators: list[ClusterAllocator], want: LabelSet) -> list[int]:
    """Every allocator asks for ``want`` at the same moment (released together by a barrier)."""
    got = [0] * len(allocators)
    barrier = threading.Barrier(len(allocators))

    def run(index: int) -> None:
        barrier.wait()
        got[index] = allocators[index].allocate(want).id

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(allocators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_two_nodes_allocating_the_same_labels_at_the_same_moment_get_one_id(etcd3: EtcdCluster) -> None:
    with node(etcd3, "node-a") as a, node(etcd3, "node-b") as b:
        for i in range(100):
            got = race([a, b], labels(i))
            assert got[0] == got[1], f"round {i}: {got}"
            assert got[0] >= 256
        # 100 label sets, 100 distinct IDs, each record naming exactly its labels
        items, _ = a.store.get_prefix(keys.ID)
        records = {keys.parse_id_key(kv.key): json.loads(kv.value) for kv in items}
        assert len(records) == 100
        assert len({tuple(v) for v in records.values()}) == 100
        refs: dict[int, set[str]] = {}
        for kv in a.store.get_prefix(keys.REFS)[0]:
            number, name = keys.parse_ref_key(kv.key)
            refs.setdefault(number, set()).add(name)
        assert refs == {i: {"node-a", "node-b"} for i in records}


def test_a_stopped_member_changes_nothing_and_all_stopped_then_back_gives_no_duplicates(
        etcd3: EtcdCluster) -> None:
    with node(etcd3, "node-a") as a, node(etcd3, "node-b") as b:
        first = a.allocate(labels(1)).id
        etcd3.stop_member(0)
        assert b.allocate(labels(1)).id == first
        second = b.allocate(labels(2)).id
        assert a.allocate(labels(2)).id == second
        etcd3.start_member(0)
        etcd3.stop_all()
        with pytest.raises(IdentityUnavailable):
            a.allocate(labels(3))  # never a node-local number
        assert a.allocate(labels(1)).id == first  # what it holds stays
        etcd3.start_all()
        third_a = a.allocate(labels(3)).id
        assert b.allocate(labels(3)).id == third_a
        items, _ = a.store.get_prefix(keys.ID)
        values = [tuple(json.loads(kv.value)) for kv in items]
        assert len(values) == len(set(values)) == 3


def test_garbage_collection_deletes_only_unreferenced_ids_after_the_grace(etcd3: EtcdCluster) -> None:
    with node(etcd3, "node-a", grace=10.0) as a, node(etcd3, "node-b", grace=10.0) as b:
        kept = a.allocate(labels(1)).id
        assert b.allocate(labels(1)).id == kept
        dropped = a.allocate(labels(2)).id
        a.release(kept)
        a.release(dropped)
        assert a.collect_garbage(now=0.0) == []  # first seen unreferenced: the grace starts
        assert a.collect_garbage(now=5.0) == []
        assert a.collect_garbage(now=11.0) == [dropped]  # b still references `kept`
        assert a.store.get(keys.id_key(kept)) is not None
        assert a.store.get(keys.id_key(dropped)) is None
        assert a.store.get(keys.labels_key(sorted(labels(2).to_list()))) is None
        # the labels are allocated again, possibly with another ID, and the record is whole
        again = b.allocate(labels(2))
        assert json.loads(b.store.get(keys.id_key(again.id)).value) == sorted(labels(2).to_list())  # type: ignore[union-attr]


def test_a_dead_nodes_references_vanish_with_its_lease(etcd3: EtcdCluster) -> None:
    with node(etcd3, "node-a") as a:
        store = EtcdKVStore(etcd3.endpoints, timeout=3)
        try:
            lease = store.grant_lease(1)
            store.put(keys.ref_key(777, "dead-node"), b"", lease=lease)
            assert store.get(keys.ref_key(777, "dead-node")) is not None
            deadline = time.monotonic() + 10
            while store.get(keys.ref_key(777, "dead-node")) is not None:
                assert time.monotonic() < deadline, "the lease never expired"
                time.sleep(0.2)
        finally:
            store.close()
        assert a.session.healthy


def test_a_malformed_identity_record_is_skipped_and_unknown(etcd1: EtcdCluster) -> None:
    with node(etcd1, "node-a") as a:
        a.store.put(keys.id_key(999), b"{not json")
        a.store.put(keys.ID + "abc", b'["k8s:app=x"]')
        a.store.put(keys.id_key(1000), b'["reserved:host"]')
        a.store.put(keys.id_key(1001), b'["k8s:app=fine"]')
        deadline = time.monotonic() + 10
        while a._known.get(1001) is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert a.get(999) is None
        assert a.get(1000) is None
        assert a.malformed >= 3
        assert a.mirror.connected

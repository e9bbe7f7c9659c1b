"""The ipcache publisher on real etcd: a restarted agent writes every wanted address before it
deletes what its previous run left, never deletes another node's entry, and republishes under a
new lease."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Sequence
from typing import Any

from cilia.cluster import keys
from cilia.cluster.ipcache import IPCachePublisher, IPEntry
from cilia.cluster.session import Session
from cilia.kvstore import MemoryKVStore
from cilia.kvstore.etcd import EtcdKVStore
from cilia.policy import Endpoint, LabelSet, PolicyEngine
from cilia.policy.mapstate import MapState
from cilia.realizer import Desired, EndpointState
from etcd_support import EtcdCluster


class Recording:
    """The real store, with every write and delete recorded in order (a spy, not a double)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.ops: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    def put(self, key: str, value: bytes, lease: int = 0) -> int:
        self.ops.append(("put", key))
        return int(self.store.put(key, value, lease))

    def delete(self, key: str, mod_revision: int | None = None) -> bool:
        self.ops.append(("delete", key))
        return bool(self.store.delete(key, mod_revision))


def no_policy() -> MapState:
    engine = PolicyEngine()
    engine.upsert_endpoint(Endpoint("x", LabelSet.parse("app=x")))
    return engine.endpoint_policy("x").map_state


def desired(revision: int, endpoints: dict[str, tuple[Sequence[str], int]]) -> Desired:
    """What the agent would realize: only the addresses and identities matter to the publisher."""
    ms = no_policy()
    eps = {name: EndpointState(name, tuple(ips), ident, ms) for name, (ips, ident) in endpoints.items()}
    return Desired(revision, eps, (), {})


def wait_synced(publisher: IPCachePublisher) -> None:
    assert publisher.synced.wait(10), publisher.last_error


def test_a_restarted_agent_republishes_before_deleting_its_stale_entries(etcd1: EtcdCluster) -> None:
    raw = EtcdKVStore(etcd1.endpoints, timeout=3)
    try:
        old_lease = raw.grant_lease(30)  # the previous run's entries, still under its lease
        for ip, ident in (("10.9.0.1", 300), ("10.9.0.2", 301)):
            raw.put(keys.ip_key(ip), IPEntry(ip, ident, "node-a").encode(), lease=old_lease)
        raw.put(keys.ip_key("10.9.0.3"), IPEntry("10.9.0.3", 302, "node-b").encode())  # another node's
        store = Recording(raw)
        session = Session(raw, "node-a", ttl=3)
        session.start()
        publisher = IPCachePublisher(store, session)  # type: ignore[arg-type]
        publisher.realize(desired(1, {"web": (["10.9.0.1"], 300), "db": (["10.9.0.4"], 303)}))
        publisher.start()
        try:
            wait_synced(publisher)
            puts = [i for i, (op, _) in enumerate(store.ops) if op == "put"]
            deletes = [i for i, (op, _) in enumerate(store.ops) if op == "delete"]
            assert ("delete", keys.ip_key("10.9.0.2")) in store.ops
            assert max(puts) < min(deletes), store.ops  # every wanted entry written before any delete
            items = {kv.key: kv for kv in raw.get_prefix(keys.IPCACHE)[0]}
            assert set(items) == {keys.ip_key(ip) for ip in ("10.9.0.1", "10.9.0.3", "10.9.0.4")}
            assert items[keys.ip_key("10.9.0.1")].lease == session.lease  # moved to the new lease
            # an endpoint leaves: its key goes; an address another node has taken is not deleted
            raw.put(keys.ip_key("10.9.0.4"), IPEntry("10.9.0.4", 310, "node-b").encode())
            publisher.realize(desired(2, {"web": (["10.9.0.1"], 300)}))
            wait_synced(publisher)
            assert raw.get(keys.ip_key("10.9.0.4")) is not None
            # the lease is lost: everything is written again under the new one
            raw.revoke_lease(session.lease)
            deadline = time.monotonic() + 15
            while raw.get(keys.ip_key("10.9.0.1")) is None or not publisher.synced.is_set():
                assert time.monotonic() < deadline, "not republished after the lease was lost"
                time.sleep(0.1)
        finally:
            publisher.stop()
            session.stop()
    finally:
        raw.close()


def test_entries_decode_strictly() -> None:
    good = IPEntry("10.1.1.1", 300, "n1")
    assert IPEntry.decode(keys.ip_key("10.1.1.1"), good.encode()) == good
    assert good.prefix == ipaddress.ip_network("10.1.1.1/32")
    for value, why in ((b"[]", "not an object"), (b'{"ip": "10.1.1.2", "identity": 300, "node": "n"}', "match"),
                       (b'{"ip": "10.1.1.1", "identity": 7, "node": "n"}', "256-65535"),
                       (b'{"ip": "10.1.1.1", "identity": true, "node": "n"}', "256-65535"),
                       (b'{"ip": "10.1.1.1", "identity": 300, "node": ""}', "node name")):
        try:
            IPEntry.decode(keys.ip_key("10.1.1.1"), value)
        except ValueError as e:
            assert why in str(e)
        else:
            raise AssertionError(f"accepted {value!r}")


def test_the_publisher_retries_while_the_store_is_down() -> None:
    store = MemoryKVStore()
    session = Session(store, "node-a")
    publisher = IPCachePublisher(store, session, backoff=(0.02, 0.05))
    store.down = True
    publisher.realize(desired(1, {"web": (["10.9.1.1"], 300)}))
    publisher.start()
    try:
        deadline = time.monotonic() + 5
        while publisher.last_error is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        store.down = False
        wait_synced(publisher)
        assert store.get(keys.ip_key("10.9.1.1")) is not None
    finally:
        publisher.stop()

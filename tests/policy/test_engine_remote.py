"""Other nodes' endpoints in the engine (``update_remote``): their addresses enter the ipcache and
their identities the selector cache, with labels from the allocator; unknown ones select nothing."""

from __future__ import annotations

import ipaddress

from cilia.cluster.identities import ClusterAllocator
from cilia.cluster.session import Session
from cilia.kvstore import MemoryKVStore
from cilia.policy import ANY_IDENTITY, LabelSet, MemoryAllocator, PolicyEngine
from cilia.policy.labels import endpoint_labels
from tests.policy.test_engine import DB_FROM_WEB, cnp, entries, ep

NET = ipaddress.ip_network


def pod(labels: str) -> LabelSet:
    return endpoint_labels(LabelSet.parse(labels))


def db_ingress(engine: PolicyEngine) -> set[int]:
    return {ident for d, ident, _, _ in entries(engine, "db") if d == "ingress"}


def test_a_remote_endpoint_is_selected_like_a_local_one_and_leaves_with_its_address() -> None:
    allocator = MemoryAllocator()
    engine = PolicyEngine(allocator)
    engine.apply(cnp(DB_FROM_WEB, "db"))
    engine.upsert_endpoint(ep("db", "app=db", "10.0.1.2"))
    web = allocator.allocate(pod("app=web"))  # allocated by another node
    change = engine.update_remote({NET("10.0.2.5/32"): web.id})
    assert change.endpoints == {"db"}
    assert db_ingress(engine) == {web.id}
    assert engine.ipcache.lookup("10.0.2.5") == (NET("10.0.2.5/32"), web.id)
    # a second address of the same identity changes no policy
    assert engine.update_remote({NET("10.0.3.5/32"): web.id}).endpoints == set()
    assert engine.update_remote({}, [NET("10.0.2.5/32")]).endpoints == set()
    change = engine.update_remote({}, [NET("10.0.3.5/32")])
    assert change.endpoints == {"db"}
    assert db_ingress(engine) == set()
    assert engine.ipcache.lookup("10.0.2.5")[1] == 9  # world-ipv4 again


def test_an_identity_the_allocator_does_not_know_is_selected_by_nothing() -> None:
    engine = PolicyEngine(MemoryAllocator())
    engine.apply(cnp("endpointSelector: {matchLabels: {app: db}}\ningress:\n- fromEndpoints: [{}]", "all"))
    engine.upsert_endpoint(ep("db", "app=db", "10.0.1.2"))
    before = db_ingress(engine)
    assert engine.update_remote({NET("10.0.2.9/32"): 4242}).endpoints == set()
    assert db_ingress(engine) == before  # `{}` selects every endpoint identity, not this unknown one
    assert 4242 not in db_ingress(engine)
    assert engine.ipcache.lookup("10.0.2.9")[1] == 4242  # nor is it `world`


def test_a_local_endpoint_address_wins_over_a_remote_claim_and_restores_it_when_gone() -> None:
    allocator = MemoryAllocator()
    engine = PolicyEngine(allocator)
    other = allocator.allocate(pod("app=other"))
    engine.update_remote({NET("10.0.1.2/32"): other.id})
    engine.upsert_endpoint(ep("db", "app=db", "10.0.1.2"))
    local = engine.identity_of("db").id
    assert engine.ipcache.lookup("10.0.1.2")[1] == local
    engine.update_remote({NET("10.0.1.2/32"): other.id + 1})
    assert engine.ipcache.lookup("10.0.1.2")[1] == local
    engine.remove_endpoint("db")
    assert engine.ipcache.lookup("10.0.1.2")[1] == other.id + 1


def test_two_nodes_on_the_store_double_share_numbers_and_the_engine_selects_the_remote_one() -> None:
    store = MemoryKVStore()
    a_session, b_session = Session(store, "node-a"), Session(store, "node-b")
    a, b = ClusterAllocator(store, a_session), ClusterAllocator(store, b_session)
    engine_a, engine_b = PolicyEngine(a), PolicyEngine(b)
    engine_a.apply(cnp(DB_FROM_WEB, "db"))
    engine_a.upsert_endpoint(ep("db", "app=db", "10.0.1.2"))
    engine_b.upsert_endpoint(ep("web", "app=web", "10.0.2.5"))
    web = engine_b.identity_of("web").id
    assert web >= 256 and a.lookup(pod("app=web")) is None  # a has not seen it yet
    a.start()  # a's mirror of the store's identities lists them
    try:
        engine_a.update_remote({NET("10.0.2.5/32"): web})
        assert db_ingress(engine_a) == {web}
        assert a.allocate(pod("app=web")).id == web
        assert ANY_IDENTITY not in db_ingress(engine_a)
    finally:
        a.stop()
        store.close()


def test_labels_that_arrive_after_the_address_make_the_peer_selectable() -> None:
    """The engine never reads the store itself (it is asked under the agent's lock): an identity
    the allocator's mirror has not delivered yet is unknown until ``refresh_remote``."""
    store = MemoryKVStore()
    a, b = ClusterAllocator(store, Session(store, "node-a")), ClusterAllocator(store, Session(store, "node-b"))
    engine_a = PolicyEngine(a)
    engine_a.apply(cnp(DB_FROM_WEB, "db"))
    engine_a.upsert_endpoint(ep("db", "app=db", "10.0.1.2"))
    web = b.allocate(pod("app=web")).id
    assert engine_a.update_remote({NET("10.0.2.5/32"): web}).endpoints == set()
    assert db_ingress(engine_a) == set()
    learned: list[list[int]] = []
    a.on_learned.append(learned.append)
    a.start()  # the mirror delivers the labels, and says which identities it learned
    try:
        assert web in [i for batch in learned for i in batch]
        assert engine_a.refresh_remote(web).endpoints == {"db"}
        assert db_ingress(engine_a) == {web}
        assert engine_a.refresh_remote(web).endpoints == set()
    finally:
        a.stop()
        store.close()

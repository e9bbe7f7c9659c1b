"""Delta xDS answers a subscription to a name that does not exist with removed_resources, so the
node need not wait for its fetch timeout (xDS spec, "Knowing When a Requested Resource Does Not
Exist"); in memory and against a real Envoy whose cluster would otherwise warm forever."""

from __future__ import annotations

from pathlib import Path

from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from tests.xds.xds_support import eds_cluster, running_envoy, wait_for

from cilia.xds.acks import AckTracker
from cilia.xds.cache import Cache
from cilia.xds.server import XdsServer
from cilia.xds.stream import DeltaDiscoveryRequest, DeltaDiscoveryResponse, DeltaStream
from cilia.xds.types import CLUSTER, ENDPOINT, LISTENER


def dreq(type_url: str, sub: tuple[str, ...] = (), unsub: tuple[str, ...] = (),
         nonce: str = "") -> DeltaDiscoveryRequest:
    r = DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=list(sub),
                              resource_names_unsubscribe=list(unsub), response_nonce=nonce)
    r.node.id = "n1"
    return r


def cla(name: str) -> endpoint_pb2.ClusterLoadAssignment:
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=name)


def names(resp: DeltaDiscoveryResponse) -> list[str]:
    return [r.name for r in resp.resources]


def test_missing_names_are_reported_once_and_sent_when_they_appear() -> None:
    cache = Cache(epoch="e")
    cache.upsert(ENDPOINT, "x", cla("x"))
    s = DeltaStream(cache, AckTracker(), None)
    [r1] = s.handle(dreq(ENDPOINT, sub=("x", "ghost")))
    assert (names(r1), list(r1.removed_resources)) == (["x"], ["ghost"])
    assert s.handle(dreq(ENDPOINT, nonce=r1.nonce)) == []  # the ACK: nothing new to say

    # A later subscription to another missing name gets its own answer, nothing else repeated.
    [r2] = s.handle(dreq(ENDPOINT, sub=("ghost2",)))
    assert (names(r2), list(r2.removed_resources)) == ([], ["ghost2"])
    s.handle(dreq(ENDPOINT, nonce=r2.nonce))
    cache.upsert(ENDPOINT, "x", cla("x2"))
    [r3] = s.on_change([ENDPOINT])
    assert (names(r3), list(r3.removed_resources)) == (["x"], [])

    # The resource springs into existence: it is sent.
    cache.upsert(ENDPOINT, "ghost", cla("ghost"))
    [r4] = s.on_change([ENDPOINT])
    assert (names(r4), list(r4.removed_resources)) == (["ghost"], [])
    # Deleted again: removed once.
    cache.delete(ENDPOINT, "ghost")
    [r5] = s.on_change([ENDPOINT])
    assert list(r5.removed_resources) == ["ghost"]
    cache.upsert(ENDPOINT, "x", cla("x3"))
    [r6] = s.on_change([ENDPOINT])
    assert list(r6.removed_resources) == []

    # Subscribing again to a name the node has, or to a missing one, is answered again.
    [r7] = s.handle(dreq(ENDPOINT, sub=("x", "ghost")))
    assert (names(r7), list(r7.removed_resources)) == (["x"], ["ghost"])


def test_unsubscribing_a_name_under_a_wildcard_is_answered() -> None:
    cache = Cache(epoch="e")
    lst = listener_pb2.Listener(name="a")
    cache.upsert(LISTENER, "a", lst)
    s = DeltaStream(cache, AckTracker(), None)
    [r1] = s.handle(dreq(LISTENER, sub=("*", "a", "b")))
    assert (names(r1), list(r1.removed_resources)) == (["a"], ["b"])
    # "a" is still covered by the wildcard: sent again; "b" is not: removed.
    [r2] = s.handle(dreq(LISTENER, unsub=("a", "b"), nonce=r1.nonce))
    assert (names(r2), list(r2.removed_resources)) == (["a"], ["b"])


def test_envoy_finishes_warming_a_cluster_whose_endpoints_do_not_exist(tmp_path: Path) -> None:
    cache, tracker = Cache(), AckTracker()
    server = XdsServer(cache, tracker)
    address = f"unix:{tmp_path}/xds.sock"
    server.add_address(address)
    server.start()
    try:
        ghost = eds_cluster("ghost")
        ghost.eds_cluster_config.eds_config.initial_fetch_timeout.SetInParent()  # 0 s: wait for EDS forever
        version = cache.upsert(CLUSTER, "ghost", ghost)
        with running_envoy(tmp_path, "node-g", address, delta=True) as envoy:
            tracker.wait("node-g", CLUSTER, version, timeout=10)
            state = wait_for("ghost cluster active", lambda: envoy.dynamic("clusters").get("ghost", {}).get(
                "active_state") and envoy.dynamic("clusters")["ghost"])
            assert "warming_state" not in state
    finally:
        server.stop(0)

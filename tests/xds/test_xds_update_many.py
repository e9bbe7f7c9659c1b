"""Atomic multi-type updates: one bump and one notice per changed type in ADS order, and revert."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

from cilia.xds.cache import Cache, TypeChange, version_key
from cilia.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE
from cilia.xds.acks import AckTracker
from cilia.xds.stream import DiscoveryRequest, SotwStream


def lst(name: str, port: int = 1) -> listener_pb2.Listener:
    msg = listener_pb2.Listener(name=name)
    msg.address.socket_address.port_value = port
    return msg


def cl(name: str, timeout: int = 1) -> cluster_pb2.Cluster:
    msg = cluster_pb2.Cluster(name=name)
    msg.connect_timeout.seconds = timeout
    return msg


def messages(cache: Cache, type_url: str) -> dict[str, bytes]:
    return {n: r.serialized for n, r in cache.view(type_url).resources.items()}


def test_one_bump_and_one_notice_per_changed_type_in_ads_order() -> None:
    cache = Cache(epoch="e")
    seen: list[str] = []
    cache.watch(seen.append)
    up = cache.update_many({
        ROUTE: TypeChange({"r": route_pb2.RouteConfiguration(name="r")}),
        LISTENER: TypeChange({"a": lst("a"), "b": lst("b")}),
        ENDPOINT: TypeChange(),  # nothing changes: no bump, no notice
        CLUSTER: TypeChange({"x": cl("x")}),
    })
    assert seen == [CLUSTER, LISTENER, ROUTE]
    assert dict(up.versions) == {ROUTE: "e-1", LISTENER: "e-1", ENDPOINT: "e-0", CLUSTER: "e-1"}
    # Equal content: nothing at all.
    seen.clear()
    again = cache.update_many({LISTENER: TypeChange({"a": lst("a")}), CLUSTER: TypeChange({"x": cl("x")})})
    assert seen == [] and again.versions[LISTENER] == "e-1"


def test_replace_deletes_others() -> None:
    cache = Cache(epoch="e")
    cache.update_many({LISTENER: TypeChange({"a": lst("a"), "b": lst("b")})})
    cache.update_many({LISTENER: TypeChange({"b": lst("b")}, replace=True)})
    assert set(messages(cache, LISTENER)) == {"b"}
    cache.update_many({LISTENER: TypeChange(delete=("b",))})
    assert messages(cache, LISTENER) == {}


def test_revert_restores_every_touched_type_with_new_versions() -> None:
    cache = Cache(epoch="e")
    cache.update_many({CLUSTER: TypeChange({"x": cl("x"), "y": cl("y")}),
                       LISTENER: TypeChange({"a": lst("a"), "b": lst("b")})})
    before = {t: messages(cache, t) for t in (CLUSTER, LISTENER)}
    old_versions = {t: cache.version(t) for t in (CLUSTER, LISTENER)}

    up = cache.update_many({
        CLUSTER: TypeChange({"x": cl("x", 2), "z": cl("z")}, replace=True),  # changes x, adds z, drops y
        LISTENER: TypeChange({"a": lst("a", 2)}, delete=("b",)),
    })
    assert set(messages(cache, CLUSTER)) == {"x", "z"} and set(messages(cache, LISTENER)) == {"a"}

    seen: list[str] = []
    cache.watch(seen.append)
    reverted = up.revert()
    assert seen == [CLUSTER, LISTENER]
    assert {t: messages(cache, t) for t in (CLUSTER, LISTENER)} == before
    for t in (CLUSTER, LISTENER):
        new, old, mid = version_key(reverted[t]), version_key(old_versions[t]), version_key(up.versions[t])
        assert new is not None and old is not None and mid is not None
        assert new[1] > mid[1] > old[1]  # a new version, never the old string again
        assert cache.version(t) == reverted[t]
    # Reverting twice changes nothing more.
    seen.clear()
    assert up.revert() == reverted and seen == []


def test_revert_keeps_later_changes_to_other_names() -> None:
    cache = Cache(epoch="e")
    cache.upsert(LISTENER, "a", lst("a"))
    up = cache.update_many({LISTENER: TypeChange({"a": lst("a", 2)})})
    cache.upsert(LISTENER, "c", lst("c"))  # someone else's change after ours
    up.revert()
    view = cache.view(LISTENER).resources
    assert set(view) == {"a", "c"}
    assert view["a"].message == lst("a")


def test_a_stream_sees_the_revert_as_an_update_and_the_tracker_needs_the_new_version() -> None:
    cache, tracker = Cache(epoch="e"), AckTracker()
    cache.upsert(LISTENER, "a", lst("a"))
    s = SotwStream(cache, tracker, None)
    req = DiscoveryRequest(type_url=LISTENER)
    req.node.id = "n"
    [r1] = s.handle(req)
    up = cache.update_many({LISTENER: TypeChange({"a": lst("a", 2)})})
    [r2] = s.on_change([LISTENER])
    reverted = up.revert()
    [r3] = s.on_change([LISTENER])
    assert r3.version_info == reverted[LISTENER] not in (r1.version_info, r2.version_info)
    assert r3.resources == r1.resources

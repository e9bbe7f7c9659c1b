"""Stream logic fed in-memory request sequences: nonces, ACK/NACK, stale nonces, delta, ordering."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3.discovery_pb2 import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DiscoveryRequest,
    DiscoveryResponse,
)
from google.rpc import status_pb2

from cilia.xds.acks import AckTracker
from cilia.xds.cache import Cache
from cilia.xds.stream import DeltaStream, SotwStream
from cilia.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE


def lst(name: str, port: int = 1) -> listener_pb2.Listener:
    msg = listener_pb2.Listener(name=name)
    msg.address.socket_address.port_value = port
    return msg


def eds_cluster(name: str, timeout: int = 1) -> cluster_pb2.Cluster:
    msg = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    msg.connect_timeout.seconds = timeout
    return msg


def req(
    type_url: str, nonce: str = "", version: str = "", names: tuple[str, ...] = (), error: str = ""
) -> DiscoveryRequest:
    r = DiscoveryRequest(type_url=type_url, response_nonce=nonce, version_info=version, resource_names=list(names))
    r.node.id = "n1"
    if error:
        r.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return r


def ack(resp: DiscoveryResponse, names: tuple[str, ...] = ()) -> DiscoveryRequest:
    return req(resp.type_url, resp.nonce, resp.version_info, names)


def names_of(resp: DiscoveryResponse) -> list[str]:
    out = []
    for a in resp.resources:
        msg = listener_pb2.Listener() if resp.type_url == LISTENER else cluster_pb2.Cluster()
        a.Unpack(msg)
        out.append(msg.name)
    return out


def test_sotw_first_request_gets_state_and_acks_are_recorded() -> None:
    cache, tracker = Cache(epoch="e"), AckTracker()
    v1 = cache.upsert(LISTENER, "a", lst("a"))
    s = SotwStream(cache, tracker, None)
    [r1] = s.handle(req(LISTENER))
    assert (r1.version_info, names_of(r1)) == (v1, ["a"])
    assert tracker.state("n1", LISTENER).sent == v1
    assert s.handle(ack(r1)) == []  # ACK: nothing to send
    assert tracker.state("n1", LISTENER).acked == v1

    v2 = cache.upsert(LISTENER, "b", lst("b"))
    [r2] = s.on_change([LISTENER])
    assert int(r2.nonce) > int(r1.nonce)
    assert (r2.version_info, names_of(r2)) == (v2, ["a", "b"])


def test_sotw_no_push_without_change() -> None:
    cache = Cache(epoch="e")
    cache.upsert(LISTENER, "a", lst("a"))
    s = SotwStream(cache, None, None)
    [r1] = s.handle(req(LISTENER))
    s.handle(ack(r1))
    cache.upsert(LISTENER, "a", lst("a"))
    assert s.on_change([LISTENER]) == []
    assert s.on_change() == []


def test_sotw_nack_is_not_resent_until_content_changes() -> None:
    cache, tracker = Cache(epoch="e"), AckTracker()
    v1 = cache.upsert(LISTENER, "a", lst("a"))
    s = SotwStream(cache, tracker, None)
    [r1] = s.handle(req(LISTENER))
    s.handle(ack(r1))
    v2 = cache.upsert(LISTENER, "a", lst("a", 2))
    [r2] = s.on_change([LISTENER])
    assert s.handle(req(LISTENER, r2.nonce, v1, error="bad listener")) == []
    st = tracker.state("n1", LISTENER)
    assert (st.acked, st.nacked, st.nack_message) == (v1, v2, "bad listener")
    assert s.on_change([LISTENER]) == []  # same content: not resent
    cache.upsert(CLUSTER, "x", eds_cluster("x"))
    assert s.on_change() == []
    v3 = cache.upsert(LISTENER, "a", lst("a", 3))
    [r3] = s.on_change([LISTENER])
    assert r3.version_info == v3


def test_sotw_stale_nonce_is_ignored() -> None:
    cache, tracker = Cache(epoch="e"), AckTracker()
    cache.upsert(LISTENER, "a", lst("a"))
    s = SotwStream(cache, tracker, None)
    [r1] = s.handle(req(LISTENER))
    v2 = cache.upsert(LISTENER, "a", lst("a", 2))
    [r2] = s.on_change([LISTENER])
    # A NACK of the older response arrives after r2 went out: ignored, no ack/nack recorded.
    assert s.handle(req(LISTENER, r1.nonce, error="old")) == []
    assert tracker.state("n1", LISTENER).nacked == ""
    assert s.handle(ack(r2)) == []
    assert tracker.state("n1", LISTENER).acked == v2


def test_sotw_reconnect_gets_current_state() -> None:
    cache = Cache(epoch="e")
    v1 = cache.upsert(LISTENER, "a", lst("a"))
    [r1] = SotwStream(cache, None, None).handle(req(LISTENER))
    # A new stream from the same Envoy: version known, nonce empty -> the full state again.
    [r2] = SotwStream(cache, None, None).handle(req(LISTENER, version=v1))
    assert r2.resources == r1.resources and r2.version_info == v1


def test_sotw_named_subscription_and_names_change() -> None:
    cache = Cache(epoch="e")
    cache.set(ENDPOINT, {n: endpoint_pb2.ClusterLoadAssignment(cluster_name=n) for n in ("x", "y")})
    s = SotwStream(cache, None, None)
    [r1] = s.handle(req(ENDPOINT, names=("x",)))
    assert len(r1.resources) == 1
    [r2] = s.handle(req(ENDPOINT, r1.nonce, r1.version_info, names=("x", "y")))
    assert len(r2.resources) == 2
    cache.upsert(ENDPOINT, "z", endpoint_pb2.ClusterLoadAssignment(cluster_name="z"))
    assert s.on_change() == []  # not subscribed to z


def test_sotw_ads_order_and_eds_after_cluster_change() -> None:
    cache = Cache(epoch="e")
    cache.upsert(CLUSTER, "x", eds_cluster("x"))
    cache.upsert(ENDPOINT, "x", endpoint_pb2.ClusterLoadAssignment(cluster_name="x"))
    cache.upsert(LISTENER, "l", lst("l"))
    s = SotwStream(cache, None, None)
    responses = s.handle(req(CLUSTER))
    responses += s.handle(req(ENDPOINT, names=("x",)))
    responses += s.handle(req(LISTENER))
    for r in responses:
        s.handle(ack(r, ("x",) if r.type_url == ENDPOINT else ()))
    s.handle(req(ROUTE, names=("r",)))
    cache.upsert(LISTENER, "l", lst("l", 2))
    cache.upsert(CLUSTER, "x", eds_cluster("x", 2))
    pushed = s.on_change()
    # The cluster goes first, and its endpoints are answered although they did not change.
    assert [r.type_url for r in pushed] == [CLUSTER, ENDPOINT, LISTENER]
    nonces = [int(r.nonce) for r in pushed]
    assert nonces == sorted(nonces)


def dreq(
    type_url: str, nonce: str = "", sub: tuple[str, ...] = (), unsub: tuple[str, ...] = (), **initial: str
) -> DeltaDiscoveryRequest:
    r = DeltaDiscoveryRequest(
        type_url=type_url,
        response_nonce=nonce,
        resource_names_subscribe=list(sub),
        resource_names_unsubscribe=list(unsub),
        initial_resource_versions=initial,
    )
    r.node.id = "n1"
    return r


def contents(r: DeltaDiscoveryResponse) -> tuple[list[str], list[str]]:
    return [x.name for x in r.resources], list(r.removed_resources)


def test_delta_sends_only_changes_and_removals() -> None:
    cache, tracker = Cache(epoch="e"), AckTracker()
    cache.set(LISTENER, {"a": lst("a"), "b": lst("b")})
    s = DeltaStream(cache, tracker, None)
    [r1] = s.handle(dreq(LISTENER))
    assert contents(r1) == (["a", "b"], [])
    assert s.handle(dreq(LISTENER, r1.nonce)) == []
    assert tracker.state("n1", LISTENER).acked == r1.system_version_info
    cache.update(LISTENER, {"b": lst("b", 2), "c": lst("c")}, delete=["a"])
    [r2] = s.on_change()
    assert contents(r2) == (["b", "c"], ["a"])
    assert int(r2.nonce) > int(r1.nonce)
    cache.upsert(LISTENER, "c", lst("c"))
    assert s.on_change() == []


def test_delta_initial_versions_and_subscriptions() -> None:
    cache = Cache(epoch="e")
    cache.set(ENDPOINT, {n: endpoint_pb2.ClusterLoadAssignment(cluster_name=n) for n in ("x", "y")})
    have = cache.view(ENDPOINT).resources["x"].version
    s = DeltaStream(cache, None, None)
    # Reconnect: the client already has x at the current version and a "gone" it should drop.
    [r1] = s.handle(dreq(ENDPOINT, sub=("x", "gone"), x=have, gone="old-1"))
    assert contents(r1) == ([], ["gone"])
    [r2] = s.handle(dreq(ENDPOINT, r1.nonce, sub=("y",)))
    assert contents(r2) == (["y"], [])
    assert s.handle(dreq(ENDPOINT, r2.nonce, unsub=("y",))) == []
    cache.upsert(ENDPOINT, "y", endpoint_pb2.ClusterLoadAssignment(cluster_name="y", endpoints=[{}]))
    assert s.on_change() == []  # unsubscribed


def test_delta_nack_not_resent_and_stale_nonce_ignored() -> None:
    cache, tracker = Cache(epoch="e"), AckTracker()
    cache.upsert(LISTENER, "a", lst("a"))
    s = DeltaStream(cache, tracker, None)
    [r1] = s.handle(dreq(LISTENER))
    v2 = cache.upsert(LISTENER, "a", lst("a", 2))
    [r2] = s.on_change()
    stale = dreq(LISTENER, r1.nonce)
    stale.error_detail.message = "old"
    assert s.handle(stale) == []
    assert tracker.state("n1", LISTENER).nacked == ""
    nack = dreq(LISTENER, r2.nonce)
    nack.error_detail.message = "bad"
    assert s.handle(nack) == []
    assert (tracker.state("n1", LISTENER).nacked, tracker.state("n1", LISTENER).nack_message) == (v2, "bad")
    assert s.on_change() == []


def test_delta_cluster_change_answers_its_endpoints() -> None:
    cache = Cache(epoch="e")
    cache.upsert(CLUSTER, "x", eds_cluster("x"))
    cache.upsert(ENDPOINT, "x", endpoint_pb2.ClusterLoadAssignment(cluster_name="x"))
    s = DeltaStream(cache, None, None)
    [c] = s.handle(dreq(CLUSTER))
    [e] = s.handle(dreq(ENDPOINT, sub=("x",)))
    s.handle(dreq(CLUSTER, c.nonce))
    s.handle(dreq(ENDPOINT, e.nonce))
    cache.upsert(CLUSTER, "x", eds_cluster("x", 2))
    pushed = s.on_change([CLUSTER])
    assert [(r.type_url, contents(r)) for r in pushed] == [(CLUSTER, (["x"], [])), (ENDPOINT, (["x"], []))]


def test_per_type_stream_ignores_other_types() -> None:
    cache = Cache(epoch="e")
    cache.upsert(LISTENER, "a", lst("a"))
    s = SotwStream(cache, None, CLUSTER)
    assert s.handle(req(LISTENER)) == []
    [r] = s.handle(req(""))  # per-type services may leave type_url empty
    assert r.type_url == CLUSTER and len(r.resources) == 0


def test_node_view_limits_what_a_stream_sees() -> None:
    cache = Cache(epoch="e")
    cache.set(LISTENER, {"a": lst("a"), "b": lst("b")})
    cache.set_node_view("n1", LISTENER, ["a"])
    tracker = AckTracker()
    s = SotwStream(cache, tracker, None)
    [r1] = s.handle(req(LISTENER))
    assert names_of(r1) == ["a"]
    s.handle(ack(r1))
    # Another node's resource changes: nothing to send, and n1 counts as up to date.
    v2 = cache.upsert(LISTENER, "b", lst("b", 2))
    assert s.on_change() == []
    tracker.wait("n1", LISTENER, v2, timeout=0)

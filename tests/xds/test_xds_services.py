"""The per-type services (LDS, CDS, ...) over real gRPC on a UNIX socket, without ADS."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
from envoy.config.listener.v3 import listener_pb2
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import DeltaDiscoveryRequest, DiscoveryRequest
from envoy.service.listener.v3 import lds_pb2_grpc

from cilia.xds.acks import AckTracker
from cilia.xds.cache import Cache
from cilia.xds.server import XdsServer
from cilia.xds.types import CLUSTER, LISTENER


def requests(q: queue.Queue[object]) -> Iterator[object]:
    while (item := q.get()) is not None:
        yield item


def test_lds_and_cds_streams(tmp_path: Path) -> None:
    cache, tracker = Cache(), AckTracker()
    v1 = cache.upsert(LISTENER, "a", listener_pb2.Listener(name="a"))
    server = XdsServer(cache, tracker)
    address = f"unix:{tmp_path}/xds.sock"
    server.add_address(address)
    server.start()
    channel = grpc.insecure_channel(address)
    try:
        q: queue.Queue[object] = queue.Queue()
        first = DiscoveryRequest(type_url=LISTENER)
        first.node.id = "client"
        q.put(first)
        responses = lds_pb2_grpc.ListenerDiscoveryServiceStub(channel).StreamListeners(requests(q), timeout=10)
        r1 = next(responses)
        assert (r1.type_url, r1.version_info, len(r1.resources)) == (LISTENER, v1, 1)
        q.put(DiscoveryRequest(type_url=LISTENER, version_info=v1, response_nonce=r1.nonce))
        tracker.wait("client", LISTENER, v1, timeout=10)
        v2 = cache.upsert(LISTENER, "b", listener_pb2.Listener(name="b"))
        r2 = next(responses)
        assert (r2.version_info, len(r2.resources)) == (v2, 2)
        q.put(None)

        dq: queue.Queue[object] = queue.Queue()
        delta_first = DeltaDiscoveryRequest(type_url=CLUSTER)
        delta_first.node.id = "client"
        dq.put(delta_first)
        delta = cds_pb2_grpc.ClusterDiscoveryServiceStub(channel).DeltaClusters(requests(dq), timeout=10)
        d1 = next(delta)
        assert (d1.type_url, list(d1.resources)) == (CLUSTER, [])
        dq.put(None)
    finally:
        channel.close()
        server.stop(0)

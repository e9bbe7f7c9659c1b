"""grpcio server for ADS and the per-type discovery services (LDS, RDS, CDS, EDS, SDS).

The servicer only moves messages: each stream gets a SotwStream or DeltaStream, fed
from one queue that holds both the client's requests and the cache's change notices,
so the stream logic runs on one thread and never under the cache's lock.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from cilia.xds.grpcserver import GrpcServer
from cilia.xds.cache import Cache
from cilia.xds.stream import (
    DeltaDiscoveryRequest,
    DeltaDiscoveryResponse,
    DeltaStream,
    DiscoveryRequest,
    DiscoveryResponse,
    Observer,
    SotwStream,
)
from cilia.xds.types import CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET

# gRPC service name -> (SotW method, delta method, type URL or None for ADS)
SERVICES: dict[str, tuple[str, str, str | None]] = {
    "envoy.service.discovery.v3.AggregatedDiscoveryService": (
        "StreamAggregatedResources",
        "DeltaAggregatedResources",
        None,
    ),
    "envoy.service.listener.v3.ListenerDiscoveryService": ("StreamListeners", "DeltaListeners", LISTENER),
    "envoy.service.route.v3.RouteDiscoveryService": ("StreamRoutes", "DeltaRoutes", ROUTE),
    "envoy.service.cluster.v3.ClusterDiscoveryService": ("StreamClusters", "DeltaClusters", CLUSTER),
    "envoy.service.endpoint.v3.EndpointDiscoveryService": ("StreamEndpoints", "DeltaEndpoints", ENDPOINT),
    "envoy.service.secret.v3.SecretDiscoveryService": ("StreamSecrets", "DeltaSecrets", SECRET),
}

_END = object()


class XdsServer(GrpcServer):
    """Serves one Cache to many Envoys over TCP (``host:port``) and UNIX (``unix:PATH``) addresses.

    Each open stream takes a server thread and a reader thread; ``max_streams`` bounds the open
    streams (an Envoy using ADS opens one). bench/xds_fanout.py measures 1,000 streams.
    """

    def __init__(self, cache: Cache, observer: Observer | None = None, max_streams: int = 2048) -> None:
        self.cache = cache
        self.observer = observer
        super().__init__([self._service(name, *methods) for name, methods in SERVICES.items()],
                         max_streams, "xds")

    def _service(self, service: str, sotw: str, delta: str, type_url: str | None) -> grpc.GenericRpcHandler:
        def sotw_rpc(requests: Iterator[DiscoveryRequest], context: grpc.ServicerContext) -> Iterator[Any]:
            return self._run(SotwStream(self.cache, self.observer, type_url), requests, context)

        def delta_rpc(requests: Iterator[DeltaDiscoveryRequest], context: grpc.ServicerContext) -> Iterator[Any]:
            return self._run(DeltaStream(self.cache, self.observer, type_url), requests, context)

        return grpc.method_handlers_generic_handler(
            service,
            {
                sotw: grpc.stream_stream_rpc_method_handler(
                    sotw_rpc,
                    request_deserializer=DiscoveryRequest.FromString,
                    response_serializer=DiscoveryResponse.SerializeToString,
                ),
                delta: grpc.stream_stream_rpc_method_handler(
                    delta_rpc,
                    request_deserializer=DeltaDiscoveryRequest.FromString,
                    response_serializer=DeltaDiscoveryResponse.SerializeToString,
                ),
            },
        )

    def _run(
        self, logic: SotwStream | DeltaStream, requests: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        events: queue.SimpleQueue[object] = queue.SimpleQueue()

        def read() -> None:
            try:
                for req in requests:
                    events.put(req)
            except grpc.RpcError:
                pass  # the stream was cancelled or broke; the server side ends below
            finally:
                events.put(_END)

        add_callback: Callable[[Callable[[], None]], bool] = context.add_callback
        add_callback(lambda: events.put(_END))
        cancel_watch = self.cache.watch(events.put)  # type URLs arrive as str
        threading.Thread(target=read, name="xds-read", daemon=True).start()
        try:
            while True:
                event = events.get()
                if event is _END:
                    return
                if isinstance(event, str):
                    yield from logic.on_change([event])
                else:
                    yield from logic.handle(event)
        finally:
            cancel_watch()

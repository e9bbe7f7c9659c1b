"""grpcio server for ADS and the per-type discovery services (LDS, RDS, CDS, EDS, SDS).

The servicer only moves messages: each stream gets a SotwStream or DeltaStream, fed
from one queue that holds both the client's requests and the cache's change notices,
so the stream logic runs on one thread and never under the cache's lock.

Who may speak for which node (the transport proves it, the request only names it):
- ``unix:PATH``: the socket is mode 0600 (0660 with a group), so the kernel admits only the
  server's user, root and the group (see cilia.xds.sockets for why not SO_PEERCRED); those are
  trusted with any node id they name.
- ``HOST:PORT`` with ``ServerTls``: mutual TLS. The client certificate, signed by the given CA,
  is required, and its subject Common Name is the node id: a request naming another node ends
  the stream with PERMISSION_DENIED. The CN, not a SAN, because node ids are plain names
  ("cilia-node", an endpoint's name), neither DNS names nor URIs, and CN is what every CA tool sets
  (Kubernetes client certificates name their user the same way).
- ``HOST:PORT`` without TLS only with ``insecure=True``: anyone who can reach the port may name
  any node. Refused otherwise.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
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
    IdentityError,
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
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerTls:
    """PEM files for mutual TLS: the server's certificate and key, and the CA that signs clients."""

    cert: Path
    key: Path
    ca: Path

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate signed by ``ca``."""
        pem: dict[str, bytes] = {}
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            try:
                pem[what] = Path(path).read_bytes()
            except OSError as e:
                raise ValueError(f"xDS TLS {what} {path}: {e.strerror or e}") from None
            if b"-----BEGIN " not in pem[what]:
                raise ValueError(f"xDS TLS {what} {path}: not a PEM file")
        return grpc.ssl_server_credentials([(pem["key"], pem["certificate"])], root_certificates=pem["CA"],
                                           require_client_auth=True)


def certificate_node(context: grpc.ServicerContext) -> str | None:
    """The node id a TLS client's certificate proves (its subject CN); None on a plaintext
    transport. Raises IdentityError for a certificate without exactly one CN."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    names: list[bytes] = auth.get("x509_common_name", [])
    if len(names) != 1 or not names[0]:
        raise IdentityError("the client certificate must name the node in exactly one subject CN")
    return names[0].decode()


class XdsServer(GrpcServer):
    """Serves one Cache to many Envoys over TCP (``host:port``) and UNIX (``unix:PATH``) addresses.

    Each open stream takes a server thread and a reader thread; ``max_streams`` bounds the open
    streams (an Envoy using ADS opens one). bench/xds_fanout.py measures 1,000 streams.
    """

    def __init__(self, cache: Cache, observer: Observer | None = None, max_streams: int = 2048, *,
                 known_nodes: Callable[[str], bool] | None = None) -> None:
        """``known_nodes``: the node ids to serve; any other node gets no resources (None: all)."""
        self.cache = cache
        self.observer = observer
        self.known_nodes = known_nodes
        super().__init__([self._service(name, *methods) for name, methods in SERVICES.items()],
                         max_streams, "xds")

    def add_address(self, address: str, *, credentials: grpc.ServerCredentials | None = None,
                    group: int | None = None, tls: ServerTls | None = None, insecure: bool = False) -> int:
        """Serve on ``address``: ``unix:PATH`` (mode 0600, or 0660 with ``group``), or ``HOST:PORT``
        with mutual ``tls``, or plaintext TCP only with ``insecure=True``."""
        if tls is not None:
            credentials = tls.credentials()
        elif credentials is None and not address.startswith("unix:") and not insecure:
            raise ValueError(f"xDS on TCP address {address} needs mutual TLS (a certificate, its key and the CA of "
                             "client certificates); plaintext TCP lets anyone who reaches the port name any node "
                             "and must be chosen explicitly (insecure)")
        return super().add_address(address, credentials=credentials, group=group)

    def _service(self, service: str, sotw: str, delta: str, type_url: str | None) -> grpc.GenericRpcHandler:
        def sotw_rpc(requests: Iterator[DiscoveryRequest], context: grpc.ServicerContext) -> Iterator[Any]:
            return self._run(SotwStream, type_url, requests, context)

        def delta_rpc(requests: Iterator[DeltaDiscoveryRequest], context: grpc.ServicerContext) -> Iterator[Any]:
            return self._run(DeltaStream, type_url, requests, context)

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

    def _run(self, kind: type[SotwStream] | type[DeltaStream], type_url: str | None, requests: Iterator[Any],
             context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            identity = certificate_node(context)
        except IdentityError as e:
            _log.warning("xDS stream from %s refused: %s", context.peer(), e)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        logic = kind(self.cache, self.observer, type_url, identity=identity, known_nodes=self.known_nodes)
        try:
            yield from self._serve(logic, requests, context)
        except IdentityError as e:
            _log.warning("xDS stream from %s refused: %s", context.peer(), e)
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(e))
        finally:
            logic.close()

    def _serve(
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

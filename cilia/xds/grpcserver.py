"""A grpcio server on TCP (``host:port``) or UNIX (``unix:PATH``) addresses.

Shared by the xDS server and the agent's Envoy-facing services. Every open
stream holds one worker thread for its lifetime, so ``max_streams`` bounds how
many streams can be served at once. Threads are started only as streams open, so a
high bound costs nothing until it is used; a stream beyond it is refused at once with
RESOURCE_EXHAUSTED (the client retries) rather than left waiting for a free thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures

import grpc


class GrpcServer:
    def __init__(self, handlers: Sequence[grpc.GenericRpcHandler], max_streams: int, name: str) -> None:
        self.max_streams = max_streams
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix=name),
                                   maximum_concurrent_rpcs=max_streams)
        self._server.add_generic_rpc_handlers(list(handlers))

    def add_address(self, address: str) -> int:
        """Listen on ``address``; returns the bound port (useful with ``127.0.0.1:0``)."""
        port: int = self._server.add_insecure_port(address)
        if not port and not address.startswith("unix:"):
            raise OSError(f"cannot listen on {address}")
        return port

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; open streams are cancelled."""
        self._server.stop(grace).wait()

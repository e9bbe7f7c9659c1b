"""A grpcio server on TCP (``host:port``) or UNIX (``unix:PATH``) addresses.

Shared by the xDS server and the agent's Envoy-facing services. Every open
stream holds one worker thread for its lifetime, so ``max_streams`` bounds how
many streams can be served at once. Threads are started only as streams open, so a
high bound costs nothing until it is used; a stream beyond it is refused at once with
RESOURCE_EXHAUSTED (the client retries) rather than left waiting for a free thread.

UNIX sockets get mode 0600 (0660 with a group) whatever the umask: see cilia.xds.sockets.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent import futures
from pathlib import Path

import grpc

from cilia.xds.sockets import bind_unix


class GrpcServer:
    def __init__(self, handlers: Sequence[grpc.GenericRpcHandler], max_streams: int, name: str) -> None:
        self.max_streams = max_streams
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_streams, thread_name_prefix=name),
                                   maximum_concurrent_rpcs=max_streams)
        self._server.add_generic_rpc_handlers(list(handlers))
        self._unix_paths: list[tuple[Path, int]] = []  # with the inode bound, to remove only our own

    def add_address(self, address: str, *, credentials: grpc.ServerCredentials | None = None,
                    group: int | None = None) -> int:
        """Listen on ``address``; returns the bound port (useful with ``127.0.0.1:0``).

        ``credentials``: TLS (or other) server credentials, else plaintext. ``group``: a UNIX
        socket gets mode 0660 and this group instead of 0600."""
        def listen(addr: str) -> int:
            port: int = (self._server.add_insecure_port(addr) if credentials is None
                         else self._server.add_secure_port(addr, credentials))
            return port

        if address.startswith("unix:"):
            path = Path(address.removeprefix("unix:"))
            port = bind_unix(path, lambda staging: listen(f"unix:{staging}"), group)
            self._unix_paths.append((path, path.stat().st_ino))
            return port
        port = listen(address)
        if not port:
            raise OSError(f"cannot listen on {address}")
        return port

    def start(self) -> None:
        self._server.start()

    def stop(self, grace: float | None = None) -> None:
        """Stop serving; open streams are cancelled."""
        self._server.stop(grace).wait()
        for path, inode in self._unix_paths:  # grpcio removes only the path it bound, the staging one
            try:
                if path.stat().st_ino == inode:
                    path.unlink()
            except FileNotFoundError:
                pass
        self._unix_paths.clear()

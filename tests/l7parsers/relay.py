"""A TCP relay that runs every connection through a sans-I/O L7 parser, as Envoy's network
ext_proc filter does with the agent's service: the test harness that puts real clients and real
servers on either side of a parser before Envoy is involved.

Each accepted connection gets its own parser from ``factory``; bytes from the client go to
``receive_client``, bytes from the server to ``receive_server``, and the outputs are written to
each side. ``chunk`` > 0 feeds the parser pieces of at most that many bytes (1: every byte
boundary of real traffic). A ProtocolError closes both sockets and is kept in ``errors``;
``records`` collects every decided request.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from cilia.l7parsers.base import L7Connection, Output, ProtocolError, Record

from tests.l7parsers.byte_feed import chunked, feed


class Relay:
    def __init__(self, upstream: tuple[str, int], factory: Callable[[], L7Connection], chunk: int = 0) -> None:
        self.upstream = upstream
        self.factory = factory
        self.chunk = chunk
        self.records: list[Record] = []
        self.errors: list[ProtocolError] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self) -> Relay:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __enter__(self) -> Relay:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() that close() alone would not
        except OSError:
            pass
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            conn = self.factory()
            lock = threading.Lock()
            with self._lock:
                self._sockets += [client, server]
            for src, is_client in ((client, True), (server, False)):
                t = threading.Thread(target=self._pump, args=(conn, lock, src, client, server, is_client),
                                     daemon=True)
                t.start()
                self._threads.append(t)

    def _feed(self, conn: L7Connection, is_client: bool, data: bytes) -> Output:
        # b"" (the peer closed) is passed on as it is: end of stream is an event for the parser
        return feed(conn, chunked(data, self.chunk) if data else data, "client" if is_client else "server")

    def _pump(self, conn: L7Connection, lock: threading.Lock, src: socket.socket, client: socket.socket,
              server: socket.socket, is_client: bool) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            try:
                with lock:
                    out = self._feed(conn, is_client, data)
                    self.records.extend(out.records)
                    if out.to_server:
                        server.sendall(out.to_server)
                    if out.to_client:
                        client.sendall(out.to_client)
            except ProtocolError as e:
                self.errors.append(e)
                for s in (client, server):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                return
            except OSError:
                return
            if not data:
                other = server if is_client else client
                try:
                    other.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return

"""The test servers: an HTTP server (``/public`` and ``/private`` both answer 200: only policy
tells them apart) and TCP echo servers on one address, in threads of the test's own process
(their sockets made inside the server endpoint's namespace with the BPF datapath)."""

from __future__ import annotations

import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class _Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.path.encode() + b"\n"
        self.send_response(200 if self.path in ("/public", "/private") else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's signature)
        pass


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline(1024)
        self.wfile.write(line)


class _Quiet:
    """A peer that resets (a proxy closing a denied connection) is expected here, not an error."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


class _EchoServer(_Quiet, socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _HttpServer(_Quiet, ThreadingHTTPServer):
    pass


def serve(ip: str, http_port: int, echo_ports: list[int]) -> list[socketserver.BaseServer]:
    """Start the servers in threads; returns them (``shutdown()`` each to stop)."""
    servers: list[socketserver.BaseServer] = [_HttpServer((ip, http_port), _Http)]
    servers += [_EchoServer((ip, p), _Echo) for p in echo_ports]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    return servers

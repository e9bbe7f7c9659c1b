"""Runs inside a test's network namespace (``ip netns exec NS python -m tests.envoy.envoy_node_driver``).

The test process stays in its own namespace and drives this one over stdin/stdout, one JSON
object per line each way:

- ``{"op": "backend", "port": 80}``: an HTTP server on 0.0.0.0:port answering
  ``<local ip> <method> <path>`` with 200;
- ``{"op": "publish", "listeners": [...], "clusters": [...]}`` (base64 serialized protos): start
  a LoopbackEnvoy on the first call, publish afterwards; answers once Envoy acked;
- ``{"op": "http", "source": ip, "host": ip, "port": n, "method": m, "path": p}``: one request
  bound to ``source``; answers ``{"status", "body"}``, or ``{"closed": why}`` when the connection
  was accepted and then closed without a response, or ``{"connect_error": why}``;
- ``{"op": "quit"}``: stop everything and exit.

Everything started here ends with this process, so the test only has to stop it.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

from cilia.envoy.loopback import LoopbackEnvoy
from cilia.envoy.translate import ProxyResources


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        data = f"{self.connection.getsockname()[0]} {self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base)
        pass


def request(cmd: dict[str, Any]) -> dict[str, Any]:
    sock = socket.socket()
    sock.settimeout(5)
    try:
        sock.bind((cmd["source"], 0))
        sock.connect((cmd["host"], cmd["port"]))
    except OSError as err:
        sock.close()
        return {"connect_error": repr(err)}
    conn = http.client.HTTPConnection(cmd["host"], cmd["port"], timeout=5)
    conn.sock = sock  # already connected from the right source
    try:
        conn.request(cmd["method"], cmd["path"], headers={"Host": "server.test"})
        resp = conn.getresponse()
        return {"status": resp.status, "body": resp.read().decode()}
    except (ConnectionError, http.client.RemoteDisconnected) as err:
        return {"closed": repr(err)}
    finally:
        conn.close()


def resources(cmd: dict[str, Any]) -> ProxyResources:
    return ProxyResources(
        tuple(listener_pb2.Listener.FromString(base64.b64decode(b)) for b in cmd["listeners"]),
        tuple(cluster_pb2.Cluster.FromString(base64.b64decode(b)) for b in cmd["clusters"]))


def main() -> None:
    envoy: LoopbackEnvoy | None = None
    servers: list[ThreadingHTTPServer] = []
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                if cmd["op"] == "quit":
                    break
                if cmd["op"] == "backend":
                    server = ThreadingHTTPServer(("0.0.0.0", cmd["port"]), Echo)
                    server.daemon_threads = True
                    threading.Thread(target=server.serve_forever, daemon=True).start()
                    servers.append(server)
                    reply: dict[str, Any] = {"ok": True}
                elif cmd["op"] == "publish":
                    if envoy is None:
                        envoy = LoopbackEnvoy("node")
                        envoy.start(resources(cmd))
                    else:
                        envoy.publish(resources(cmd))
                    reply = {"ok": True}
                elif cmd["op"] == "http":
                    reply = request(cmd)
                else:
                    reply = {"error": f"unknown op {cmd['op']!r}"}
            except Exception:  # the test shows it; this process keeps serving
                reply = {"error": traceback.format_exc()}
            print(json.dumps(reply), flush=True)
    finally:
        if envoy is not None:
            envoy.stop()
        for server in servers:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    main()

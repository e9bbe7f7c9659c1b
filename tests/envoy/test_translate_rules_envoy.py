"""HTTP rule fields, longest-prefix identities and gRPC through a real Envoy fed by translate_ingress.

Envoy listens on 127.0.0.20 for the ``api`` endpoint. Unknown sources (127.0.0.1) are ``world``;
127.0.0.21 is an ``admin`` endpoint and 127.0.0.22 a ``stranger`` endpoint with identities of
their own, so 0.0.0.0/0 (world) covers them but must not decide for them.
"""

from __future__ import annotations

import http.client
import ipaddress
import threading
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from tests.envoy.envoy_support import envoy_serving

from cilia.netutil import free_port
from cilia.envoy.translate import PortMapping, prefixes_by_identity, translate_ingress
from cilia.policy import Endpoint, LabelSet, PolicyEngine, parse_text

API, ADMIN, STRANGER, WORLD = "127.0.0.20", "127.0.0.21", "127.0.0.22", "127.0.0.1"

POLICY = r"""
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: api}
spec:
  endpointSelector: {matchLabels: {app: api}}
  ingress:
  - fromEntities: [world]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http:
        - method: GET
          path: '/public/.*'
          host: 'api\.example\.com'
        - method: GET
          path: /private
          headers: ["X-Token: s3cret", X-Trace]
    - ports: [{port: "50051", protocol: TCP}]
      rules:
        http:
        - method: POST
          path: '/pkg\.Service/Allowed'
  - fromEndpoints: [{matchLabels: {app: admin}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
"""


class Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        data = f"ok {self.command} {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET  # noqa: N815
    do_DELETE = do_GET  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base)
        pass


def _pong(request: bytes, context: grpc.ServicerContext) -> bytes:
    return b"pong:" + request


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """(HTTP port, gRPC port) on Envoy at API; backends on 127.0.0.1."""
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("pkg.Service", {
        "Allowed": grpc.unary_unary_rpc_method_handler(_pong),
        "Denied": grpc.unary_unary_rpc_method_handler(_pong),
    })])
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        engine = PolicyEngine()
        for name, labels, ip in (("api", "app=api", API), ("admin", "app=admin", ADMIN),
                                 ("stranger", "app=stranger", STRANGER)):
            engine.upsert_endpoint(Endpoint(name, LabelSet.parse(labels), (ipaddress.ip_address(ip),)))
        result = parse_text(POLICY, "api.yaml")
        assert result.ok, [str(p) for p in result.problems]
        engine.apply(result.policies)
        http_port, rpc_port = free_port(API), free_port(API)
        res = translate_ingress(
            "api", engine.endpoint_policy("api").map_state.ingress,
            [PortMapping(80, http_port, backend.server_address[1]), PortMapping(50051, rpc_port, grpc_port)],
            API, "127.0.0.1", prefixes_by_identity(engine.ipcache.items()))
        assert res.notes == ()
        with envoy_serving(res):
            yield http_port, rpc_port
    finally:
        grpc_server.stop(0)
        backend.shutdown()
        backend.server_close()


def request(port: int, source: str, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection(API, port, timeout=5, source_address=(source, 0))
    try:
        conn.request(method, path, headers={"Host": "api.example.com", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_http_rule_fields_are_anded_and_rules_ored(api: tuple[int, int]) -> None:
    port, _ = api
    assert request(port, WORLD, "GET", "/public/a") == (200, "ok GET /public/a")
    assert request(port, WORLD, "GET", "/public/a", {"Host": "evil.example.com"}) == (403, "Access denied\r\n")
    assert request(port, WORLD, "POST", "/public/a")[0] == 403
    assert request(port, WORLD, "GET", "/private", {"X-Token": "s3cret", "X-Trace": "1"})[0] == 200
    assert request(port, WORLD, "GET", "/private", {"X-Token": "s3cret"})[0] == 403  # X-Trace missing
    assert request(port, WORLD, "GET", "/private", {"X-Token": "guess", "X-Trace": "1"})[0] == 403
    assert request(port, WORLD, "GET", "/privateX", {"X-Token": "s3cret", "X-Trace": "1"})[0] == 403


def test_identity_is_the_longest_prefix_so_world_does_not_cover_endpoints(api: tuple[int, int]) -> None:
    port, rpc_port = api
    # admin: an L3/L4 allow on the L7 port, so every request passes.
    assert request(port, ADMIN, "DELETE", "/anything") == (200, "ok DELETE /anything")
    # stranger lies inside world's 0.0.0.0/0 but has its own identity, allowed nowhere.
    with pytest.raises(ConnectionError):
        request(port, STRANGER, "GET", "/public/a")
    # admin is allowed on port 80 only: the gRPC port closes on it too.
    with pytest.raises(ConnectionError):
        request(rpc_port, ADMIN, "POST", "/pkg.Service/Allowed")


def test_grpc_methods_are_allowed_by_path_over_http2(api: tuple[int, int]) -> None:
    _, rpc_port = api
    with grpc.insecure_channel(f"{API}:{rpc_port}") as channel:
        assert channel.unary_unary("/pkg.Service/Allowed")(b"ping", timeout=5) == b"pong:ping"
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/pkg.Service/Denied")(b"ping", timeout=5)
        assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED


def test_forwarded_for_does_not_change_the_source_identity(api: tuple[int, int]) -> None:
    port, _ = api
    # A world client claiming to be admin through X-Forwarded-For stays world.
    assert request(port, WORLD, "DELETE", "/anything", {"X-Forwarded-For": ADMIN})[0] == 403
    assert request(port, WORLD, "DELETE", "/anything", {"X-Forwarded-For": f"{ADMIN}, {ADMIN}"})[0] == 403

"""A real Envoy that sends its access logs to a test AccessLogServer.

Static bootstrap: admin, a cluster ``als`` (HTTP/2) pointing at the gRPC receiver, and an HTTP
listener whose RBAC filter denies ``/forbidden`` (policy ``deny-forbidden``) and whose routes answer
``/ok`` (route ``ok-route``) with a direct 200 and anything else with 404; a set_metadata filter
after RBAC names rule ``ALLOW_RULE`` in dynamic metadata ``cilia``. Its access log goes to ``als`` with log name
``LOG_NAME`` and a short flush interval, so records show up within milliseconds.
"""

from __future__ import annotations

import http.client
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cilia.envoy.accesslog import AccessLogReceiver, AccessLogServer, serve
from cilia.envoy.supervisor import EnvoySupervisor
from cilia.netutil import free_port

from tests.envoy.envoy_support import StaticEnvoy, grpc_cluster, supervised

LOG_NAME = "ingress-http"
DENY_POLICY = "deny-forbidden"
ALLOW_RULE = "allow-rest"  # cilia/rule in dynamic metadata of every request RBAC let through


def als_bootstrap_yaml(admin_port: int, listener_port: int, als_port: int) -> str:
    return f"""\
node: {{id: als-test, cluster: als-test}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  clusters:
{grpc_cluster("als", als_port)}  listeners:
  - name: ingress
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listener_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          access_log:
          - name: envoy.access_loggers.http_grpc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig
              common_config:
                log_name: {LOG_NAME}
                transport_api_version: V3
                buffer_flush_interval: 0.05s
                grpc_service: {{envoy_grpc: {{cluster_name: als}}}}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: DENY
                policies:
                  {DENY_POLICY}:
                    permissions: [{{url_path: {{path: {{exact: /forbidden}}}}}}]
                    principals: [{{any: true}}]
          - name: envoy.filters.http.set_metadata  # after RBAC: only requests RBAC let through
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config
              metadata:
              - metadata_namespace: cilia
                value: {{rule: {ALLOW_RULE}}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - name: ok-route
                match: {{path: /ok}}
                direct_response: {{status: 200, body: {{inline_string: "ok\\n"}}}}
              - name: other
                match: {{prefix: /}}
                direct_response: {{status: 404, body: {{inline_string: "nope\\n"}}}}
"""


@dataclass(frozen=True)
class AlsEnvoy:
    """A running Envoy and the receiver its access logs reach."""

    receiver: AccessLogReceiver
    server: AccessLogServer
    envoy: EnvoySupervisor
    listener_port: int


@contextmanager
def als_envoy(tmp: Path, receiver: AccessLogReceiver) -> Iterator[AlsEnvoy]:
    """Start the receiver on a free loopback port and an Envoy logging to it; both are stopped
    (Envoy by its PID, through the supervisor) however the test ends."""
    server, als_port = serve("127.0.0.1:0", receiver)
    try:
        admin_port, listener_port = free_port(), free_port()
        env = StaticEnvoy(tmp / "bootstrap.yaml", tmp / "envoy.log", admin_port, listener_port)
        env.bootstrap.write_text(als_bootstrap_yaml(admin_port, listener_port, als_port))
        with supervised(env, use_dynamic_base_id=True, concurrency=1, extra_args=["--disable-hot-restart"]) as sup:
            yield AlsEnvoy(receiver, server, sup, listener_port)
    finally:
        server.stop(None)


def request(port: int, method: str, path: str, host: str = "example.test") -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path, headers={"Host": host})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


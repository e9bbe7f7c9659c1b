"""Helpers for the Envoy tests: free ports, a minimal static bootstrap, and process checks.

The bootstrap here is deliberately tiny and static (admin plus one listener answering with a
direct_response), so these tests depend on nothing but the Envoy binary.
"""

from __future__ import annotations

import http.client
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cilia.envoy.supervisor import Backoff, EnvoySupervisor

GREETING = "hello from envoy"


def free_port() -> int:
    """A loopback TCP port the OS just handed out (free now; Envoy binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bootstrap_yaml(admin_port: int, listener_port: int, *, extra_hcm_field: str = "") -> str:
    """Admin on ``admin_port``; listener ``direct`` answers every request with GREETING."""
    return f"""\
node: {{id: cilia-test, cluster: cilia-test}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: direct
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listener_port}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: direct
          {extra_hcm_field}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 200, body: {{inline_string: "{GREETING}\\n"}}}}
"""


def never_ready_bootstrap_yaml(admin_port: int, xds_port: int) -> str:
    """Listeners come from an xDS server on ``xds_port`` that does not exist, and the initial
    fetch never times out: Envoy stays INITIALIZING and /ready never says LIVE."""
    return f"""\
node: {{id: cilia-test, cluster: cilia-test}}
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
dynamic_resources:
  lds_config:
    initial_fetch_timeout: 0s
    resource_api_version: V3
    api_config_source:
      api_type: GRPC
      transport_api_version: V3
      grpc_services: [{{envoy_grpc: {{cluster_name: xds}}}}]
static_resources:
  clusters:
  - name: xds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: xds
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {xds_port}}}}}}}
"""


@dataclass(frozen=True)
class StaticEnvoy:
    """Where a test's Envoy lives: bootstrap file, log file, admin and listener ports."""

    bootstrap: Path
    log: Path
    admin_port: int
    listener_port: int

    @property
    def admin_address(self) -> str:
        return f"127.0.0.1:{self.admin_port}"


def static_envoy(tmp: Path) -> StaticEnvoy:
    admin_port, listener_port = free_port(), free_port()
    bootstrap = tmp / "bootstrap.yaml"
    bootstrap.write_text(bootstrap_yaml(admin_port, listener_port))
    return StaticEnvoy(bootstrap, tmp / "envoy.log", admin_port, listener_port)


FAST_BACKOFF = Backoff(initial=0.05, maximum=0.2, multiplier=2.0, reset_after=60.0)


@contextmanager
def supervised(env: StaticEnvoy, **kwargs: object) -> Iterator[EnvoySupervisor]:
    """A started supervisor that is stopped (and its Envoy gone) however the test ends."""
    kwargs.setdefault("backoff", FAST_BACKOFF)
    sup = EnvoySupervisor(env.bootstrap, env.admin_address, log_path=env.log, **kwargs)  # type: ignore[arg-type]
    try:
        sup.start()
        yield sup
    finally:
        sup.stop()


def http_get(port: int, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def process_exists(pid: int) -> bool:
    """True while ``pid`` names any process, zombies included (a reaped child is gone)."""
    return os.path.exists(f"/proc/{pid}")

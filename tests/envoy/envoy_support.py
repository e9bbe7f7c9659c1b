"""Helpers for the Envoy tests: free ports, a minimal static bootstrap, and process checks.

The bootstrap here is deliberately tiny and static (admin plus one listener answering with a
direct_response), so these tests depend on nothing but the Envoy binary.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
from collections.abc import Callable, Iterator
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


def bootstrap_yaml(admin_port: int, listener_port: int, *, extra_hcm_field: str = "",
                   admin_socket: Path | None = None) -> str:
    """Admin on ``admin_port`` (on ``admin_socket`` if given, mode 0600); listener ``direct``
    answers every request with GREETING."""
    admin = (f"{{pipe: {{path: '{admin_socket}', mode: 384}}}}" if admin_socket is not None
             else f"{{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}")
    return f"""\
node: {{id: cilia-test, cluster: cilia-test}}
admin:
  address: {admin}
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
    """Where a test's Envoy lives: bootstrap file, log file, admin (port or socket) and listener port."""

    bootstrap: Path
    log: Path
    admin_port: int
    listener_port: int
    admin_socket: Path | None = None

    @property
    def admin_address(self) -> str:
        if self.admin_socket is not None:
            return f"unix:{self.admin_socket}"
        return f"127.0.0.1:{self.admin_port}"


def static_envoy(tmp: Path, *, unix_admin: bool = False) -> StaticEnvoy:
    """A static Envoy's files in ``tmp``; its admin on TCP, or on ``tmp/admin.sock``."""
    admin_port, listener_port = free_port(), free_port()
    admin_socket = tmp / "admin.sock" if unix_admin else None
    bootstrap = tmp / "bootstrap.yaml"
    bootstrap.write_text(bootstrap_yaml(admin_port, listener_port, admin_socket=admin_socket))
    return StaticEnvoy(bootstrap, tmp / "envoy.log", admin_port, listener_port, admin_socket)


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


def process_running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not reaped yet) does not count."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat, which the supervisor records next to an Envoy's PID."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def wait_until(predicate: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {timeout}s"
        time.sleep(0.05)

"""The tests' one way to run a real Envoy: every Envoy a test starts is started here, through
cilia's EnvoySupervisor, and stopped however the test ends.

- ``envoy_serving(resources)``: an Envoy fed over xDS by cilia's own server
  (``cilia.envoy.loopback.LoopbackEnvoy``), for translated policy;
- ``static_envoy`` + ``supervised``: an Envoy on a static bootstrap, deliberately tiny
  (``bootstrap_yaml``: admin plus one listener answering with a direct_response; ``grpc_cluster``
  for a bootstrap that talks to a test's gRPC server), so the tests of the supervisor, the admin
  API and the access log stream depend on nothing but the Envoy binary.

Plus what those tests put behind Envoy and look at it with: ``deathstar_backend``, ``http_get``
and ``wait_records``.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path

from cilia.demo import Deathstar
from cilia.envoy.accesslog import AccessLogReceiver, AccessRecord
from cilia.envoy.loopback import LoopbackEnvoy
from cilia.envoy.supervisor import Backoff, EnvoySupervisor
from cilia.envoy.translate import ProxyResources
from cilia.netutil import free_port

GREETING = "hello from envoy"


@contextmanager
def envoy_serving(res: ProxyResources, node_id: str = "sidecar") -> Iterator[LoopbackEnvoy]:
    """An xDS server holding ``res`` and a real Envoy that acked it; both stopped on exit."""
    with LoopbackEnvoy(node_id) as envoy:
        envoy.start(res)
        yield envoy


def bootstrap_yaml(admin_port: int, listener_port: int, *, extra_hcm_field: str = "",
                   admin_socket: Path | None = None, listener_address: str = "127.0.0.1",
                   body: str = GREETING + "\n") -> str:
    """Admin on ``admin_port`` (on ``admin_socket`` if given, mode 0600); listener ``direct`` on
    ``listener_address:listener_port`` answers every request with 200 and ``body``."""
    admin = (f"{{pipe: {{path: '{admin_socket}', mode: 384}}}}" if admin_socket is not None
             else f"{{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}")
    escaped = body.encode("unicode_escape").decode()  # a YAML double-quoted string
    return f"""\
node: {{id: cilia-test, cluster: cilia-test}}
admin:
  address: {admin}
static_resources:
  listeners:
  - name: direct
    address: {{socket_address: {{address: {listener_address}, port_value: {listener_port}}}}}
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
                direct_response: {{status: 200, body: {{inline_string: "{escaped}"}}}}
"""


def grpc_cluster(name: str, port: int) -> str:
    """A static_resources ``clusters`` entry: HTTP/2 (gRPC) to 127.0.0.1:``port``."""
    return f"""\
  - name: {name}
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}
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
{grpc_cluster("xds", xds_port)}"""


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
    """A static Envoy's files in ``tmp`` (``bootstrap_yaml``); its admin on TCP, or on ``tmp/admin.sock``."""
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


@contextmanager
def deathstar_backend() -> Iterator[int]:
    """Cilium's deathstar app on 127.0.0.1, the backend of the translated Star Wars policy; yields its port."""
    backend = ThreadingHTTPServer(("127.0.0.1", 0), Deathstar)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    try:
        yield backend.server_address[1]
    finally:
        backend.shutdown()
        backend.server_close()


def http_get(port: int, path: str = "/") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def wait_records(receiver: AccessLogReceiver, count: int, timeout: float = 10) -> list[AccessRecord]:
    """The receiver's records once it holds ``count`` of them."""
    deadline = time.monotonic() + timeout
    while len(records := receiver.records()) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(records)} of {count} access log records after {timeout}s")
        time.sleep(0.05)
    return records

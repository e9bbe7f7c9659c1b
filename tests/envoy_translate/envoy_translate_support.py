"""Helpers for the translation tests: an xDS server and a real Envoy fed with translated resources."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cilia.envoy.bootstrap import build_bootstrap, to_json
from cilia.envoy.supervisor import EnvoySupervisor
from cilia.envoy.translate import ProxyResources
from cilia.xds import CLUSTER, LISTENER, AckTracker, Cache, XdsServer

NODE = "sidecar"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proxy:
    cache: Cache
    tracker: AckTracker

    def publish(self, res: ProxyResources) -> str:
        """Serve ``res`` (clusters first) and wait until Envoy acked the listeners."""
        self.cache.set(CLUSTER, {c.name: c for c in res.clusters})
        version = self.cache.set(LISTENER, {li.name: li for li in res.listeners})
        self.tracker.wait(NODE, LISTENER, version, timeout=10)
        return version


@contextmanager
def envoy_serving(tmp_path: Path, res: ProxyResources) -> Iterator[Proxy]:
    """An xDS server on a UNIX socket holding ``res`` and a real Envoy that acked it."""
    cache, tracker = Cache(), AckTracker()
    server = XdsServer(cache, tracker)
    xds_address = f"unix:{tmp_path}/xds.sock"
    server.add_address(xds_address)
    server.start()
    try:
        proxy = Proxy(cache, tracker)
        cache.set(CLUSTER, {c.name: c for c in res.clusters})
        cache.set(LISTENER, {li.name: li for li in res.listeners})
        admin = f"127.0.0.1:{free_port()}"
        bootstrap = tmp_path / "bootstrap.json"
        bootstrap.write_text(to_json(build_bootstrap(NODE, xds_address, admin)))
        with EnvoySupervisor(bootstrap, admin, log_path=tmp_path / "envoy.log",
                             extra_args=["--drain-time-s", "0"]):
            proxy.publish(res)
            yield proxy
    finally:
        server.stop(0)

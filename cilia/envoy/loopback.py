"""Run translated policy on a local Envoy: an xDS server on a UNIX socket and a supervised Envoy.

The smallest complete path from ``cilia.envoy.translate`` to traffic: resources go into a
``cilia.xds.Cache``, an ``XdsServer`` serves them over a UNIX socket in a private directory, and
an ``EnvoySupervisor`` runs the real Envoy against it. ``publish`` returns only after Envoy has
acked the new listeners, so traffic sent afterwards meets the new policy.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import TracebackType

from cilia.envoy.admin import AdminClient
from cilia.envoy.bootstrap import build_bootstrap, write_bootstrap
from cilia.envoy.supervisor import EnvoySupervisor
from cilia.envoy.translate import ProxyResources
from cilia.xds import CLUSTER, LISTENER, AckTracker, Cache, XdsServer

__all__ = ["LoopbackEnvoy"]


class LoopbackEnvoy:
    """One Envoy fed by one xDS server; a context manager that always stops both."""

    def __init__(self, node_id: str = "cilia-loopback", *, ack_timeout: float = 10.0) -> None:
        self.node_id = node_id
        self.ack_timeout = ack_timeout
        self.cache = Cache()
        self.tracker = AckTracker()
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._server: XdsServer | None = None
        self._envoy: EnvoySupervisor | None = None

    @property
    def pid(self) -> int | None:
        """Envoy's process id while it runs."""
        return self._envoy.status().pid if self._envoy is not None else None

    @property
    def admin(self) -> AdminClient | None:
        """Envoy's admin API (on a UNIX socket in the private directory) while it runs."""
        return self._envoy.admin if self._envoy is not None else None

    @property
    def log_path(self) -> Path | None:
        return self._envoy.log_path if self._envoy is not None else None

    def start(self, initial: ProxyResources) -> None:
        """Start the xDS server holding ``initial`` and an Envoy that has acked it.

        Raises EnvoyStartError (quoting Envoy's log) if Envoy cannot start; nothing is left running."""
        self._dir = tempfile.TemporaryDirectory(prefix="cilia-envoy-")
        base = Path(self._dir.name)
        try:
            self._server = XdsServer(self.cache, self.tracker)
            xds_address = f"unix:{base}/xds.sock"
            self._server.add_address(xds_address)
            self._server.start()
            self._set(initial)  # served on Envoy's first request, so it starts with the policy
            admin = f"unix:{base}/admin.sock"
            bootstrap = base / "bootstrap.json"
            write_bootstrap(bootstrap, build_bootstrap(self.node_id, xds_address, admin))
            self._envoy = EnvoySupervisor(bootstrap, admin, log_path=base / "envoy.log",
                                          extra_args=["--drain-time-s", "0"], pid_file=base / "envoy.pid")
            self._envoy.start()
            self.publish(initial)
        except BaseException:
            self.stop()
            raise

    def publish(self, res: ProxyResources) -> str:
        """Serve ``res`` (clusters before listeners) and wait until Envoy acked the listeners.

        Raises NackError if Envoy rejected them, TimeoutError if it did not answer in time."""
        version = self._set(res)
        self.tracker.wait(self.node_id, LISTENER, version, timeout=self.ack_timeout)
        return version

    def stop(self) -> None:
        """Stop Envoy, then the xDS server, and remove the private directory. Safe to repeat."""
        try:
            if self._envoy is not None:
                self._envoy.stop()
        finally:
            if self._server is not None:
                self._server.stop(0)
                self._server = None
            if self._dir is not None:
                self._dir.cleanup()
                self._dir = None

    def _set(self, res: ProxyResources) -> str:
        self.cache.set(CLUSTER, {c.name: c for c in res.clusters})
        return self.cache.set(LISTENER, {li.name: li for li in res.listeners})

    def __enter__(self) -> LoopbackEnvoy:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

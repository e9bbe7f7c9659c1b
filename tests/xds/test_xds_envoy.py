"""The xDS server against a real Envoy: SotW and delta ADS, ACK versions, NACK, restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from xds_support import eds_cluster, http_get, http_listener, load_assignment, running_envoy, wait_for, free_port

from cilia.xds.acks import AckTracker, NackError
from cilia.xds.cache import Cache
from cilia.xds.server import XdsServer
from cilia.xds.types import CLUSTER, ENDPOINT, LISTENER


class Counting(AckTracker):
    """An AckTracker that also counts responses sent per type."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_count: dict[str, int] = {}

    def on_sent(self, node_id: str, type_url: str, version: str, *, stream: int) -> None:
        self.sent_count[type_url] = self.sent_count.get(type_url, 0) + 1
        super().on_sent(node_id, type_url, version, stream=stream)


@pytest.fixture
def xds(tmp_path: Path) -> Iterator[tuple[Cache, Counting, str]]:
    cache = Cache()
    tracker = Counting()
    server = XdsServer(cache, tracker)
    address = f"unix:{tmp_path}/xds.sock"
    server.add_address(address)
    server.start()
    try:
        yield cache, tracker, address
    finally:
        server.stop(0)


def publish(cache: Cache, port: int, body: str, upstream_port: int = 1) -> str:
    """One cluster with endpoints and one listener; returns the listener version."""
    cache.upsert(CLUSTER, "backend", eds_cluster("backend"))
    cache.upsert(ENDPOINT, "backend", load_assignment("backend", upstream_port))
    return cache.upsert(LISTENER, "web", http_listener("web", port, body))


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_envoy_takes_config_acks_and_rejects_a_bad_listener(
    xds: tuple[Cache, Counting, str], tmp_path: Path, delta: bool
) -> None:
    cache, tracker, address = xds
    port = free_port()
    v1 = publish(cache, port, "hello v1")
    with running_envoy(tmp_path, "node-a", address, delta=delta) as envoy:
        tracker.wait("node-a", LISTENER, v1, timeout=10)
        tracker.wait("node-a", CLUSTER, cache.version(CLUSTER), timeout=10)
        assert wait_for("listener serving", lambda: http_get(port)) == (200, "hello v1")
        assert envoy.dynamic("listeners")["web"]["active_state"]["version_info"] == v1
        clusters = wait_for("cluster active", lambda: envoy.dynamic("clusters").get("backend"))
        assert "active_state" in clusters and "warming_state" not in clusters

        # Equal content again: no new version, nothing sent.
        sent = dict(tracker.sent_count)
        assert publish(cache, port, "hello v1") == v1
        assert tracker.sent_count == sent

        # An invalid regex: Envoy rejects it and keeps serving v1; the NACK text reaches the waiter.
        v2 = cache.upsert(LISTENER, "web", http_listener("web", port, "bad", path_regex="(unclosed"))
        with pytest.raises(NackError) as err:
            tracker.wait("node-a", LISTENER, v2, timeout=10)
        assert "unclosed" in err.value.message or "missing )" in err.value.message
        state = tracker.state("node-a", LISTENER)
        assert (state.acked, state.nacked) == (v1, v2)
        assert http_get(port) == (200, "hello v1")
        lds_sent = tracker.sent_count[LISTENER]

        # A cluster change: its EDS is answered, so it does not stay warming; the rejected listener is not resent.
        cluster = eds_cluster("backend")
        cluster.connect_timeout.seconds = 2
        v_cluster = cache.upsert(CLUSTER, "backend", cluster)
        tracker.wait("node-a", CLUSTER, v_cluster, timeout=10)
        wait_for(
            "changed cluster active",
            lambda: (
                envoy.dynamic("clusters")["backend"]["active_state"]["version_info"] == v_cluster
                and "warming_state" not in envoy.dynamic("clusters")["backend"]
            ),
        )
        assert tracker.sent_count[LISTENER] == lds_sent

        # New good content goes out and is acked.
        v3 = cache.upsert(LISTENER, "web", http_listener("web", port, "hello v3"))
        tracker.wait("node-a", LISTENER, v3, timeout=10)
        assert wait_for("v3 serving", lambda: http_get(port)[1] == "hello v3" and http_get(port))

        # After a restart Envoy converges to the same config.
        envoy.stop()
        envoy.start()
        wait_for("v3 after restart", lambda: http_get(port) == (200, "hello v3"))
        assert envoy.dynamic("listeners")["web"]["active_state"]["version_info"] == v3
        tracker.wait("node-a", LISTENER, v3, timeout=10)


def test_delta_removes_a_deleted_listener(xds: tuple[Cache, Counting, str], tmp_path: Path) -> None:
    cache, tracker, address = xds
    keep, drop = free_port(), free_port()
    cache.upsert(LISTENER, "keep", http_listener("keep", keep, "kept"))
    v1 = cache.upsert(LISTENER, "drop", http_listener("drop", drop, "dropped"))
    with running_envoy(tmp_path, "node-d", address, delta=True) as envoy:
        tracker.wait("node-d", LISTENER, v1, timeout=10)
        assert wait_for("both listeners", lambda: http_get(drop)) == (200, "dropped")
        v2 = cache.delete(LISTENER, "drop")
        tracker.wait("node-d", LISTENER, v2, timeout=10)
        wait_for("listener removed", lambda: "drop" not in envoy.dynamic("listeners"))
        assert http_get(keep) == (200, "kept")


def test_each_node_sees_its_own_view_over_tcp(tmp_path: Path) -> None:
    cache, tracker = Cache(), AckTracker()
    server = XdsServer(cache, tracker)
    port = server.add_address("127.0.0.1:0", insecure=True)
    server.start()
    try:
        p1, p2 = free_port(), free_port()
        cache.set_node_view("n1", LISTENER, ["one"])
        cache.set_node_view("n2", LISTENER, ["two"])
        cache.upsert(LISTENER, "one", http_listener("one", p1, "for n1"))
        version = cache.upsert(LISTENER, "two", http_listener("two", p2, "for n2"))
        with (
            running_envoy(tmp_path, "n1", f"127.0.0.1:{port}") as e1,
            running_envoy(tmp_path, "n2", f"127.0.0.1:{port}", delta=True) as e2,
        ):
            tracker.wait("n1", LISTENER, version, timeout=10)
            tracker.wait("n2", LISTENER, version, timeout=10)
            assert set(e1.dynamic("listeners")) == {"one"}
            assert set(e2.dynamic("listeners")) == {"two"}
            assert wait_for("n2 serving", lambda: http_get(p2)) == (200, "for n2")
    finally:
        server.stop(0)


def test_server_restart_converges_without_dropping_config(tmp_path: Path) -> None:
    """A restarted control plane (new epoch) serves the same config; Envoy keeps serving throughout."""
    address = f"unix:{tmp_path}/xds.sock"
    port = free_port()

    def serve() -> tuple[XdsServer, Cache, AckTracker, str]:
        cache, tracker = Cache(), AckTracker()
        version = publish(cache, port, "same")
        server = XdsServer(cache, tracker)
        server.add_address(address)
        server.start()
        return server, cache, tracker, version

    server, _, tracker, v_old = serve()
    try:
        with running_envoy(tmp_path, "node-r", address) as envoy:
            tracker.wait("node-r", LISTENER, v_old, timeout=10)
            server.stop(0)
            assert wait_for("served while the server is down", lambda: http_get(port)) == (200, "same")
            server, _, tracker, v_new = serve()
            assert v_new != v_old  # a new epoch: Envoy cannot mistake it for what it holds
            tracker.wait("node-r", LISTENER, v_new, timeout=15)
            # Same content under a new version: Envoy acks it but keeps the running listener as it was.
            assert envoy.dynamic("listeners")["web"]["active_state"]["version_info"] == v_old
            assert http_get(port) == (200, "same")
    finally:
        server.stop(0)

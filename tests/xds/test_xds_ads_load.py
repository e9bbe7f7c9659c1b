"""The benchmark's load generator against a real XdsServer: 50 simulated Envoys (one gRPC
connection each, in other processes) all get and ACK a new version; the server's tracker agrees."""

from __future__ import annotations

import sys
from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from ads_load import AdsLoad  # noqa: E402

from cilia.xds import CLUSTER, LISTENER, AckTracker, Cache, TypeChange, XdsServer  # noqa: E402

CLIENTS = 50


def lst(name: str, port: int) -> listener_pb2.Listener:
    msg = listener_pb2.Listener(name=name)
    msg.address.socket_address.port_value = port
    return msg


def test_every_simulated_envoy_acks_the_new_version() -> None:
    cache, tracker = Cache(), AckTracker()
    cache.update_many({CLUSTER: TypeChange({"c": cluster_pb2.Cluster(name="c")}),
                       LISTENER: TypeChange({"a": lst("a", 1)})})
    server = XdsServer(cache, tracker, max_streams=CLIENTS + 8)
    port = server.add_address("127.0.0.1:0", insecure=True)
    server.start()
    nodes = [f"sim-{i}" for i in range(CLIENTS)]
    try:
        with AdsLoad(f"127.0.0.1:{port}", nodes, processes=2) as load:
            load.wait_ready(60)
            up = cache.update_many({CLUSTER: TypeChange({"c": cluster_pb2.Cluster(name="c", alt_stat_name="x")}),
                                    LISTENER: TypeChange({"a": lst("a", 2), "b": lst("b", 3)})})
            targets = {CLUSTER: up.versions[CLUSTER], LISTENER: up.versions[LISTENER]}
            acks = load.wait_acked(targets, timeout=60)
            assert set(acks) == set(nodes)
            for node in nodes:
                for type_url, version in targets.items():
                    tracker.wait(node, type_url, version, timeout=10)
            _, stats = load.report(targets)
            assert stats["errors"] == {}
            # The revert is a new version too, and reaches everyone.
            reverted = up.revert()
            load.wait_acked(reverted, timeout=60)
    finally:
        server.stop(0)

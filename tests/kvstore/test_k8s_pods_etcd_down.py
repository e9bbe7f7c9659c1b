"""A pod the Kubernetes watcher hands the agent while etcd is unreachable is accepted at once (no
503 and no re-apply loop) as an endpoint waiting for its identity: no number, its address still
world; once etcd is back the agent admits it with its cluster-wide number, without any new event
about the pod. A ready pod relabelled during the outage keeps its identity and is retried (503)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

from cilia.agent.api import InProcess
from cilia.k8s import WatchConfig, Watcher, connect
from tests.agent.agent_support import agent_in_process
from tests.k8s.apiserver import KubeTestServer
from tests.kvstore.etcd_support import EtcdCluster
from tests.kvstore.test_agents_etcd import kv, wait_until


def pod(name: str, ip: str, app: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"nodeName": "node-a", "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


def test_a_pod_refused_while_etcd_is_down_is_taken_when_it_is_back(etcd1: EtcdCluster, tmp_path: Path) -> None:
    server = KubeTestServer().start()
    try:
        server.add("namespaces", {"metadata": {"name": "default"}})
        server.add("pods", pod("first", "10.215.1.10", "first"))
        api = connect(str(server.write_kubeconfig(tmp_path / "kubeconfig")), False)
        with agent_in_process(tmp_path / "a", envoy="none", node_id="node-a", kvstore=kv(etcd1, ttl=30)) as a:
            watcher = Watcher(api, InProcess(a), WatchConfig(node_name="node-a", backoff=0.05, max_backoff=1.0,
                                                             namespace_wait=2.0))
            watcher.start()
            try:
                names = lambda: {e.spec.name for e in a.endpoints().endpoints}  # noqa: E731
                wait_until("the first pod", lambda: "first.default" in names())
                etcd1.stop_all()
                server.add("pods", pod("late", "10.215.1.11", "late"))
                states = lambda: {e.spec.name: e.state for e in a.endpoints().endpoints}  # noqa: E731
                wait_until("accepted, waiting", lambda: states().get("late.default") == "waiting-for-identity")
                assert watcher.status()["rejected"] == [] and not watcher.pods.retry
                assert a.engine.ipcache.lookup("10.215.1.11")[1] in (2, 9)  # world: nothing admits it by labels
                etcd1.start_all()
                wait_until("admitted once etcd is back", lambda: states().get("late.default") == "ready", timeout=60)
                assert watcher.status()["rejected"] == []
                late = a.engine.identity_of("late.default").id
                assert 256 <= late < 65536 and a.engine.ipcache.get(ipaddress.ip_network("10.215.1.11")) == late
            finally:
                watcher.stop()
    finally:
        server.stop()

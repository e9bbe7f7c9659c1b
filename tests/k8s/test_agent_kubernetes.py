"""`cilia agent --kubernetes KUBECONFIG` as an operator runs it (a real agent process) against
the Kubernetes TEST SERVER (tests/k8s/apiserver.py; no API server can run here): pods become
endpoints, CiliumNetworkPolicy objects policies, and `cilia status` shows the watches."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from tests.agent.agent_support import AgentProcess, run_cli
from tests.k8s.apiserver import KubeTestServer

T = TypeVar("T")


def _eventually(check: Callable[[], T], timeout: float = 15.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError, StopIteration):
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("never true")
        time.sleep(0.1)


def test_agent_watches_a_cluster(tmp_path: Path) -> None:
    server = KubeTestServer().start()
    try:
        server.add("namespaces", {"metadata": {"name": "empire", "labels": {"side": "dark"}}})
        server.add("pods", {"metadata": {"name": "deathstar-1", "namespace": "empire",
                                         "labels": {"org": "empire", "class": "deathstar"}},
                            "spec": {"nodeName": "node-1", "containers": [{"name": "app"}]},
                            "status": {"phase": "Running", "podIP": "10.0.7.10", "podIPs": [{"ip": "10.0.7.10"}]}})
        server.add("pods", {"metadata": {"name": "elsewhere", "namespace": "empire", "labels": {"org": "empire"}},
                            "spec": {"nodeName": "node-2", "containers": [{"name": "app"}]},
                            "status": {"phase": "Running", "podIP": "10.0.8.10", "podIPs": [{"ip": "10.0.8.10"}]}})
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        state = tmp_path / "state"
        state.mkdir()
        agent = AgentProcess(state, "--envoy", "none", "--kubernetes", str(kubeconfig), "--node-name", "node-1")
        agent.start()
        try:
            def endpoints() -> dict[str, Any]:
                eps = {e["name"]: e for e in run_cli(state, "endpoint", "list", "-o", "json").json()["endpoints"]}
                assert "deathstar-1.empire" in eps
                return eps
            eps = _eventually(endpoints)
            assert "elsewhere.empire" not in eps  # another node's pod
            labels = eps["deathstar-1.empire"]["identity_labels"]
            assert "k8s:class=deathstar" in labels and "k8s:io.cilium.k8s.namespace.labels.side=dark" in labels

            server.add("ciliumnetworkpolicies", {
                "metadata": {"name": "rule1", "namespace": "empire"},
                "spec": {"endpointSelector": {"matchLabels": {"class": "deathstar"}},
                         "ingress": [{"fromEndpoints": [{"matchLabels": {"org": "empire"}}],
                                      "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}})
            policies = _eventually(lambda: run_cli(state, "policy", "get", "-o", "json").json()["policies"])
            assert [(p["name"], p["file"]) for p in policies] == [
                ("rule1", "k8s/CiliumNetworkPolicy/empire/rule1")]
            assert _eventually(lambda: run_cli(state, "endpoint", "list", "-o", "json").json()["endpoints"][0]
                               ["enforcement"]["ingress"])

            status = run_cli(state, "status")
            assert status.code == 0, status.out
            assert "Kubernetes:  connected" in status.out and "pods of node node-1" in status.out
            assert run_cli(state, "status", "-o", "json").json()["kubernetes"]["synced"]

            # a NetworkPolicy whose ipBlock has host bits set (the API server takes it): masked, and
            # `cilia status` says so for it, as for one imported from a file
            server.add("networkpolicies", {
                "metadata": {"name": "lockdown", "namespace": "empire"},
                "spec": {"podSelector": {"matchLabels": {"class": "deathstar"}},
                         "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.1.1/4"}}]}]}})
            masked = "NetworkPolicy lockdown: spec.ingress[0].from[0].ipBlock.cidr: 10.0.1.1/4 has host bits set"
            noted = _eventually(lambda: next(p for p in run_cli(state, "policy", "get", "-o", "json").json()
                                             ["policies"] if p["name"] == "networkpolicy.lockdown"))
            assert any(masked in n and n.startswith("k8s/NetworkPolicy/empire/lockdown") for n in noted["notes"]), \
                noted
            assert masked in run_cli(state, "status").out

            server.delete("pods", "deathstar-1", "empire")
            _eventually(lambda: run_cli(state, "endpoint", "list", "-o", "json").json()["endpoints"] == [])
        finally:
            agent.stop()
    finally:
        server.stop()

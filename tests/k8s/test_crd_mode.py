"""Kubernetes without a kvstore (CRD mode) on the Kubernetes TEST SERVER (tests/k8s/apiserver.py;
no API server can run here): two real agents, each watching its node's pods, share identities
as CiliumIdentity objects and endpoints as CiliumEndpoint objects, so each knows the other's pods
with the same identity numbers; two nodes allocating the same labels at once get one number; a
pod that goes away leaves the other node; bad objects are skipped and deny."""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from cilia.agent.daemon import Agent
from cilia.k8s import WatchConfig, connect
from cilia.k8s.crd_identities import candidates
from cilia.k8s.crdmode import CRDMode
from cilia.policy import LabelSet
from tests.agent.agent_support import AgentProcess, agent_in_process, run_cli
from tests.k8s.apiserver import KubeTestServer
from tests.kvstore.test_agents_etcd import POLICY, ingress_peers, wait_until

FAST = dict(backoff=0.05, max_backoff=0.5, namespace_wait=2.0)


def pod(name: str, node: str, ip: str, **labels: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "default", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}


@contextmanager
def crd_agent(server: KubeTestServer, tmp_path: Path, node: str) -> Iterator[tuple[Agent, CRDMode]]:
    """An agent wired as `cilia agent --kubernetes KUBECONFIG --node-name NODE` wires it."""
    api = connect(str(server.write_kubeconfig(tmp_path / f"{node}.kubeconfig")), False)
    crd = CRDMode(api, node)
    with agent_in_process(tmp_path / node, envoy="none", node_id=node, allocator=crd.allocator) as agent:
        crd.attach(agent)
        watcher = crd.watcher(agent, WatchConfig(node_name=node, **FAST))  # type: ignore[arg-type]
        watcher.start()
        try:
            assert watcher.wait_synced(30)
            yield agent, crd
        finally:
            watcher.stop()
            crd.stop()


def remote(agent: Agent, ip: str) -> int | None:
    return agent.engine.ipcache.get(ipaddress.ip_network(ip))


def identity_of(agent: Agent, name: str) -> int | None:
    try:
        return agent.engine.identity_of(name).id
    except Exception:
        return None


def test_two_nodes_know_each_others_pods_with_the_same_numbers(tmp_path: Path) -> None:
    server = KubeTestServer().start()
    try:
        server.add("namespaces", {"metadata": {"name": "default"}})
        server.add("pods", pod("deathstar", "node-1", "10.214.1.10", org="empire", **{"class": "deathstar"}))
        server.add("pods", pod("tiefighter", "node-2", "10.214.2.11", org="empire", **{"class": "tiefighter"}))
        server.add("pods", pod("xwing", "node-2", "10.214.2.12", org="alliance", **{"class": "xwing"}))
        server.add("pods", pod("tie-local", "node-1", "10.214.1.11", org="empire", **{"class": "tiefighter"}))
        with crd_agent(server, tmp_path, "node-1") as (a, _), crd_agent(server, tmp_path, "node-2") as (b, crd_b):
            a.import_policies([(str(POLICY), POLICY.read_text())])
            wait_until("each node's pods", lambda: identity_of(a, "deathstar.default") is not None
                       and identity_of(b, "tiefighter.default") is not None and identity_of(b, "xwing.default"))
            tie = identity_of(b, "tiefighter.default")
            assert identity_of(a, "tie-local.default") == tie  # the same labels, the same number on both nodes
            assert "tiefighter.default" not in {e.spec.name for e in a.endpoints().endpoints}  # not a's pod
            wait_until("a knows b's pods", lambda: remote(a, "10.214.2.11") == tie
                       and remote(a, "10.214.2.12") == identity_of(b, "xwing.default"))
            wait_until("b knows a's", lambda: remote(b, "10.214.1.10") == identity_of(a, "deathstar.default"))
            assert tie in ingress_peers(a, "deathstar.default")  # policy selects the remote pod by labels
            assert identity_of(b, "xwing.default") not in ingress_peers(a, "deathstar.default")
            objects = {o["metadata"]["name"]: o for o in server.serve_list(
                server_resource("ciliumidentities"), {})[1]["items"]}
            assert str(tie) in objects and objects[str(tie)]["security-labels"]["k8s:class"] == "tiefighter"

            server.delete("pods", "xwing", "default")  # gone from node 2: gone from node 1
            wait_until("xwing leaves a", lambda: remote(a, "10.214.2.12") is None)
            wait_until("its CiliumEndpoint is deleted", lambda: not any(
                o["metadata"]["name"] == "xwing" for o in server.serve_list(server_resource("ciliumendpoints"),
                                                                              {})[1]["items"]))
            # bad objects: skipped, the watch goes on, nothing widens
            server.add("ciliumendpoints", {"metadata": {"name": "evil", "namespace": "default"},
                                           "status": {"identity": {"id": 1}, "networking": {
                                               "node": "node-x", "addressing": [{"ipv4": "10.214.9.1"}]}}})
            server.add("ciliumendpoints", {"metadata": {"name": "broken", "namespace": "default"}, "status": "x"})
            server.add("ciliumidentities", {"metadata": {"name": "4000"}, "security-labels": {"reserved:host": ""}})
            server.add("ciliumendpoints", {"metadata": {"name": "late", "namespace": "default"},
                                           "status": {"identity": {"id": 4000}, "networking": {
                                               "node": "node-x", "addressing": [{"ipv4": "10.214.9.2"}]}}})
            wait_until("the valid one arrives", lambda: remote(a, "10.214.9.2") == 4000)
            assert remote(a, "10.214.9.1") is None and 4000 not in {i.id for i in a.engine.identities()}
            assert crd_b.remote.malformed >= 2 and crd_b.allocator.malformed >= 1
            status = a.status()["kubernetes"]["resources"]
            assert status["ciliumidentities"]["connected"] and status["ciliumendpoints"]["connected"]
    finally:
        server.stop()


def server_resource(name: str) -> Any:
    from tests.k8s.apiserver import RESOURCES

    return RESOURCES[name]


def race(allocators: list[Any], want: LabelSet) -> list[int]:
    """Every allocator asks for ``want`` at the same moment (released together by a barrier)."""
    got = [0] * len(allocators)
    barrier = threading.Barrier(len(allocators))

    def run(index: int) -> None:
        barrier.wait()
        got[index] = allocators[index].allocate(want).id

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(allocators))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def test_two_nodes_allocating_the_same_labels_at_once_get_one_number(tmp_path: Path) -> None:
    server = KubeTestServer().start()
    try:
        apis = [connect(str(server.write_kubeconfig(tmp_path / f"{n}.kubeconfig")), False) for n in ("a", "b")]
        modes = [CRDMode(api, f"node-{i}") for i, api in enumerate(apis)]
        # labels whose first candidates are taken by other labels: both walk on to the same free one
        for i in range(30):
            want = LabelSet.parse([f"k8s:app=race{i}", "k8s:io.kubernetes.pod.namespace=default"])
            if i % 3 == 0:
                first = next(candidates(want, 1))
                server.add("ciliumidentities", {"metadata": {"name": str(first)},
                                                "security-labels": {"k8s:app": f"occupier{i}"}})
            got = race([m.allocator for m in modes], want)
            assert got[0] == got[1] >= 256, f"round {i}: {got}"
            assert server.get("ciliumidentities", str(got[0]))["security-labels"]["k8s:app"] == f"race{i}"
    finally:
        server.stop()


def test_the_agent_command_runs_crd_mode(tmp_path: Path) -> None:
    server = KubeTestServer().start()
    try:
        server.add("namespaces", {"metadata": {"name": "default"}})
        server.add("pods", pod("deathstar", "node-1", "10.214.1.10", org="empire", **{"class": "deathstar"}))
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        with ExitStack() as stack:
            state = tmp_path / "p1"
            state.mkdir()
            agent = AgentProcess(state, "--envoy", "none", "--kubernetes", str(kubeconfig), "--node-name", "node-1")
            agent.start()
            stack.callback(agent.stop)
            wait_until("its CiliumEndpoint", lambda: any(
                o["metadata"]["name"] == "deathstar" for o in server.serve_list(
                    server_resource("ciliumendpoints"), {})[1]["items"]))
            listed = run_cli(state, "endpoint", "list", "-o", "json").json()["endpoints"]
            cep = server.get("ciliumendpoints", "deathstar", "default")
            assert cep["status"]["identity"]["id"] == listed[0]["identity"]
            assert cep["status"]["networking"] == {"addressing": [{"ipv4": "10.214.1.10"}], "node": "node-1"}
            assert server.get("ciliumidentities", str(listed[0]["identity"]))
            status = run_cli(state, "status", "-o", "json").json()
            assert "ciliumendpoints" in status["kubernetes"]["resources"]
        assert "Traceback" not in agent.log.read_text()
    finally:
        server.stop()


def test_a_pod_whose_identity_cannot_be_written_waits_and_is_taken_later(tmp_path: Path) -> None:
    """The API server refuses the CiliumIdentity's creation (503): the pod is accepted as an endpoint
    waiting for its identity (no number, never a node-local one; not refused to the watcher), and the
    agent's retry loop admits it once its identity is written."""
    server = KubeTestServer().start()
    try:
        server.add("namespaces", {"metadata": {"name": "default"}})
        with crd_agent(server, tmp_path, "node-1") as (a, _):
            server.fail_writes("ciliumidentities", 6)  # the agent's retries back off: ~6 s of waiting
            server.add("pods", pod("late", "node-1", "10.214.1.20", app="late"))
            wait_until("waiting", lambda: "late.default" in a.waiting_endpoints())
            assert a.kubernetes.status()["rejected"] == []
            assert "no cluster-wide identity" in a.pending.errors["late.default"]
            assert {e.spec.name: e.identity for e in a.endpoints().endpoints}["late.default"] is None
            wait_until("taken", lambda: identity_of(a, "late.default") is not None, timeout=60)
            number = identity_of(a, "late.default")
            assert server.get("ciliumidentities", str(number))["security-labels"]["k8s:app"] == "late"
            assert a.kubernetes.status()["rejected"] == []
    finally:
        server.stop()

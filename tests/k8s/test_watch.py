"""cilia.k8s.watch against the Kubernetes test server, with a real agent (``envoy="none"``) in process.

The watcher is connected the way it is in a cluster: a kubeconfig → ``connect`` → the official
client's ApiClient → list + watch. The agent's own API methods (and the CLI once) show the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from apiserver import KubeTestServer
from click.testing import CliRunner

from cilia.agent.api import APIServer, InProcess
from cilia.agent.render import render
from cilia.agent.daemon import Agent, AgentConfig, AgentError
from cilia.specs import EndpointSpec, PolicyKey
from cilia.cli.main import cli
from cilia.k8s import WatchConfig, Watcher, connect, format_status
from cilia.k8s.watch import PODS, WatchError

T = TypeVar("T")
NODE = "node-1"
NS = "k8s:io.kubernetes.pod.namespace"
CNPS, CCNPS, NETPOLS, NAMESPACES = ("ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies", "networkpolicies",
                                    "namespaces")
FAST = WatchConfig(node_name=NODE, backoff=0.05, max_backoff=0.2, list_limit=2, watch_timeout=30)


# ------------------------------------------------------------------ objects

def pod(name: str, namespace: str = "prod", labels: dict[str, str] | None = None, ip: str | None = "10.0.0.5",
        phase: str = "Running", node: str = NODE) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status.update(podIP=ip, podIPs=[{"ip": ip}])
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels or {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
            "status": status}


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}}}


def cnp(name: str, namespace: str = "prod", app: str = "web", port: str = "80") -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"endpointSelector": {"matchLabels": {"app": app}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "fe"}}],
                                  "toPorts": [{"ports": [{"port": port, "protocol": "TCP"}]}]}]}}


def ccnp(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "spec": {"endpointSelector": {}, "egress": [{"toEntities": ["cluster"]}]}}


def netpol(name: str, namespace: str = "prod", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, **spec}}


# ------------------------------------------------------------------ harness

def eventually(check: Callable[[], T], timeout: float = 10.0, what: str = "") -> T:
    """Poll ``check`` until it returns something true (an AssertionError or KeyError counts as not yet)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (AssertionError, KeyError) as e:
            last = e
        time.sleep(0.02)
    raise AssertionError(f"not reached in {timeout}s: {what} {last or ''}")


def endpoints(agent: Agent) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in render(agent.endpoints())["endpoints"]}


def policies(agent: Agent) -> dict[PolicyKey, dict[str, Any]]:
    return {(p["kind"], p["namespace"] or "", p["name"]): p for p in render(agent.policies())["policies"]}


class Counting:
    """The agent, counting the watcher's calls by method."""

    def __init__(self, agent: Any) -> None:
        self.agent = InProcess(agent) if agent is not None else None
        self.calls: list[tuple[str, Any]] = []

    def add_endpoint(self, spec: EndpointSpec) -> dict[str, Any]:
        self.calls.append(("add_endpoint", spec))
        return self.agent.add_endpoint(spec)  # type: ignore[no-any-return]

    def remove_endpoint(self, name: str) -> dict[str, Any]:
        self.calls.append(("remove_endpoint", name))
        return self.agent.remove_endpoint(name)  # type: ignore[no-any-return]

    def import_policies(self, files: Sequence[tuple[str, str]]) -> dict[str, Any]:
        self.calls.append(("import_policies", [p for p, _ in files]))
        return self.agent.import_policies(files)  # type: ignore[no-any-return]

    def delete_policies(self, name: str | None, namespace: str | None = None) -> dict[str, Any]:
        self.calls.append(("delete_policies", (name, namespace)))
        return self.agent.delete_policies(name, namespace)  # type: ignore[no-any-return]

    def endpoints(self) -> dict[str, Any]:
        return self.agent.endpoints()  # type: ignore[no-any-return]

    def policies(self) -> dict[str, Any]:
        return self.agent.policies()  # type: ignore[no-any-return]

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)


class ExactAgent(Counting):
    """Deletes by exact key through the agent's ``delete_policy_keys``, recording the call."""

    def delete_policy_keys(self, keys: Sequence[PolicyKey]) -> dict[str, Any]:
        self.calls.append(("delete_policy_keys", list(keys)))
        return self.agent.delete_policy_keys(keys)  # type: ignore[no-any-return]


@pytest.fixture
def kube() -> Iterator[KubeTestServer]:
    server = KubeTestServer().start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_agent(state_dir: Path) -> Iterator[Agent]:
    agent = Agent(AgentConfig(state_dir, envoy="none"))
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with running_agent(tmp_path / "state") as a:
        yield a


@contextmanager
def watching(kube: KubeTestServer, sink: Any, tmp_path: Path, config: WatchConfig = FAST) -> Iterator[Watcher]:
    api = connect(str(kube.write_kubeconfig(tmp_path / "kubeconfig")), in_cluster=False)
    w = Watcher(api, InProcess(sink) if isinstance(sink, Agent) else sink, config)
    w.start()
    try:
        assert w.wait_synced(10), w.status()
        yield w
    finally:
        w.stop()
        assert not any(t.is_alive() for t in w._threads)
        api.close()


# ------------------------------------------------------------------ connecting

def test_connect_explains_bad_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WatchError, match="nowhere"):
        connect(str(tmp_path / "nowhere"), in_cluster=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(WatchError, match="in-cluster"):
        connect(None, in_cluster=True)
    with pytest.raises(WatchError, match="unknown resources"):
        Watcher(None, Counting(None), WatchConfig(resources=("secrets",)))


# ------------------------------------------------------------------ pods and namespaces

def test_pod_lifecycle(kube: KubeTestServer, agent: Agent, tmp_path: Path) -> None:
    kube.add(NAMESPACES, namespace("prod", {"team": "a"}))
    for i in range(3):  # more than a list page (list_limit=2)
        kube.add(PODS, pod(f"db-{i}", ip=f"10.0.1.{i + 1}", labels={"app": "db"}))
    kube.add(PODS, pod("elsewhere", ip="10.0.9.9", node="node-2"))
    kube.add(PODS, pod("web", phase="Pending", ip=None))
    with watching(kube, agent, tmp_path) as w:
        eps = endpoints(agent)
        assert sorted(eps) == ["db-0.prod", "db-1.prod", "db-2.prod"]  # not the other node's, not the pending one
        pages = [q for r, what, q in kube.requests if r == PODS and what == "list"]
        assert len(pages) == 2 and "continue" in pages[1] and pages[0]["fieldSelector"] == f"spec.nodeName={NODE}"
        assert w.status()["resources"][PODS]["lists"] == 1
        kube.patch(PODS, "web", lambda p: p["status"].update(phase="Running"))  # running, but no IP yet
        kube.patch(PODS, "web", lambda p: p["metadata"]["labels"].update(tier="fe"))
        time.sleep(0.2)
        assert "web.prod" not in endpoints(agent)
        kube.patch(PODS, "web", lambda p: p["status"].update(podIP="10.0.0.5", podIPs=[{"ip": "10.0.0.5"}]))
        web = eventually(lambda: endpoints(agent).get("web.prod"), what="web's endpoint")
        assert web["ips"] == ["10.0.0.5"]
        assert set(web["labels"]) == {"k8s:app=web", "k8s:tier=fe", f"{NS}=prod",
                                      "k8s:io.cilium.k8s.namespace.labels.team=a",
                                      "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod"}
        assert web["ports"] == [{"port": 80, "protocol": "TCP", "backend": None, "name": "http"}]
        assert set(web["identity_labels"]) == set(web["labels"])

        kube.patch(PODS, "web", lambda p: p["metadata"]["labels"].update(tier="be"))
        relabelled = eventually(lambda: e if "k8s:tier=be" in (e := endpoints(agent)["web.prod"])["labels"] else None,
                                what="relabelled")
        assert relabelled["identity"] != web["identity"]

        kube.delete(PODS, "web")
        eventually(lambda: "web.prod" not in endpoints(agent), what="web removed")
        kube.patch(PODS, "db-0", lambda p: p["status"].update(phase="Succeeded"))
        eventually(lambda: "db-0.prod" not in endpoints(agent), what="a finished pod loses its endpoint")
        assert sorted(endpoints(agent)) == ["db-1.prod", "db-2.prod"]
        st = w.status()["resources"][PODS]
        assert st["connected"] and st["resource_version"] == str(kube.resource_version) and st["events"] >= 6


def test_namespace_label_change_relabels_its_pods(kube: KubeTestServer, agent: Agent, tmp_path: Path) -> None:
    kube.add(NAMESPACES, namespace("prod", {"team": "a"}))
    kube.add(NAMESPACES, namespace("dev"))
    kube.add(PODS, pod("web", ip="10.0.0.5"))
    kube.add(PODS, pod("api", ip="10.0.0.6"))
    kube.add(PODS, pod("tool", namespace="dev", ip="10.0.0.7"))
    sink = Counting(agent)
    with watching(kube, sink, tmp_path):
        before = endpoints(agent)
        assert "k8s:io.cilium.k8s.namespace.labels.team=a" in before["web.prod"]["labels"]
        adds = sink.count("add_endpoint")
        kube.patch(NAMESPACES, "prod", lambda n: n["metadata"]["labels"].update(team="b"))
        for name in ("web.prod", "api.prod"):
            eventually(lambda name=name: "k8s:io.cilium.k8s.namespace.labels.team=b"  # type: ignore[misc]
                       in endpoints(agent)[name]["labels"], what=f"{name} relabelled")
        after = endpoints(agent)
        assert after["web.prod"]["identity"] != before["web.prod"]["identity"]
        assert after["tool.dev"] == before["tool.dev"]
        assert sink.count("add_endpoint") == adds + 2  # only prod's pods


def test_an_endpoint_plumbed_by_the_cni_plugin_keeps_its_interface(kube: KubeTestServer, tmp_path: Path) -> None:
    class Endpoints(Counting):
        """A sink with the agent's endpoint semantics, where endpoints may carry an interface."""

        def __init__(self) -> None:
            super().__init__(None)
            self.eps: dict[str, EndpointSpec] = {}

        def add_endpoint(self, spec: EndpointSpec) -> dict[str, Any]:
            self.calls.append(("add_endpoint", spec))
            self.eps[spec.name] = spec
            return {}

        def remove_endpoint(self, name: str) -> dict[str, Any]:
            self.calls.append(("remove_endpoint", name))
            if self.eps.pop(name, None) is None:
                raise AgentError(f"no endpoint named {name}", 404)
            return {}

        def endpoints(self) -> dict[str, Any]:
            return {"endpoints": [e.to_json() for e in self.eps.values()]}

        def policies(self) -> dict[str, Any]:
            return {"policies": []}

    sink = Endpoints()
    # What `cilia-cni ADD` registered before the pod ran (and a stale one of a pod long gone).
    sink.eps["web.prod"] = EndpointSpec("web.prod", ("app=web", "io.kubernetes.pod.namespace=prod"), ("10.0.0.5",),
                                        interface="lxc0001", netns="cni-0001")
    sink.eps["gone.prod"] = EndpointSpec("gone.prod", (f"{NS}=prod",), ("10.0.0.8",))
    kube.add(PODS, pod("web", labels={"app": "web", "tier": "fe"}))
    with watching(kube, sink, tmp_path, WatchConfig(node_name=NODE, resources=(PODS,), backoff=0.05)) as w:
        web = sink.eps["web.prod"]
        assert (web.interface, web.netns) == ("lxc0001", "cni-0001") and "k8s:tier=fe" in web.labels
        assert "gone.prod" not in sink.eps
        kube.delete(PODS, "web")
        eventually(lambda: w.status()["resources"][PODS]["objects"] == 0, what="the pod's deletion seen")
        assert "web.prod" in sink.eps  # the CNI plugin's DEL removes it, with its interface
        assert sink.count("remove_endpoint") == 1  # gone.prod's


# ------------------------------------------------------------------ Cilium policies

def test_cnp_and_ccnp_lifecycle(kube: KubeTestServer, agent: Agent, tmp_path: Path) -> None:
    kube.add(CNPS, cnp("rule1"))
    with watching(kube, agent, tmp_path):
        p = policies(agent)[("CiliumNetworkPolicy", "prod", "rule1")]
        assert (p["file"], p["line"]) == ("k8s/CiliumNetworkPolicy/prod/rule1", 1)
        revision = render(agent.policies())["revision"]
        kube.patch(CNPS, "rule1", lambda o: o.update(status={"ok": True}))  # not policy: no new revision
        kube.patch(CNPS, "rule1", lambda o: o["spec"].update(egress=[{"toEntities": ["world"]}]))
        eventually(lambda: render(agent.policies())["revision"] == revision + 1)
        text = next(s.text for s in agent.state.sources if s.path == "k8s/CiliumNetworkPolicy/prod/rule1")
        assert "toEntities" in text and "status" not in text

        kube.add(CCNPS, ccnp("cluster-egress"))
        p = eventually(lambda: policies(agent).get(("CiliumClusterwideNetworkPolicy", "", "cluster-egress")))
        assert p["file"] == "k8s/CiliumClusterwideNetworkPolicy/cluster-egress"

        # The CLI shows where each came from.
        api = APIServer(agent.config.api_socket, agent)
        api.start()
        try:
            res = CliRunner().invoke(cli, ["policy", "get"], env={"CILIA_STATE_DIR": str(agent.config.state_dir)})
        finally:
            api.stop()
        assert res.exit_code == 0 and "k8s/CiliumNetworkPolicy/prod/rule1:1" in res.output, res.output

        kube.delete(CNPS, "rule1")
        eventually(lambda: ("CiliumNetworkPolicy", "prod", "rule1") not in policies(agent))
        kube.delete(CCNPS, "cluster-egress")
        eventually(lambda: not policies(agent))


def test_invalid_cnp_is_reported_and_changes_nothing(kube: KubeTestServer, agent: Agent, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    kube.add(CNPS, cnp("rule1"))
    kube.add(CNPS, cnp("broken", port="web!"))
    with caplog.at_level(logging.WARNING, logger="cilia.k8s.watch"), watching(kube, agent, tmp_path) as w:
        assert "CiliumNetworkPolicy prod/broken refused" in caplog.text
        assert "k8s/CiliumNetworkPolicy/prod/broken:16:" in caplog.text
        assert set(policies(agent)) == {("CiliumNetworkPolicy", "prod", "rule1")}
        [bad] = w.status()["rejected"]
        assert (bad["kind"], bad["namespace"], bad["name"]) == ("CiliumNetworkPolicy", "prod", "broken")
        assert bad["problems"] == ['k8s/CiliumNetworkPolicy/prod/broken:16: ingress[0].toPorts[0].ports[0].port: '
                                   '"web!" is not a port number or name']
        revision = render(agent.policies())["revision"]
        kube.modify(CNPS, cnp("rule1", port="99999"))
        eventually(lambda: any(r["name"] == "rule1" for r in w.status()["rejected"]), what="rule1 rejected")
        assert render(agent.policies())["revision"] == revision  # the valid version stays in force
        text = next(s.text for s in agent.state.sources if s.path == "k8s/CiliumNetworkPolicy/prod/rule1")
        assert "'80'" in text
        assert "refused CiliumNetworkPolicy prod/rule1" in format_status(w.status())

        kube.modify(CNPS, cnp("rule1", port="8080"))
        eventually(lambda: all(r["name"] != "rule1" for r in w.status()["rejected"]), what="rule1 accepted")
        assert render(agent.policies())["revision"] == revision + 1
        kube.delete(CNPS, "broken")
        eventually(lambda: not w.status()["rejected"], what="the deleted object is no longer reported")
        assert render(agent.policies())["revision"] == revision + 1


@pytest.mark.parametrize("exact", [False, True], ids=["delete-by-name", "delete-by-key"])
def test_deleting_a_ccnp_keeps_cnps_of_its_name(kube: KubeTestServer, agent: Agent, tmp_path: Path,
                                               exact: bool) -> None:
    kube.add(CCNPS, ccnp("shared"))
    kube.add(CNPS, cnp("shared"))
    kube.add(NETPOLS, netpol("np"))
    sink = ExactAgent(agent) if exact else Counting(agent)
    with watching(kube, sink, tmp_path):
        assert len(policies(agent)) == 3
        kube.delete(CCNPS, "shared")
        eventually(lambda: ("CiliumClusterwideNetworkPolicy", "", "shared") not in policies(agent))
        time.sleep(0.1)
        assert set(policies(agent)) == {("CiliumNetworkPolicy", "prod", "shared"),
                                        ("CiliumNetworkPolicy", "prod", "networkpolicy.np")}
        assert sink.count("delete_policy_keys") == (1 if exact else 0)


# ------------------------------------------------------------------ NetworkPolicy

def test_network_policy_add_and_delete(kube: KubeTestServer, agent: Agent, tmp_path: Path) -> None:
    kube.add(NAMESPACES, namespace("prod"))
    kube.add(PODS, pod("web", ip="10.0.0.5", labels={"app": "web"}))
    kube.add(CNPS, cnp("allow", app="other"))
    kube.add(NETPOLS, netpol("allow", ingress=[{"from": [{"podSelector": {"matchLabels": {"app": "fe"}}}],
                                                "ports": [{"port": "http"}]}]))
    with watching(kube, agent, tmp_path):
        ps = policies(agent)
        derived = ps[("CiliumNetworkPolicy", "prod", "networkpolicy.allow")]
        assert derived["file"] == "k8s/NetworkPolicy/prod/allow"
        assert ("CiliumNetworkPolicy", "prod", "allow") in ps  # a CNP of the NetworkPolicy's name is another policy
        assert endpoints(agent)["web.prod"]["enforcement"]["ingress"]

        # A CNP arrives with the derived policy's name: the NetworkPolicy's policy moves aside.
        kube.add(CNPS, cnp("networkpolicy.allow", app="nothing"))
        moved = eventually(lambda: policies(agent).get(("CiliumNetworkPolicy", "prod", "networkpolicy-2.allow")))
        assert moved["file"] == "k8s/NetworkPolicy/prod/allow"
        eventually(lambda: policies(agent)[("CiliumNetworkPolicy", "prod", "networkpolicy.allow")]["file"]
                   == "k8s/CiliumNetworkPolicy/prod/networkpolicy.allow", what="the CNP took its name")

        kube.delete(NETPOLS, "allow")
        eventually(lambda: ("CiliumNetworkPolicy", "prod", "networkpolicy-2.allow") not in policies(agent))
        assert set(policies(agent)) == {("CiliumNetworkPolicy", "prod", "allow"),
                                        ("CiliumNetworkPolicy", "prod", "networkpolicy.allow")}
        assert not endpoints(agent)["web.prod"]["enforcement"]["ingress"]

        kube.add(NETPOLS, netpol("deny-egress", podSelector={}, policyTypes=["Egress"]))
        eventually(lambda: endpoints(agent)["web.prod"]["enforcement"]["egress"], what="egress default deny")


# ------------------------------------------------------------------ the watch protocol

def _populate(kube: KubeTestServer) -> None:
    kube.add(NAMESPACES, namespace("prod"))
    for name, ip in (("a", "10.0.0.1"), ("b", "10.0.0.2"), ("d", "10.0.0.4")):
        kube.add(PODS, pod(name, ip=ip))
    kube.add(CNPS, cnp("x"))
    kube.add(CNPS, cnp("z"))


def _change_everything(kube: KubeTestServer) -> None:
    kube.add(PODS, pod("c", ip="10.0.0.3"))
    kube.delete(PODS, "a")
    kube.patch(PODS, "b", lambda p: p["metadata"]["labels"].update(tier="new"))
    kube.modify(CNPS, cnp("x", port="81"))
    kube.add(CNPS, cnp("y"))


def _check_changed(agent: Agent) -> None:
    eps = endpoints(agent)
    assert sorted(eps) == ["b.prod", "c.prod", "d.prod"]
    assert "k8s:tier=new" in eps["b.prod"]["labels"]
    assert set(policies(agent)) == {("CiliumNetworkPolicy", "prod", n) for n in "xyz"}
    text = next(s.text for s in agent.state.sources if s.path == "k8s/CiliumNetworkPolicy/prod/x")
    assert "'81'" in text


@pytest.mark.parametrize("gone", ["event", "http"])
def test_gone_relists_without_losing_or_duplicating_state(agent: Agent, tmp_path: Path, gone: str) -> None:
    kube = KubeTestServer(gone=gone).start()
    try:
        _populate(kube)
        sink = Counting(agent)
        with watching(kube, sink, tmp_path) as w:
            sink.calls.clear()
            with kube.paused():
                _change_everything(kube)
                if gone == "http":
                    kube.drop_watches()  # the watches come back with their old resourceVersion: 410 status
                kube.expire()
                eventually(lambda: all(w.status()["resources"][r]["relists"] >= 1 for r in (PODS, CNPS)),
                           what="relisted after 410")
                eventually(lambda: _check_changed(agent) is None, what="the changes")
            assert kube.count(PODS, "list") >= 2
            # Only what changed reached the agent: d and z were not touched again.
            added = [spec.name for n, spec in sink.calls if n == "add_endpoint"]
            imported = [p for n, paths in sink.calls if n == "import_policies" for p in paths]
            assert sorted(added) == ["b.prod", "c.prod"]
            assert sorted(imported) == ["k8s/CiliumNetworkPolicy/prod/x", "k8s/CiliumNetworkPolicy/prod/y"]
            assert [x for n, x in sink.calls if n == "remove_endpoint"] == ["a.prod"]
            # And it keeps watching from the new list.
            kube.add(PODS, pod("e", ip="10.0.0.9"))
            eventually(lambda: "e.prod" in endpoints(agent))
    finally:
        kube.stop()


def test_a_dropped_stream_resumes_from_its_resource_version(kube: KubeTestServer, agent: Agent,
                                                            tmp_path: Path) -> None:
    _populate(kube)
    sink = Counting(agent)
    with watching(kube, sink, tmp_path) as w:
        kube.wait_watching(PODS)
        rv = w.status()["resources"][PODS]["resource_version"]
        watches = kube.count(PODS, "watch")
        sink.calls.clear()
        with kube.paused():
            _change_everything(kube)
            kube.drop_watches()
            eventually(lambda: kube.count(PODS, "watch") > watches, what="a new watch")
        eventually(lambda: _check_changed(agent) is None, what="the changes")
        resumed = [q for r, what, q in kube.requests if r == PODS and what == "watch"][watches]
        assert resumed["resourceVersion"] == rv
        st = w.status()["resources"][PODS]
        assert st["lists"] == 1 and w.status()["resources"][CNPS]["lists"] == 1  # no relist
        assert st["reconnects"] >= 1 and st["relists"] == 0 and st["connected"]
        assert sorted(spec.name for n, spec in sink.calls if n == "add_endpoint") == ["b.prod", "c.prod"]


def test_bookmarks_only_move_the_resource_version(kube: KubeTestServer, agent: Agent, tmp_path: Path) -> None:
    _populate(kube)
    with watching(kube, agent, tmp_path) as w:
        kube.wait_watching(PODS)
        revision = render(agent.policies())["revision"]
        kube.add(NETPOLS, netpol("elsewhere", namespace="dev"))  # moves the resourceVersion, not the pods'
        eventually(lambda: render(agent.policies())["revision"] == revision + 1)
        kube.bookmark()
        target = str(kube.resource_version)
        eventually(lambda: w.status()["resources"][PODS]["resource_version"] == target, what="bookmark")
        assert render(agent.policies())["revision"] == revision + 1 and len(endpoints(agent)) == 3


def test_errors_are_counted_and_retried(kube: KubeTestServer, agent: Agent, tmp_path: Path) -> None:
    kube.add(CNPS, cnp("rule1"))
    kube.fail(CNPS, 500, times=2)
    with watching(kube, agent, tmp_path) as w:
        st = w.status()["resources"][CNPS]
        assert st["errors"] == 2 and "500" in st["last_error"] and st["connected"] and st["synced"]
        assert ("CiliumNetworkPolicy", "prod", "rule1") in policies(agent)
        kube.fail(CNPS, 503, times=1)
        kube.drop_watches()  # (a broken stream may count as an error too)
        eventually(lambda: "503" in (st := w.status())["resources"][CNPS]["last_error"] and st["connected"])
        assert w.status()["resources"][CNPS]["errors"] >= 3
        text = format_status(w.status())
        assert text.startswith(f"Kubernetes:  connected, synced, pods of node {NODE}")
        assert "ciliumnetworkpolicies" in text and "last: 503" in text


def test_a_restarted_agent_is_reconciled(kube: KubeTestServer, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _populate(kube)
    kube.add(NETPOLS, netpol("np"))
    kube.add(CCNPS, ccnp("cw"))
    with running_agent(state) as agent, watching(kube, agent, tmp_path):
        assert len(endpoints(agent)) == 3 and len(policies(agent)) == 4
    # While nobody watches:
    kube.delete(PODS, "a")
    kube.delete(CNPS, "x")
    kube.delete(NETPOLS, "np")
    kube.delete(CCNPS, "cw")
    kube.expire()
    with running_agent(state) as agent:
        assert len(endpoints(agent)) == 3 and len(policies(agent)) == 4  # what it persisted
        sink = Counting(agent)
        with watching(kube, sink, tmp_path):
            assert sorted(endpoints(agent)) == ["b.prod", "d.prod"]
            assert set(policies(agent)) == {("CiliumNetworkPolicy", "prod", "z")}
            assert sink.count("add_endpoint") == 0  # b and d were already right

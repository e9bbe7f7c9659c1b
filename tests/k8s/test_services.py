"""Kubernetes Services and EndpointSlices → the agent's services: the conversion (ClusterIP,
NodePort, named target ports, slice conditions) and the watcher against the Kubernetes TEST
SERVER (tests/k8s/apiserver.py; no API server can run here) feeding a real agent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.apiserver import KubeTestServer
from tests.k8s.test_watch import FAST, eventually, pod, running_agent, watching

from cilia.agent.daemon import Agent
from cilia.k8s.convert import ConvertError
from cilia.k8s.services import k8s_services
from cilia.policy import Protocol, Verdict
from cilia.services.model import Backend, Frontend, Service


def service(name: str = "db", namespace: str = "prod", kind: str = "ClusterIP", **spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "labels": {"tier": "data"}},
            "spec": {"type": kind, "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "sql", "port": 5432, "targetPort": 15432, "protocol": "TCP"}], **spec}}


def endpoint(ip: str, ready: bool = True, terminating: bool = False, pod_name: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"addresses": [ip], "conditions": {"ready": ready, "serving": ready or terminating,
                                                             "terminating": terminating}}
    if pod_name:
        out["targetRef"] = {"kind": "Pod", "namespace": "prod", "name": pod_name}
    return out


TO_DATA_SERVICES = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-db, namespace: prod}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toServices: [{k8sServiceSelector: {selector: {matchLabels: {tier: data}}}}]
"""


def endpoint_slice(name: str, service_name: str, *endpoints: dict[str, Any],
                   ports: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "prod", "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4", "endpoints": list(endpoints),
            "ports": [{"name": "sql", "port": 15432, "protocol": "TCP"}] if ports is None else ports}


# ------------------------------------------------------------------ conversion

def test_cluster_ip_with_slice_conditions() -> None:
    slices = [endpoint_slice("db-1", "db", endpoint("10.0.0.11"), endpoint("10.0.0.10", ready=False,
                                                                             terminating=True)),
              endpoint_slice("db-2", "db", endpoint("10.0.0.12", ready=False))]
    (s,) = k8s_services(service(sessionAffinity="ClientIP"), slices, {})
    assert s.frontend == Frontend("10.96.0.10", 5432, "TCP") and s.type == "ClusterIP"
    assert (s.name, s.namespace, s.labels) == ("db", "prod", (("tier", "data"),))
    assert s.backends == (Backend("10.0.0.10", 15432, 1, "terminating"), Backend("10.0.0.11", 15432),
                          Backend("10.0.0.12", 15432, 1, "not-ready"))
    assert s.affinity_seconds == 10800


def test_node_port_and_named_target_ports() -> None:
    spec_ports = [{"name": "web", "port": 80, "targetPort": "http", "nodePort": 30080, "protocol": "TCP"},
                  {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
                  {"name": "sig", "port": 9, "protocol": "SCTP"}]
    pods = {("prod", "web-1"): pod("web-1"), ("prod", "web-2"): {**pod("web-2"), "spec": {"containers": [
        {"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]}}}
    # the slice has no port named web (as if the controller had not resolved it): the pods' container ports do
    slices = [endpoint_slice("web-1", "web", endpoint("10.0.0.20", pod_name="web-1"),
                             endpoint("10.0.0.21", pod_name="web-2"), endpoint("10.0.0.22"),
                             ports=[{"name": "dns", "port": 5353, "protocol": "UDP"}])]
    services = k8s_services(service("web", kind="NodePort", ports=spec_ports), slices, pods)
    assert [(str(s.frontend), s.type, [str(b) for b in s.backends]) for s in services] == [
        ("10.96.0.10:80/TCP", "ClusterIP", ["10.0.0.20:80", "10.0.0.21:8080"]),  # 10.0.0.22: no pod, no port
        ("0.0.0.0:30080/TCP", "NodePort", ["10.0.0.20:80", "10.0.0.21:8080"]),
        ("10.96.0.10:53/UDP", "ClusterIP", ["10.0.0.20:5353", "10.0.0.21:5353", "10.0.0.22:5353"]),
    ]  # SCTP is left out


def test_headless_and_external_name_have_no_frontend_and_bad_fields_are_named() -> None:
    assert k8s_services(service(clusterIP="None", clusterIPs=["None"]), [], {}) == []
    assert k8s_services(service(kind="ExternalName", externalName="db.example.com"), [], {}) == []
    bad = service(kind="NodePort", ports=[{"name": "sql", "port": 5432, "nodePort": 0}])
    assert len(k8s_services(bad, [], {})) == 1  # nodePort 0: not allocated, no NodePort frontend
    bad = service(ports=[{"name": "sql", "port": 70000}])
    with pytest.raises(ConvertError, match=r"spec.ports\[0\]: frontend.port: 70000 is outside 1-65535"):
        k8s_services(bad, [], {})
    with pytest.raises(ConvertError, match="timeoutSeconds: 0 is outside"):
        k8s_services(service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 0}}),
                     [], {})


# ------------------------------------------------------------------ the watcher and a real agent

@pytest.fixture
def kube() -> Iterator[KubeTestServer]:
    server = KubeTestServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with running_agent(tmp_path / "state") as a:
        yield a


def backends(agent: Agent, name: str = "db") -> list[tuple[str, str]]:
    return [(str(b), b.state) for s in agent.services().services if s.name == name for b in s.backends]


def test_services_and_slices_drive_the_agents_services(kube: KubeTestServer, agent: Agent, tmp_path: Path) -> None:
    kube.add("services", service())
    kube.add("endpointslices", endpoint_slice("db-1", "db", endpoint("10.0.0.11")))
    with watching(kube, agent, tmp_path, FAST) as w:
        # synced: the first revision already has the backends
        assert backends(agent) == [("10.0.0.11:15432", "active")]
        (s,) = agent.services().services
        assert (s.frontend, s.namespace) == (Frontend("10.96.0.10", 5432), "prod")
        assert w.status()["resources"]["endpointslices"]["synced"]
        kube.add("endpointslices", endpoint_slice("db-2", "db", endpoint("10.0.0.12", ready=False)))
        eventually(lambda: backends(agent) == [("10.0.0.11:15432", "active"), ("10.0.0.12:15432", "not-ready")])
        kube.patch("endpointslices", "db-1", lambda o: o["endpoints"][0]["conditions"].update(
            ready=False, terminating=True), "prod")
        eventually(lambda: ("10.0.0.11:15432", "terminating") in backends(agent))
        kube.patch("services", "db", lambda o: o["spec"].update(type="NodePort", ports=[
            {"name": "sql", "port": 5432, "targetPort": 15432, "nodePort": 30432, "protocol": "TCP"}]), "prod")
        eventually(lambda: sorted(s.type for s in agent.services().services) == ["ClusterIP", "NodePort"])
        ids = {s.type: s.id for s in agent.services().services}
        kube.patch("endpointslices", "db-2", lambda o: o["endpoints"][0]["conditions"].update(ready=True), "prod")
        eventually(lambda: ("10.0.0.12:15432", "active") in backends(agent))
        assert {s.type: s.id for s in agent.services().services} == ids  # the same ids: the same BPF entries
        # a Service the agent refuses (its frontend is another service's) is reported, nothing applied
        kube.add("services", {**service("clash"), "spec": {**service()["spec"], "clusterIP": "10.96.0.99",
                                                          "clusterIPs": ["10.96.0.10"]}})
        eventually(lambda: any(r["name"] == "clash" for r in w.status()["rejected"]))
        assert "already service" in next(r["error"] for r in w.status()["rejected"] if r["name"] == "clash")
        kube.delete("services", "clash", "prod")
        kube.delete("services", "db", "prod")
        eventually(lambda: agent.services().services == ())
    assert not w.status()["rejected"]


def test_a_relist_removes_services_deleted_while_nobody_watched(kube: KubeTestServer, agent: Agent,
                                                                tmp_path: Path) -> None:
    kube.add("services", service())
    with watching(kube, agent, tmp_path, FAST):
        assert len(agent.services().services) == 1
    agent.update_service(Service(50, Frontend("10.96.1.1", 80), (Backend("10.0.0.1", 80),)))  # API-made: no namespace
    kube.delete("services", "db", "prod")
    with watching(kube, agent, tmp_path, FAST):
        assert [s.id for s in agent.services().services] == [50]


def test_to_services_follows_a_kubernetes_service(kube: KubeTestServer, agent: Agent, tmp_path: Path) -> None:
    kube.add("pods", pod("web", ip="10.0.0.5"))
    kube.add("pods", pod("db", ip="10.0.0.11"))
    kube.add("services", service())
    kube.add("endpointslices", endpoint_slice("db-1", "db", endpoint("10.0.0.11")))
    with watching(kube, agent, tmp_path, FAST):
        agent.import_policies([("to-db.yaml", TO_DATA_SERVICES)])

        def verdict() -> Verdict | None:
            identity = agent.engine.ipcache.lookup("10.0.0.11")[1]
            hit = agent.engine.endpoint_policy("web.prod").map_state.egress.lookup(identity, Protocol.TCP, 15432)
            return hit[2].verdict if hit is not None else None

        assert agent.engine.ipcache.lookup("10.0.0.11")[1] == agent.engine.identity_of("db.prod").id
        assert verdict() is Verdict.ALLOW
        kube.delete("endpointslices", "db-1", "prod")
        eventually(lambda: verdict() is None)

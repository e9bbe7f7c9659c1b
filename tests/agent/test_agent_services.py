"""Services through a real agent (its REST API and the `cilia service` commands): checked before
anything is applied, one revision per change, persisted and restored, handed to the sinks in
``Desired.services``, and feeding toServices."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cilia.agent.state import load_state, save_state

from tests.agent.agent_support import agent_in_process, run_cli

from cilia.agent.client import AgentClient, APIError
from cilia.agent.daemon import Agent
from cilia.policy import Protocol, Verdict
from cilia.services.model import Backend, Frontend, Service

TO_DB = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-to-db, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  egress:
  - toServices:
    - k8sService: {serviceName: db}
"""


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with agent_in_process(tmp_path / "state", envoy="none") as a:
        yield a


def cli(agent: Agent, *args: str) -> tuple[int, str, str]:
    res = run_cli(agent.config.state_dir, *args)
    return res.code, res.out, res.err


def update(agent: Agent, *args: str) -> int:
    code, out, err = cli(agent, "service", "update", *args)
    assert code == 0, err
    return int(out.split("Revision: ")[1])


def test_update_list_get_delete_through_the_cli(agent: Agent) -> None:
    revision = update(agent, "--id", "7", "--frontend", "10.96.0.10:80", "--backends", "10.0.0.10:8080,10.0.0.11:8080",
                      "--weights", "1,3", "--algorithm", "weighted-rr", "--session-affinity", "30",
                      "--name", "prod/deathstar", "--labels", "app=deathstar")
    assert revision == agent.revision
    code, out, _ = cli(agent, "service", "list")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["ID", "FRONTEND", "TYPE", "BACKENDS", "ALGORITHM", "NAME"]
    assert row.split() == ["7", "10.96.0.10:80/TCP", "ClusterIP", "10.0.0.10:8080,", "10.0.0.11:8080", "weighted-rr",
                           "prod/deathstar"]
    _, wide, _ = cli(agent, "service", "list", "-o", "wide")
    assert "10.0.0.11:8080 (weight 3)" in wide and "30s" in wide and "app=deathstar" in wide
    _, raw, _ = cli(agent, "service", "get", "7", "-o", "json")
    assert json.loads(raw) == {
        "id": 7, "frontend": {"address": "10.96.0.10", "port": 80, "protocol": "TCP"},
        "backends": [{"address": "10.0.0.10", "port": 8080, "weight": 1, "state": "active"},
                     {"address": "10.0.0.11", "port": 8080, "weight": 3, "state": "active"}],
        "algorithm": "weighted-rr", "affinity_seconds": 30, "type": "ClusterIP", "name": "deathstar",
        "namespace": "prod", "labels": {"app": "deathstar"}}
    _, yaml_out, _ = cli(agent, "service", "get", "7", "-o", "yaml")
    assert "algorithm: weighted-rr" in yaml_out
    _, text, _ = cli(agent, "service", "get", "7")
    assert "Backends:\n  10.0.0.10:8080\n  10.0.0.11:8080 (weight 3)" in text
    # the sinks get it: Desired.services, by id
    update(agent, "--id", "2", "--frontend", "10.96.0.2:53/UDP", "--backends", "10.0.0.12:53")
    assert agent._desired is not None
    assert [s.id for s in agent._desired.services] == [2, 7]
    assert agent._desired.services[0].frontend == Frontend("10.96.0.2", 53, "UDP")
    code, out, _ = cli(agent, "service", "delete", "7")
    assert code == 0 and out.strip() == f"Revision: {agent.revision}"
    assert [s.id for s in agent._desired.services] == [2]
    code, _, err = cli(agent, "service", "get", "7")
    assert code == 2 and "no service with id 7" in err
    code, _, err = cli(agent, "service", "delete", "7")
    assert code == 2 and "no service with id 7" in err


@pytest.mark.parametrize(("args", "says"), [
    (("--frontend", "10.96.0.10:0", "--backends", "10.0.0.1:80"), "--frontend: frontend.port: 0 is outside 1-65535"),
    (("--frontend", "10.96.0.10:80", "--backends", "10.0.0.1:80", "--weights", "0"),
     "--weights: backends[0].weight: 0 is outside 1-65535"),
    (("--frontend", "10.96.0.10:80", "--backends", "10.0.0.1:80", "--weights", "x"),
     "--weights: backends[0].weight: 'x' is not a positive integer"),
    (("--frontend", "10.96.0.10:80", "--backends", "10.0.0.1:70000"),
     "--backends: backends[0].port: 70000 is outside 1-65535"),
    (("--frontend", "10.96.0.10:80/SCTP",), "--frontend: frontend.protocol: 'SCTP' is not one of TCP, UDP"),
    (("--frontend", "10.96.0.10:80", "--session-affinity", "-5"), "--session-affinity: affinity_seconds"),
])
def test_bad_flags_exit_2_naming_the_field_and_nothing_is_applied(agent: Agent, args: tuple[str, ...],
                                                                   says: str) -> None:
    revision = agent.revision
    code, _, err = cli(agent, "service", "update", "--id", "1", *args)
    assert code == 2
    assert says in err
    assert agent.revision == revision and not agent.services().services


def test_the_api_refuses_bad_input_and_clashes_with_nothing_applied(agent: Agent) -> None:
    client = AgentClient(agent.config.api_socket)
    try:
        client.add_endpoint({"name": "db", "labels": ["app=db"], "ips": ["10.0.0.10"]})
        good = {"id": 1, "frontend": {"address": "10.96.0.10", "port": 80},
                "backends": [{"address": "10.0.0.10", "port": 5432}]}
        client.update_service(good)
        revision = agent.revision
        for body, says in [
            ({**good, "id": 2, "backends": [{"address": "10.0.0.10", "port": 5432, "weight": -1}]},
             "backends[0].weight: -1 is outside 1-65535"),
            ({**good, "id": 2}, "frontend: 10.96.0.10:80/TCP is already service 1's frontend"),
            ({**good, "id": 2, "frontend": {"address": "10.0.0.10", "port": 80}},
             "frontend.address: 10.0.0.10 is endpoint db's address"),
            ({**good, "algorithm": "least-conn"}, "algorithm: 'least-conn' is not one of maglev, random, weighted-rr"),
            ({**good, "backends": [{"address": "10.0.0.1", "port": 1}] * 2}, "backends[1]: 10.0.0.1:1 is already"),
            ({**good, "affinity_seconds": "long"}, "affinity_seconds: expected seconds of session affinity"),
        ]:
            with pytest.raises(APIError) as e:
                client.update_service(body)
            assert e.value.status == 400
            assert says in str(e.value) and "nothing was applied" in str(e.value)
        with pytest.raises(APIError, match="ips: 10.96.0.10 is service 1's frontend"):
            client.add_endpoint({"name": "web", "labels": ["app=web"], "ips": ["10.96.0.10"]})
        assert agent.revision == revision
        assert [s.id for s in agent.services().services] == [1]
    finally:
        client.close()


def test_services_are_persisted_and_restored(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_in_process(state, envoy="none") as first:
        update(first, "--id", "3", "--frontend", "10.96.0.3:443", "--backends", "10.0.0.10:8443,10.0.0.11:8443",
               "--algorithm", "random", "--name", "web")
        update(first, "--id", "1", "--frontend", "0.0.0.0:30080", "--backends", "10.0.0.10:80", "--type", "NodePort")
        services, revision = first.services().services, first.revision
    assert sorted(load_state(state).services) == [1, 3]  # state.json and its journal
    with agent_in_process(state, envoy="none") as second:
        assert second.services().services == services
        assert second.revision == revision
        assert second._desired is not None and second._desired.services == services
        assert cli(second, "service", "get", "3", "-o", "json")[1].count("10.0.0.11") == 1
        assert json.loads(cli(second, "status", "-o", "json")[1])["services"] == 2
        assert "Services: 2" in cli(second, "status")[1]


def test_a_corrupt_persisted_service_names_the_field(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_in_process(state, envoy="none") as first:
        update(first, "--id", "3", "--frontend", "10.96.0.3:443", "--backends", "10.0.0.10:8443")
    save_state(state, load_state(state))  # the journal folded into state.json, to damage it there
    saved = json.loads((state / "state.json").read_text())
    saved["services"][0]["backends"][0]["weight"] = 0
    (state / "state.json").write_text(json.dumps(saved))
    from cilia.specs import StateError
    with pytest.raises(StateError, match=r"services\[0\].backends\[0\].weight: 0 is outside"):
        with agent_in_process(state, envoy="none"):
            pass


def test_to_services_follows_the_agents_services(agent: Agent) -> None:
    client = AgentClient(agent.config.api_socket)
    try:
        for name, ip in (("web", "10.0.0.1"), ("db", "10.0.0.10"), ("other", "10.0.0.20")):
            client.add_endpoint({"name": name, "labels": [f"app={name}"], "ips": [ip]})
        imported = client.import_policies([("to-db.yaml", TO_DB)])
        assert imported["policies"][0]["notes"] == []  # toServices is enforced now: no "not enforced" note

        def egress(address: str) -> Verdict | None:
            identity = agent.engine.ipcache.lookup(address)[1]
            hit = agent.engine.endpoint_policy("web").map_state.egress.lookup(identity, Protocol.TCP, 5432)
            return hit[2].verdict if hit is not None else None

        assert egress("10.0.0.10") is None  # no service named db: fail closed
        client.update_service({"id": 1, "frontend": {"address": "10.96.0.10", "port": 5432}, "name": "db",
                               "backends": [{"address": "10.0.0.10", "port": 5432}]})
        assert egress("10.0.0.10") is Verdict.ALLOW
        assert egress("10.0.0.20") is None
        web = agent._desired.endpoints["web"] if agent._desired else None
        assert web is not None and web.map_state is agent.engine.endpoint_policy("web").map_state
        client.update_service({"id": 1, "frontend": {"address": "10.96.0.10", "port": 5432}, "name": "db",
                               "backends": [{"address": "10.0.0.20", "port": 5432}]})
        assert egress("10.0.0.10") is None and egress("10.0.0.20") is Verdict.ALLOW
        client.delete_service(1)
        assert egress("10.0.0.20") is None
    finally:
        client.close()


def test_a_kubernetes_service_keeps_its_ids_across_updates(agent: Agent) -> None:
    def svc(address: str, port: int, *backends: str) -> Service:
        return Service(0, Frontend(address, port), tuple(Backend(b, 8080) for b in backends))

    update(agent, "--id", "1", "--frontend", "10.96.0.1:80", "--backends", "10.0.0.9:80")  # an API-made one
    assert agent.replace_named_services("default", "web", [svc("10.96.0.5", 80, "10.0.0.10"),
                                                           svc("10.96.0.5", 443, "10.0.0.10")]) is not None
    ids = {s.frontend.port: s.id for s in agent.services().services if s.name == "web"}
    assert ids == {80: 2, 443: 3}
    revision = agent.revision
    assert agent.replace_named_services("default", "web", [svc("10.96.0.5", 80, "10.0.0.10"),
                                                           svc("10.96.0.5", 443, "10.0.0.10")]) is None
    assert agent.revision == revision  # unchanged: no revision
    agent.replace_named_services("default", "web", [svc("10.96.0.5", 443, "10.0.0.11")])
    assert [(s.id, s.frontend.port, s.backends[0].address) for s in agent.services().services] == [
        (1, 80, "10.0.0.9"), (3, 443, "10.0.0.11")]
    assert agent.revision == revision + 1
    agent.replace_named_services("default", "web", [])
    assert [s.id for s in agent.services().services] == [1]


def test_live_trace_to_a_service_address_explains_the_backend(agent: Agent) -> None:
    client = AgentClient(agent.config.api_socket)
    try:
        for name, ip in (("web", "10.0.0.1"), ("db", "10.0.0.10"), ("other", "10.0.0.20")):
            client.add_endpoint({"name": name, "labels": [f"app={name}"], "ips": [ip]})
        client.import_policies([("to-db.yaml", TO_DB)])
        client.update_service({"id": 1, "frontend": {"address": "10.96.0.10", "port": 5432}, "name": "db",
                               "backends": [{"address": "10.0.0.10", "port": 15432}]})
        client.update_service({"id": 2, "frontend": {"address": "10.96.0.20", "port": 80}, "name": "other",
                               "backends": [{"address": "10.0.0.20", "port": 8080}]})
    finally:
        client.close()
    code, out, err = cli(agent, "policy", "trace", "--from-endpoint", "web", "--dst-cidr", "10.96.0.10",
                         "--dport", "5432", "-o", "json")
    assert code == 0, err
    result = json.loads(out)
    assert result["verdict"] == "allowed"
    assert result["destination"]["labels"] == ["k8s:app=db"]  # the backend is the db endpoint: its identity
    assert result["dport"] == 15432
    assert result["service"]["chosen"] == "10.0.0.10:15432" and result["service"]["name"] == "default/db"
    code, text, _ = cli(agent, "policy", "trace", "--from-endpoint", "web", "--dst-cidr", "10.96.0.20",
                        "--dport", "80")
    assert code == 1
    assert "Service: service 2 (default/other) at 10.96.0.20:80/TCP: 1 active backend(s) of 1" in text
    assert "To: [k8s:app=other]" in text


def test_services_round_trip_through_the_state_files(tmp_path: Path) -> None:
    from cilia.agent.state import AgentState, load_state, save_state
    from cilia.specs import EndpointSpec

    state = AgentState(7, endpoints={"db": EndpointSpec.from_json({"name": "db", "labels": ["app=db"],
                                                                     "ips": ["10.0.0.10"]})},
                       services={i: Service(i, Frontend(f"10.96.0.{i}", 80), (Backend("10.0.0.10", 8080, i),),
                                            name=f"s{i}", labels=(("a", "1"), ("b", "2"))) for i in (3, 1, 2)})
    assert [s["id"] for s in state.to_json()["services"]] == [1, 2, 3]
    assert AgentState().to_json()["services"] == []
    save_state(tmp_path, state)
    assert load_state(tmp_path).services == state.services
    table = state.services  # counts the backends of all services (the map's limit is on the sum)
    assert table.backends == 3
    table[4] = Service(4, Frontend("10.96.0.4", 80), (Backend("10.0.0.1", 1), Backend("10.0.0.2", 1)))
    table[1] = Service(1, Frontend("10.96.0.1", 80), ())
    del table[2]
    assert table.pop(3).id == 3 and table.pop(3, None) is None
    assert table.backends == 2 == sum(len(s.backends) for s in table.values())
    assert [s.id for s in table.ordered()] == [1, 4]

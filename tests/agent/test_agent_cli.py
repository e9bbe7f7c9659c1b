"""The agent through its REST API and the `cilia` commands, with a real managed Envoy enforcing
Cilium's Star Wars policy (agent in this process; the restart tests run it as a process)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from tests.agent.agent_support import (
    DEATHSTAR, EXHAUST, LAND, STARWARS, TIEFIGHTER, XWING, add_starwars_endpoints, agent_in_process,
    deathstar_app, run_cli, shoot, wait_flows,
)

from cilia.agent.daemon import Agent
from cilia.agent.api import ROUTES
from cilia.xds import check


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with agent_in_process(tmp_path / "state") as a:
        yield a


@pytest.fixture
def starwars(agent: Agent) -> Iterator[Path]:
    """Star Wars endpoints registered, the deathstar app running; yields the state dir."""
    with deathstar_app() as app_port:
        add_starwars_endpoints(agent.config.state_dir, app_port)
        yield agent.config.state_dir


def import_and_wait(state: Path, *files: Path) -> int:
    res = run_cli(state, "policy", "import", *map(str, files))
    assert res.code == 0, res.err
    assert res.out.startswith("Revision: ")
    revision = int(res.out.split()[1])
    waited = run_cli(state, "policy", "wait", str(revision))
    assert waited.code == 0, waited.err
    assert waited.out.strip() == f"Revision {revision} realized by cilia-node"
    return revision


def test_starwars_policy_imported_through_the_agent_is_enforced_and_observed(starwars: Path, agent: Agent) -> None:
    starwars_agent = agent
    state = starwars
    assert shoot(XWING, *LAND) == "200 Ship landed"  # no policy yet: everything is allowed
    import_and_wait(state, STARWARS / "sw_l3_l4_l7_policy.yaml")
    assert shoot(TIEFIGHTER, *LAND) == "200 Ship landed"
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
    assert shoot(XWING, *LAND) == "blocked"
    assert not check(starwars_agent.cache.snapshot("cilia-node"))  # every listener's clusters exist

    http = [f for f in wait_flows(state, 4) if f["kind"] == "http"]  # xwing's one never reached HTTP
    denied = [f for f in http if f["verdict"] == "DROPPED"]
    assert len(denied) == 1
    put = denied[0]
    assert (put["l7"]["method"], put["l7"]["path"], put["l7"]["status"]) == ("PUT", "/v1/exhaust-port", 403)
    assert put["type"] == "L7" and put["drop_reason"] == "Policy denied (L7)" and put["direction"] == "ingress"
    assert put["source"]["endpoint"] == "tiefighter"
    assert "k8s:org=empire" in put["source"]["labels"] and "k8s:class=deathstar" in put["destination"]["labels"]
    assert put["source"]["identity"] != put["destination"]["identity"]
    assert put["rule"].endswith("sw_l3_l4_l7_policy.yaml:16)")  # the toPorts whose rules did not match
    landed = [f for f in http if f["verdict"] == "FORWARDED" and f["l7"]["path"] == "/v1/request-landing"
              and f["source"]["endpoint"] == "tiefighter"]
    assert landed and landed[-1]["rule"].endswith("sw_l3_l4_l7_policy.yaml:21)")  # the matching http rule
    text = run_cli(state, "observe", "--last", "50")
    assert any("DROPPED" in line and "PUT" in line and "tiefighter" in line for line in text.out.splitlines())


def test_invalid_import_changes_nothing_and_names_file_and_line(starwars: Path, tmp_path: Path) -> None:
    state = starwars
    good = import_and_wait(state, STARWARS / "sw_l3_l4_l7_policy.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text((STARWARS / "sw_l3_l4_policy.yaml").read_text().replace("endpointSelector", "endpointSelectr"))
    res = run_cli(state, "policy", "import", str(bad), str(STARWARS / "sw_l3_l4_policy.yaml"))
    assert res.code == 2
    assert f"{bad}:" in res.err and "endpointSelectr" in res.err and "nothing was imported" in res.err
    listed = run_cli(state, "policy", "get", "-o", "json").json()
    assert listed["revision"] == good
    assert [p["file"] for p in listed["policies"]] == [str(STARWARS / "sw_l3_l4_l7_policy.yaml")]
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"  # the L7 policy still stands


def test_policy_delete_by_name_and_all(starwars: Path) -> None:
    state = starwars
    import_and_wait(state, STARWARS / "sw_l3_l4_l7_policy.yaml")
    missing = run_cli(state, "policy", "delete", "no-such-policy")
    assert missing.code == 2 and "no policy named no-such-policy" in missing.err
    res = run_cli(state, "policy", "delete", "rule1", "-o", "json")
    assert res.code == 0 and res.json()["deleted"] == [["CiliumNetworkPolicy", "default", "rule1"]]
    assert run_cli(state, "policy", "wait", str(res.json()["revision"])).code == 0
    assert shoot(XWING, *LAND) == "200 Ship landed"  # no policy selects deathstar any more
    import_and_wait(state, STARWARS / "sw_l3_l4_policy.yaml")
    assert shoot(XWING, *LAND) == "blocked"
    res = run_cli(state, "policy", "delete", "--all")
    assert res.code == 0
    assert run_cli(state, "policy", "wait", res.out.split()[1]).code == 0
    assert run_cli(state, "policy", "get", "-o", "json").json()["policies"] == []
    assert shoot(XWING, *LAND) == "200 Ship landed"


def test_every_command_answers_json(starwars: Path) -> None:
    state = starwars
    revision = import_and_wait(state, STARWARS / "sw_l3_l4_policy.yaml")
    status = run_cli(state, "status", "-o", "json").json()
    assert status["healthy"] and status["revision"] == revision and status["endpoints"] == 3
    assert status["envoy"]["state"] == "running"
    assert {p["type"] for p in status["xds"]["proxies"] if p["node"] == "cilia-node"} >= {"Listener", "Cluster"}
    endpoints = run_cli(state, "endpoint", "list", "-o", "json").json()["endpoints"]
    by_name = {e["name"]: e for e in endpoints}
    assert by_name["deathstar"]["enforcement"] == {"ingress": True, "egress": False}
    assert by_name["deathstar"]["ports"][0]["port"] == 80
    identities = run_cli(state, "identity", "list", "-o", "json").json()["identities"]
    assert {i["id"] for i in identities} >= {e["identity"] for e in endpoints}
    assert any(i["kind"] == "reserved" and "reserved:world" in i["labels"] for i in identities)
    assert run_cli(state, "policy", "get", "-o", "json").json()["policies"][0]["name"] == "rule1"
    assert run_cli(state, "policy", "wait", str(revision), "-o", "json").json() == {
        "revision": revision, "proxies": ["cilia-node"]}
    assert run_cli(state, "observe", "-o", "json").code == 0
    added = run_cli(state, "endpoint", "add", "--name", "probe", "--labels", "app=probe", "--ip", "127.0.1.99",
                    "-o", "json").json()
    assert added["revision"] == revision + 1 and added["endpoint"]["identity"] >= 256
    assert run_cli(state, "endpoint", "delete", "probe", "-o", "json").json() == {"revision": revision + 2}
    text = run_cli(state, "endpoint", "list").out.splitlines()
    assert text[0].split() == ["ENDPOINT", "IDENTITY", "INGRESS", "EGRESS", "IPS", "PORTS", "INTERFACE", "LABELS"]


def test_endpoint_input_errors(agent: Agent) -> None:
    state = agent.config.state_dir
    same = run_cli(state, "endpoint", "add", "--name", "web", "--labels", "app=web", "--ip", DEATHSTAR,
                   "--port", "80")
    assert same.code == 2 and "give the app's own port as 80:APP_PORT" in same.err
    bad_port = run_cli(state, "endpoint", "add", "--name", "web", "--labels", "app=web", "--port", "http")
    assert bad_port.code == 2 and "expected [NAME=]PORT[/PROTO][:BACKEND]" in bad_port.err
    bad_ip = run_cli(state, "endpoint", "add", "--name", "web", "--labels", "app=web", "--ip", "10.0.0.300")
    assert bad_ip.code == 2 and "is not an IP address" in bad_ip.err
    assert run_cli(state, "endpoint", "list", "-o", "json").json() == {"endpoints": []}
    assert run_cli(state, "endpoint", "delete", "web").code == 2


def test_change_envoy_rejects_is_reverted_and_the_last_good_policy_stays_enforced(starwars: Path) -> None:
    state = starwars
    revision = import_and_wait(state, STARWARS / "sw_l3_l4_l7_policy.yaml")
    # 192.0.2.1 (TEST-NET-1) is not on this machine: Envoy cannot bind it and rejects the listeners.
    res = run_cli(state, "endpoint", "add", "--name", "ghost", "--labels", "app=ghost", "--ip", "192.0.2.1",
                  "--port", "80:8080")
    assert res.code == 1
    assert f"Envoy rejected revision {revision + 1}" in res.err and "192.0.2.1" in res.err
    assert f"the change was reverted (revision {revision + 2} restores the previous config)" in res.err
    assert [e["name"] for e in run_cli(state, "endpoint", "list", "-o", "json").json()["endpoints"]] == [
        "deathstar", "tiefighter", "xwing"]
    # The NACK is on record until the revert is acked; then the agent is healthy again. Waiting for the
    # rejected revision fails (the later one that restored the previous config does not realize it).
    waited = run_cli(state, "policy", "wait", str(revision + 1))
    assert waited.code == 1 and f"revision {revision + 1} was reverted" in waited.err and "192.0.2.1" in waited.err
    assert run_cli(state, "policy", "wait", str(revision + 2)).code == 0
    status = run_cli(state, "status", "-o", "json")
    assert status.code == 0 and status.json()["healthy"] is True and status.json()["revision"] == revision + 2
    listener = [p for p in status.json()["xds"]["proxies"] if p["type"] == "Listener"][0]
    assert listener["nacked"] and not listener["nack"]
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"  # Envoy kept enforcing throughout
    assert shoot(XWING, *LAND) == "blocked"


def test_nack_from_an_external_envoy_shows_in_status_and_wait(tmp_path: Path) -> None:
    """A proxy the agent does not manage (here over mutual TLS on TCP, --xds-address, its
    certificate naming node edge-1): its NACK is reported (not reverted) until fixed."""
    from tests.pki import Pki

    from cilia.envoy.bootstrap import XdsClientTls, build_bootstrap, to_json
    from cilia.netutil import free_port
    from cilia.envoy.supervisor import EnvoySupervisor
    from cilia.xds import ServerTls

    state = tmp_path / "state"
    admin = f"127.0.0.1:{free_port()}"
    bootstrap = tmp_path / "bootstrap.json"
    xds = f"127.0.0.1:{free_port()}"
    pki = Pki(tmp_path / "pki")
    server_tls = ServerTls(*pki.issue("agent", "cilia-agent"), pki.ca)
    bootstrap.write_text(to_json(build_bootstrap("edge-1", xds, admin,
                                                 xds_tls=XdsClientTls(*pki.issue("edge-1", "edge-1"), pki.ca))))
    with agent_in_process(state, envoy="external", xds_addresses=(xds,), node_id="edge-1",
                          xds_tls=server_tls), EnvoySupervisor(
            bootstrap, admin, log_path=tmp_path / "envoy.log", extra_args=["--drain-time-s", "0"]):
        res = run_cli(state, "endpoint", "add", "--name", "ghost", "--labels", "app=ghost", "--ip", "192.0.2.1",
                      "--port", "80:8080", "-o", "json")
        assert res.code == 0
        revision = res.json()["revision"]
        waited = run_cli(state, "policy", "wait", str(revision), "--timeout", "20")
        assert waited.code == 1
        assert f"proxy edge-1 rejected revision {revision}" in waited.err and "192.0.2.1" in waited.err
        assert xds in run_cli(state, "status", "-o", "json").json()["xds"]["addresses"]
        status = run_cli(state, "status", "-o", "json")
        assert status.code == 1 and status.json()["healthy"] is False
        assert any("192.0.2.1" in p["nack"] for p in status.json()["xds"]["proxies"] if p["node"] == "edge-1")
        assert "NACK" in run_cli(state, "status").out
        fixed = run_cli(state, "endpoint", "delete", "ghost").out.split()[1]
        assert run_cli(state, "policy", "wait", fixed).code == 0
        assert run_cli(state, "status", "-o", "json").json()["healthy"] is True


def test_agent_refuses_plaintext_tcp_xds_unless_chosen(tmp_path: Path) -> None:
    """A TCP --xds-address needs mutual TLS or an explicit --xds-insecure: a clear error at start."""
    state = tmp_path / "state"
    res = run_cli(state, "agent", "--envoy", "none", "--xds-address", "127.0.0.1:1")
    assert res.code == 2
    assert "--xds-address 127.0.0.1:1 is TCP" in res.err and "--xds-insecure" in res.err
    res = run_cli(state, "agent", "--envoy", "none", "--xds-address", "127.0.0.1:1", "--xds-tls-cert", "c.pem")
    assert res.code == 2 and "--xds-tls-key, --xds-tls-ca missing" in res.err
    (tmp_path / "c.pem").write_text("not pem")
    res = run_cli(state, "agent", "--envoy", "none", "--xds-address", "127.0.0.1:1", "--xds-tls-cert",
                  str(tmp_path / "c.pem"), "--xds-tls-key", str(tmp_path / "c.pem"), "--xds-tls-ca",
                  str(tmp_path / "c.pem"))
    assert res.code == 2 and "c.pem: not a PEM file" in res.err
    res = run_cli(state, "agent", "--envoy", "none", "--socket-group", "no-such-group-e2")
    assert res.code == 2 and "no such group" in res.err


def test_openapi_document_lists_exactly_the_served_routes(agent: Agent) -> None:
    from cilia.agent.client import AgentClient

    client = AgentClient(agent.config.api_socket)
    try:
        text = client._client.get("/v1/openapi.yaml").text
    finally:
        client.close()
    doc = YAML(typ="safe").load(text)
    documented = {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == set(ROUTES)
    unknown = run_cli(agent.config.state_dir, "status")  # sanity: the socket the document describes works
    assert unknown.code == 0


def test_a_second_agent_cannot_take_over_an_address_another_envoy_serves(starwars: Path, tmp_path: Path) -> None:
    """Two proxies must not share deathstar:80 (SO_REUSEPORT would split connections between
    them): the second Envoy's bind fails, it rejects the config and its agent reverts."""
    import_and_wait(starwars, STARWARS / "sw_l3_l4_l7_policy.yaml")
    with agent_in_process(tmp_path / "other") as other:
        res = run_cli(other.config.state_dir, "endpoint", "add", "--name", "deathstar",
                      "--labels", "org=empire,class=deathstar", "--ip", DEATHSTAR, "--port", "80:9")
        assert res.code == 1 and "Envoy rejected revision 1" in res.err and "reverted" in res.err
        for _ in range(10):  # every connection still meets the first agent's policy
            assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"

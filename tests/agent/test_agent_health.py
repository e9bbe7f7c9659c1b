"""Operating the agent: `cilia status --verbose`, /healthz, and the Prometheus metrics an operator
scrapes, checked against what really happened (requests through Envoy, a NACK, Envoy dying)."""

from __future__ import annotations

import json
import os
import re
import signal
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.agent.agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, add_starwars_endpoints, agent_in_process, deathstar_app, run_cli, shoot,
    wait_flows,
)

from cilia.agent.client import AgentClient
from cilia.agent.daemon import Agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with deathstar_app() as app_port, agent_in_process(tmp_path / "state") as a:
        add_starwars_endpoints(a.config.state_dir, app_port)
        res = run_cli(a.config.state_dir, "policy", "import", str(STARWARS / "sw_l3_l4_l7_policy.yaml"))
        assert res.code == 0 and run_cli(a.config.state_dir, "policy", "wait", res.out.split()[-1]).code == 0
        yield a


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


def test_status_verbose_healthz_and_metrics(agent: Agent) -> None:
    state = agent.config.state_dir
    assert shoot(TIEFIGHTER, *LAND) == "200 Ship landed"
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
    wait_flows(state, 2)
    client = AgentClient(state / "cilia.sock")
    try:
        assert client.healthz() == (200, {"status": "ok"})
        metrics = client.metrics()
    finally:
        client.close()
    assert _metric(metrics, "cilia_policy") == 1 and _metric(metrics, "cilia_policy_max_revision") >= 4
    assert _metric(metrics, "cilia_endpoint") == 3 and _metric(metrics, "cilia_envoy_up") == 1
    assert _metric(metrics, 'cilia_policy_l7_total{proxy_type="http",rule="denied"}') == 1
    assert _metric(metrics, 'cilia_policy_l7_total{proxy_type="http",rule="forwarded"}') >= 1
    assert _metric(metrics, 'cilia_proxy_redirects{protocol_l7="http"}') == 1
    assert _metric(metrics, 'cilia_xds_pushes_total{type="Listener"}') >= 1
    assert _metric(metrics, 'cilia_xds_acks_total{type="Listener"}') >= 1
    assert _metric(metrics, 'cilia_xds_push_latency_seconds_count{type="Listener"}') >= 1

    text = run_cli(state, "status", "--verbose")
    assert text.code == 0, text.out
    out = text.out
    assert re.search(r"Controllers: (\d+)/\1 healthy", out)
    assert "envoy-supervisor" in out and "envoy-listeners" in out
    assert re.search(r"Envoy admin: unix:/\S+/envoy-admin\.sock, ready True, version 1\.40", out)
    assert re.search(r"deathstar\s+identity \d+\s+ingress Enabled", out)
    assert 'proxy_type="http",rule="denied"} 1.0' in out and "Last errors: none" in out

    # Envoy dies: status and /healthz say so until the supervisor has it back
    assert agent.envoy is not None
    pid = agent.envoy.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    seen_down = False
    while time.monotonic() < deadline and not seen_down:
        status = run_cli(state, "status", "-o", "json").json()
        seen_down = not status["healthy"] and any("envoy" in r for r in status["reasons"])
    assert seen_down, "status never reported Envoy down"
    deadline = time.monotonic() + 30
    while run_cli(state, "status").code != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert run_cli(state, "status").code == 0  # back, with the same config
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"


def test_bugtool_archive(agent: Agent, tmp_path: Path) -> None:
    state = agent.config.state_dir
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
    wait_flows(state, 1)
    out = tmp_path / "bug.tar.gz"
    res = run_cli(state, "bugtool", "--archive", str(out))
    assert res.code == 0 and "wrote" in res.out, res.err
    with tarfile.open(out) as tar:
        names = {n.split("/", 1)[1]: n for n in tar.getnames()}
        assert {"status.json", "config.json", "policies.json", "endpoints.json", "identities.json", "services.json",
                "flows.jsonl", "monitor.jsonl", "envoy-config-dump.json", "envoy.log",
                "policy-sources.json"} <= set(names)
        read = lambda n: tar.extractfile(names[n]).read().decode()  # type: ignore[union-attr]  # noqa: E731
        assert json.loads(read("status.json"))["revision"] >= 4
        config = json.loads(read("config.json"))  # nested settings as objects, paths as text
        assert config["fqdn"]["min_ttl"] == agent.config.fqdn.min_ttl and config["state_dir"] == str(state)
        assert any(f["flow"]["verdict"] == "DROPPED" for f in map(json.loads, read("flows.jsonl").splitlines()))
        dump = json.loads(read("envoy-config-dump.json"))
        assert "deathstar-ingress-80" in json.dumps(dump)
        policy_file = next(n for n in names if n.startswith("policies/") and n.endswith("sw_l3_l4_l7_policy.yaml"))
        assert read(policy_file) == (STARWARS / "sw_l3_l4_l7_policy.yaml").read_text()
        assert "envoy" in read("envoy.log").lower()


def test_a_drained_envoy_makes_health_degraded(agent: Agent) -> None:
    """POST /drain_listeners (through the admin socket) stops every listener while Envoy still says
    LIVE and every ACK stands; health compares what Envoy serves with what was sent."""
    from cilia.envoy.admin import AdminClient

    client = AgentClient(agent.config.api_socket)
    try:
        assert client.healthz() == (200, {"status": "ok"})
        assert shoot(TIEFIGHTER, *LAND) == "200 Ship landed"
        assert agent.admin_address is not None
        AdminClient(agent.admin_address).drain_listeners()
        code, body = client.healthz()
        assert code == 503 and any("envoy-listeners" in r and "stopped its listeners" in r for r in body["reasons"])
        assert shoot(TIEFIGHTER, *LAND) != "200 Ship landed"  # and indeed nothing is served
    finally:
        client.close()

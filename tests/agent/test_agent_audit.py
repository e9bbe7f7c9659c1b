"""Audit mode through the agent and a real Envoy: a policy imported with --audit (or an endpoint
added with --audit) lets through what it would drop, and every such flow is recorded as AUDIT
with the rule that would have decided; importing again without --audit enforces it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, XWING, add_starwars_endpoints, agent_in_process, deathstar_app, run_cli,
    shoot, simple,
)

from cilia.agent.daemon import Agent

L7 = STARWARS / "sw_l3_l4_l7_policy.yaml"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with deathstar_app() as app_port, agent_in_process(tmp_path / "state") as a:
        add_starwars_endpoints(a.config.state_dir, app_port)
        yield a


def _import(state: Path, *args: str) -> None:
    res = run_cli(state, "policy", "import", *args)
    assert res.code == 0, res.err
    assert run_cli(state, "policy", "wait", res.out.split()[-1]).code == 0


def _flows(state: Path, want: int, *args: str) -> list[dict[str, object]]:
    deadline = time.monotonic() + 10
    while True:
        out = run_cli(state, "observe", "--last", "1000", "-o", "json", *args).out
        flows = [simple(json.loads(line)) for line in out.splitlines()]
        if len(flows) >= want or time.monotonic() > deadline:
            return flows
        time.sleep(0.2)


def test_policy_in_audit_mode_lets_through_and_records_audit(agent: Agent) -> None:
    state = agent.config.state_dir
    _import(state, "--audit", str(L7))
    listed = run_cli(state, "policy", "get", "-o", "json").json()["policies"]
    assert [(p["name"], p["audit"]) for p in listed] == [("rule1", True)]
    assert "audit" in run_cli(state, "policy", "get").out
    endpoints = {e["name"]: e for e in run_cli(state, "endpoint", "list", "-o", "json").json()["endpoints"]}
    assert endpoints["deathstar"]["audit_mode"] == {"ingress": True, "egress": False}
    assert "Audit" in run_cli(state, "endpoint", "list").out
    # what the policy would refuse is let through ...
    assert shoot(XWING, *LAND) == "200 Ship landed"
    assert shoot(TIEFIGHTER, *EXHAUST) == "200 Panic: deathstar exploded"
    assert shoot(TIEFIGHTER, *LAND) == "200 Ship landed"
    # ... and recorded as AUDIT with the rule that would have decided
    audits = _flows(state, 2, "--verdict", "AUDIT")
    by_kind = {f["kind"]: f for f in audits}
    assert by_kind["tcp"]["source"]["endpoint"] == "xwing" and by_kind["tcp"]["drop_reason"] == "Policy denied"  # type: ignore[index]
    put = by_kind["http"]
    assert put["l7"]["method"] == "PUT" and put["l7"]["status"] == 200  # type: ignore[index]
    assert "sw_l3_l4_l7_policy.yaml:16" in str(put["rule"]) and str(put["rule"]).startswith("default deny")
    http = _flows(state, 3, "--protocol", "http")
    tie_land = [f for f in http if f["source"]["endpoint"] == "tiefighter"  # type: ignore[index]
                and f["l7"]["method"] == "POST"]  # type: ignore[index]
    assert tie_land and all(f["verdict"] == "FORWARDED" for f in tie_land)  # allowed anyway: no audit
    xwing_land = [f for f in http if f["source"]["endpoint"] == "xwing"]  # type: ignore[index]
    assert xwing_land and all(f["verdict"] == "AUDIT" for f in xwing_land)  # L3 would refuse; L7 too
    # enforcing it: the same requests are refused again
    _import(state, str(L7))
    assert run_cli(state, "policy", "get", "-o", "json").json()["policies"][0]["audit"] is False
    assert shoot(XWING, *LAND) == "blocked"
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"


def test_endpoint_in_audit_mode(agent: Agent) -> None:
    state = agent.config.state_dir
    _import(state, str(L7))
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
    ds = next(e for e in run_cli(state, "endpoint", "list", "-o", "json").json()["endpoints"]
              if e["name"] == "deathstar")
    res = run_cli(state, "endpoint", "add", "--name", "deathstar", "--labels", ",".join(ds["labels"]),
                  "--ip", ds["ips"][0], "--port", f"80:{ds['ports'][0]['backend']}", "--audit")
    assert res.code == 0, res.err
    assert run_cli(state, "policy", "wait", res.out.split()[-1]).code == 0
    assert shoot(TIEFIGHTER, *EXHAUST) == "200 Panic: deathstar exploded"
    audits = _flows(state, 1, "--verdict", "AUDIT", "--protocol", "http")
    assert audits and audits[-1]["destination"]["endpoint"] == "deathstar"  # type: ignore[index]

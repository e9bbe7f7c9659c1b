"""`cilia policy diff FILE` as an operator would use it before applying a policy: the recorded
flows are replayed against it and the ones that would change verdict are listed; nothing changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, XWING, add_starwars_endpoints, agent_in_process, deathstar_app, run_cli,
    shoot, simple, wait_flows,
)

from cilia.agent.daemon import Agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with deathstar_app() as app_port, agent_in_process(tmp_path / "state") as a:
        add_starwars_endpoints(a.config.state_dir, app_port)
        yield a


def _import(state: Path, path: Path) -> None:
    res = run_cli(state, "policy", "import", str(path))
    assert res.code == 0 and run_cli(state, "policy", "wait", res.out.split()[-1]).code == 0


def _changed(state: Path, candidate: Path) -> dict[tuple[str, str], dict[str, str]]:
    res = run_cli(state, "policy", "diff", str(candidate), "-o", "json")
    assert res.code == 0, res.err
    changed = [{**c, "flow": simple(c["flow"])} for c in res.json()["changed"]]
    return {(c["flow"]["source"].get("endpoint", ""), c["flow"]["l7"].get("method", c["flow"]["kind"])): c
            for c in changed}


def test_diff_lists_the_flows_a_candidate_would_change_and_applies_nothing(agent: Agent, tmp_path: Path) -> None:
    state = agent.config.state_dir
    _import(state, STARWARS / "sw_l3_l4_l7_policy.yaml")  # L7 ports log every request
    assert shoot(TIEFIGHTER, *LAND) == "200 Ship landed"
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
    assert shoot(XWING, *LAND) == "blocked"
    wait_flows(state, 2)
    revision = run_cli(state, "status", "-o", "json").json()["revision"]

    # the L3/L4 policy alone would let the exhaust port through again
    changed = _changed(state, STARWARS / "sw_l3_l4_policy.yaml")
    put = changed.pop(("tiefighter", "PUT"))
    assert (put["now"], put["candidate"]) == ("denied", "allowed") and "sw_l3_l4_policy.yaml:16" in put["rule"]
    assert changed == {}  # the landing stays allowed, xwing stays refused
    # Cilium's default-deny policy beside rule1 changes nothing (rules are ORed) ...
    assert _changed(state, STARWARS / "sw_deny_policy.yaml") == {}
    # ... but in its place (same name) it would deny the landing too
    deny = tmp_path / "deny.yaml"
    deny.write_text((STARWARS / "sw_deny_policy.yaml").read_text().replace('"empire-default-deny"', '"rule1"'))
    changed = _changed(state, deny)
    assert set(changed) == {("tiefighter", "POST")} and changed[("tiefighter", "POST")]["candidate"] == "denied"
    # a policy allowing the alliance as well: xwing's refused connection would pass
    friendly = tmp_path / "friendly.yaml"
    friendly.write_text((STARWARS / "sw_l3_l4_l7_policy.yaml").read_text().replace("org: empire\n    toPorts",
                                                                                    "org: alliance\n    toPorts"))
    assert ("xwing", "tcp") in _changed(state, friendly)

    text = run_cli(state, "policy", "diff", str(STARWARS / "sw_l3_l4_policy.yaml")).out
    assert "denied -> allowed" in text and "would change verdict" in text
    # nothing was applied
    assert run_cli(state, "status", "-o", "json").json()["revision"] == revision
    assert [p["name"] for p in run_cli(state, "policy", "get", "-o", "json").json()["policies"]] == ["rule1"]
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"


def test_diff_reports_bad_candidates_with_file_and_line(agent: Agent, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((STARWARS / "sw_l3_l4_policy.yaml").read_text().replace('port: "80"', 'port: "eighty!"'))
    res = run_cli(agent.config.state_dir, "policy", "diff", str(bad))
    assert res.code == 2 and f"{bad}:" in res.err and "port" in res.err

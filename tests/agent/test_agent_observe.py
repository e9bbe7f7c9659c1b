"""`cilia observe` as an operator uses it: one flow record for L3/L4 and L7 with Hubble's
verdicts, filtered by labels, verdict, protocol and time, as table or JSON, and the rotating
JSON-lines flow file."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.agent.agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, XWING, add_starwars_endpoints, agent_in_process, deathstar_app, run_cli,
    shoot, wait_flows,
)

from cilia.agent.daemon import Agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with deathstar_app() as app_port, agent_in_process(tmp_path / "state", flow_file=tmp_path / "flows.jsonl",
                                                       flow_file_max_bytes=4000, flow_file_backups=2) as a:
        add_starwars_endpoints(a.config.state_dir, app_port)
        res = run_cli(a.config.state_dir, "policy", "import", str(STARWARS / "sw_l3_l4_l7_policy.yaml"))
        assert res.code == 0 and run_cli(a.config.state_dir, "policy", "wait", res.out.split()[-1]).code == 0
        yield a


def _json(state: Path, *args: str) -> list[dict[str, object]]:
    res = run_cli(state, "observe", "--last", "1000", "-o", "json", *args)
    assert res.code == 0, res.err
    return [json.loads(line) for line in res.out.splitlines()]


def test_filters_formats_and_the_flow_file(agent: Agent, tmp_path: Path) -> None:
    state = agent.config.state_dir
    for _ in range(3):
        assert shoot(TIEFIGHTER, *LAND) == "200 Ship landed"
        assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
    assert shoot(XWING, *LAND) == "blocked"
    flows = wait_flows(state, 6)
    assert {f["verdict"] for f in flows} >= {"FORWARDED", "DROPPED"}
    # by verdict and protocol: the three denied PUTs
    dropped_http = _json(state, "--verdict", "dropped", "--protocol", "http")
    assert [(f["l7"]["method"], f["verdict"]) for f in dropped_http] == [("PUT", "DROPPED")] * 3  # type: ignore[index]
    # by labels: source org=empire, destination class=deathstar; xwing's refused connection is not among them
    empire = _json(state, "--from-label", "org=empire", "--to-label", "k8s:class=deathstar")
    assert len(empire) == 6 and all("k8s:org=empire" in f["source"]["labels"] for f in empire)  # type: ignore[index]
    alliance = _json(state, "--from-label", "org=alliance")
    assert alliance and all(f["kind"] == "tcp" and f["verdict"] == "DROPPED" for f in alliance)
    assert _json(state, "--from-label", "org=empire,class=xwing") == []  # every label must match
    # by time: nothing in the future, everything since a minute ago
    assert _json(state, "--since", "2099-01-01T00:00:00+00:00") == []
    assert len(_json(state, "--since", "1m")) == len(flows)
    bad = run_cli(state, "observe", "--since", "yesterday")
    assert bad.code == 2 and "give a duration" in bad.err
    # the table has a header and one row per flow
    table = run_cli(state, "observe", "--last", "2", "-o", "table", "--protocol", "http").out.splitlines()
    assert table[0].split() == ["TIME", "VERDICT", "SOURCE", "DESTINATION", "TYPE", "SUMMARY"] and len(table) == 3
    assert "http PUT" in table[-1] or "http POST" in table[-1]
    # the file holds every flow as JSON, rotated by size with two backups
    time.sleep(0.2)
    files = sorted(tmp_path.glob("flows.jsonl*"))
    assert [p.name for p in files][:2] == ["flows.jsonl", "flows.jsonl.1"]
    kept = [json.loads(line) for p in files for line in p.read_text().splitlines()]
    assert {f["seq"] for f in kept} <= {f["seq"] for f in flows} and len(kept) >= 3
    assert all(p.stat().st_size <= 4000 + 2000 for p in files)

"""`cilia observe` as an operator uses it: one flow record for L3/L4 and L7 in Hubble's JSON form
(checked against Hubble's field list), filtered with Hubble's filter names, as compact lines,
dict blocks, a table or JSON, bad input refused in one line, and the rotating flow file."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.agent.agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, XWING, add_starwars_endpoints, agent_in_process, deathstar_app, observed,
    run_cli, shoot, wait_flows,
)
from tests.agent.hubble_fields import EXPORT_LINE, check

from cilia.agent.daemon import Agent


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with deathstar_app() as app_port, agent_in_process(tmp_path / "state", flow_file=tmp_path / "flows.jsonl",
                                                       flow_file_max_bytes=4000, flow_file_backups=2) as a:
        add_starwars_endpoints(a.config.state_dir, app_port)
        res = run_cli(a.config.state_dir, "policy", "import", str(STARWARS / "sw_l3_l4_l7_policy.yaml"))
        assert res.code == 0 and run_cli(a.config.state_dir, "policy", "wait", res.out.split()[-1]).code == 0
        yield a


def _json(state: Path, *args: str) -> list[dict[str, Any]]:
    return observed(state, *args)


def test_filters_formats_and_the_flow_file(agent: Agent, tmp_path: Path) -> None:
    state = agent.config.state_dir
    for _ in range(3):
        assert shoot(TIEFIGHTER, *LAND) == "200 Ship landed"
        assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
    assert shoot(XWING, *LAND) == "blocked"
    flows = wait_flows(state, 6)
    assert {f["verdict"] for f in flows} >= {"FORWARDED", "DROPPED"}
    # every line is Hubble's export form: the flow holds only Hubble's fields, with their types
    raw = [json.loads(line) for line in run_cli(state, "observe", "--last", "1000", "-o", "json").out.splitlines()]
    assert raw and all(check(line, EXPORT_LINE) == [] for line in raw), [check(x, EXPORT_LINE) for x in raw]
    put = next(x["flow"] for x in raw if x["flow"].get("l7", {}).get("http", {}).get("method") == "PUT")
    assert put["verdict"] == "DROPPED" and put["Type"] == "L7" and put["l7"]["http"]["code"] == 403
    assert put["source"]["pod_name"] == "tiefighter" and "k8s:org=empire" in put["source"]["labels"]
    assert put["IP"]["source"] == TIEFIGHTER and put["l4"]["TCP"]["destination_port"] == 80
    # by verdict and protocol: the three denied PUTs
    dropped_http = _json(state, "--verdict", "dropped", "--protocol", "http")
    assert [(f["l7"]["method"], f["verdict"]) for f in dropped_http] == [("PUT", "DROPPED")] * 3
    assert [f["l7"]["method"] for f in _json(state, "--http-status", "4+", "--http-method", "put")] == ["PUT"] * 3
    assert len(_json(state, "--http-path", "^/v1/request", "--type", "l7")) == 3
    # by labels: source org=empire, destination class=deathstar; xwing's refused connection is not among them
    empire = _json(state, "--from-label", "org=empire", "--to-label", "k8s:class=deathstar")
    assert len(empire) == 6 and all("k8s:org=empire" in f["source"]["labels"] for f in empire)
    alliance = _json(state, "--from-label", "org=alliance")
    assert alliance and all(f["kind"] == "tcp" and f["verdict"] == "DROPPED" for f in alliance)
    assert _json(state, "--from-label", "org=empire,class=xwing") == []  # every label must match
    assert {f["source"]["endpoint"] for f in _json(state, "--label", "org in (alliance)")} == {"xwing"}
    # by pod, address and identity
    assert len(_json(state, "--from-pod", "tiefighter")) == 6 and _json(state, "--to-pod", "tiefighter") == []
    assert {f["source"]["endpoint"] for f in _json(state, "--ip", XWING)} == {"xwing"}
    ident = empire[0]["source"]["identity"]
    assert len(_json(state, "--identity", str(ident), "--pod", "deathstar")) == 6
    # by time: nothing in the future, everything since a minute ago, nothing until a minute ago
    assert _json(state, "--since", "2099-01-01T00:00:00+00:00") == []
    assert len(_json(state, "--since", "1m")) == len(flows)
    assert _json(state, "--until", "1m") == []
    # bad input: one line on stderr, exit code 2
    for args, says in ((["--since", "yesterday"], "give a duration"), (["-o", "yaml"], "unknown output format"),
                       (["--label", "app in (a"], "unbalanced"), (["--from-label", "=x"], "not a selector term"),
                       (["--http-status", "abc"], "not an HTTP status"), (["--verdict", "maybe"], "not one of"),
                       (["--pod", "a/b/c"], "not [namespace/]pod"), (["--pod", "default/nosuch"], "no such pod"),
                       (["--from-pod", "nosuch"], "--from-pod nosuch: no such pod"),
                       (["--to-pod", "empire/deathstar"], "no such pod"), (["--ip", "10.0.0.300"], "not an IP")):
        bad = run_cli(state, "observe", *args)
        assert bad.code == 2 and says in bad.err and len(bad.err.strip().splitlines()) == 1, (args, bad.err)
    # the other formats: compact lines like Hubble's, dict blocks, a table with a header
    compact = run_cli(state, "observe", "--last", "1", "--http-method", "PUT").out.strip()
    assert re.fullmatch(r"\w+ \d+ [\d:.]+: default/tiefighter:\d+ \(ID:\d+\) -> default/deathstar:80 \(ID:\d+\) "
                        r"http-request DROPPED \(HTTP/1.1 PUT http://\S+/v1/exhaust-port => 403\)  rule: .*",
                        compact), compact
    block = run_cli(state, "observe", "--last", "1", "-o", "dict").out
    assert [line.split(":")[0].strip() for line in block.splitlines()][:6] == [
        "TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    table = run_cli(state, "observe", "--last", "2", "-o", "table", "--protocol", "http").out.splitlines()
    assert table[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"] and len(table) == 3
    assert "PUT http" in table[-1] or "POST http" in table[-1]
    # the file holds every flow in the same Hubble form, rotated by size with two backups
    time.sleep(0.2)
    files = sorted(tmp_path.glob("flows.jsonl*"))
    assert [p.name for p in files][:2] == ["flows.jsonl", "flows.jsonl.1"]
    kept = [json.loads(line) for p in files for line in p.read_text().splitlines()]
    assert all(check(line, EXPORT_LINE) == [] for line in kept)
    assert {f["cilia"]["seq"] for f in kept} <= {f["seq"] for f in flows} and len(kept) >= 3
    assert all(p.stat().st_size <= 4000 + 2000 for p in files)


def test_monitor_last_is_a_snapshot(agent: Agent) -> None:
    """`cilia monitor --last N` prints what is recorded and returns (it used to keep following)."""
    state = agent.config.state_dir
    res = subprocess.run([sys.executable, "-m", "cilia", "monitor", "--last", "5", "--state-dir", str(state)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr

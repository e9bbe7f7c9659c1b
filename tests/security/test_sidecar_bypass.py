"""Sidecar mode cannot be bypassed: the application's own port (deathstar's backend behind port 80)
answers Envoy only; a ship connecting to it directly is reset, while the same request through
Envoy's listener is judged by the policy as usual. Removing the endpoint opens the port again, and
so does stopping the agent (its Envoy stops with it). A crashed agent's table stays (the port stays
closed) until ``cilia cleanup`` removes it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from cilia.agent.sidecar_guard import table_name
from tests.agent.agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, XWING, AgentProcess, add_starwars_endpoints, agent_in_process,
    deathstar_app, run_cli, shoot,
)


PROBE = "127.0.1.99"


def _tables() -> list[str]:
    out = subprocess.run(["nft", "-j", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return [t["table"]["name"] for t in json.loads(out)["nftables"] if "table" in t]


def test_the_application_port_answers_only_envoy(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with deathstar_app() as app_port:
        assert shoot(TIEFIGHTER, *LAND, port=app_port) == "200 Ship landed"  # before: anyone reaches the app
        with agent_in_process(state) as agent:
            assert agent.config.proxy_mode == "sidecar"
            add_starwars_endpoints(state, app_port)
            res = run_cli(state, "policy", "import", str(STARWARS / "sw_l3_l4_l7_policy.yaml"))
            assert res.code == 0, res.err
            assert run_cli(state, "policy", "wait", res.out.split()[-1]).code == 0
            # through Envoy: the policy decides
            assert shoot(TIEFIGHTER, *LAND) == "200 Ship landed"
            assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
            assert shoot(XWING, *LAND) == "blocked"
            # straight to the application's port: refused for everyone, allowed or not
            for ship in (TIEFIGHTER, XWING):
                for request in (LAND, EXHAUST):
                    assert shoot(ship, *request, port=app_port) == "refused", (ship, request)
            assert agent.status()["healthy"], agent.status()["reasons"]
            assert agent.guard is not None and agent.guard.table in _tables()
            # a second guarded endpoint, so that the table outlives the deathstar's delete
            assert run_cli(state, "endpoint", "add", "--name", "probe", "--labels", "app=probe", "--ip", PROBE,
                           "--port", f"81:{app_port}").code == 0
            # the endpoint gone, its port is the application's own business again
            assert run_cli(state, "endpoint", "delete", "deathstar").code == 0
            assert shoot(XWING, *EXHAUST, port=app_port).startswith("200 ")
            table = agent.guard.table
            assert table in _tables()
        assert table not in _tables()  # the agent stopped, and its Envoy with it


def test_cleanup_removes_the_table_a_crashed_agent_left(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    with deathstar_app() as app_port:
        agent = AgentProcess(state)
        try:
            agent.start()
            add_starwars_endpoints(state, app_port)
            assert shoot(XWING, *EXHAUST, port=app_port) == "refused"
        finally:
            assert agent.proc is not None
            agent.proc.kill()  # kill -9: no chance to remove its table
            agent.proc.wait()
        table = table_name(str(state.resolve()))
        assert table in _tables()
        assert shoot(XWING, *EXHAUST, port=app_port) == "refused"  # still closed, Envoy gone with its agent
        res = run_cli(state, "cleanup", "-o", "json")
        assert res.code == 0, res.err
        assert any(table in line for line in json.loads(res.out)["removed"]), res.out
        assert table not in _tables()
        assert shoot(XWING, *EXHAUST, port=app_port).startswith("200 ")
        # once removed, there is nothing left to remove
        res = run_cli(state, "cleanup", "-o", "json")
        assert res.code == 0 and not any(table in line for line in json.loads(res.out)["removed"]), res.out

"""Sidecar mode cannot be bypassed: the application's own port (deathstar's backend behind port 80)
answers Envoy only; a ship connecting to it directly is reset, while the same request through
Envoy's listener is judged by the policy as usual. Removing the endpoint opens the port again, and
so does stopping the agent (its Envoy stops with it). A crashed agent's table stays (the port stays
closed) until ``cilia cleanup`` removes it."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

from cilia.agent.sidecar_guard import SidecarGuard, guarded_ports, table_name
from cilia.policy import Direction, DirectionMapState, MapState
from cilia.realizer import Desired
from cilia.realizer.desired import EndpointState, PortMap
from tests.agent.agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, XWING, AgentProcess, add_starwars_endpoints, agent_in_process,
    deathstar_app, run_cli, shoot,
)


PROBE = "127.0.1.99"
NO_POLICY = MapState(DirectionMapState(Direction.INGRESS, False, {}, {}),
                     DirectionMapState(Direction.EGRESS, False, {}, {}))


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


def _elements(table: str) -> set[tuple[str, int]]:
    out = subprocess.run(["nft", "-j", "list", "table", "inet", table], capture_output=True, text=True)
    if out.returncode != 0:
        return set()
    found = set()
    for item in json.loads(out.stdout)["nftables"]:
        for elem in item.get("set", {}).get("elem", []):
            address, port = elem["concat"]
            found.add((address, port))
    return found


def test_the_table_follows_random_changes_as_a_whole_rebuild_would(tmp_path: Path) -> None:
    """The guard recounts only the endpoints a change names; after every change the table holds
    exactly what the whole desired state asks for (``guarded_ports``)."""
    rng = random.Random(5)
    guard = SidecarGuard(lambda n: None, owner=str(tmp_path))
    endpoints: dict[str, EndpointState] = {}
    try:
        for step in range(60):
            name = f"ep{rng.randrange(8)}"
            if name in endpoints and rng.random() < 0.4:
                del endpoints[name]
            else:  # added, or moved to other addresses and ports (two endpoints may share a pair)
                ips = tuple(f"127.0.33.{rng.randrange(1, 5)}" for _ in range(rng.randrange(1, 3)))
                ports = tuple(PortMap(80 + i, rng.choice((80 + i, 8080, 8081))) for i in range(rng.randrange(3)))
                endpoints[name] = EndpointState(name, ips, 1000, NO_POLICY, ports)
            guard.realize(Desired(step, dict(endpoints), (), {}, changed=frozenset({name})))
            assert _elements(guard.table) == set(guarded_ports(Desired(step, endpoints, (), {}), lambda n: None)
                                                 .get(None, ())), step
    finally:
        guard.close()
    assert guard.table not in _tables()

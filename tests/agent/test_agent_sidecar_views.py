"""An Envoy sidecar whose node id is an endpoint's name (deploy/sidecar) gets only that endpoint's
listeners from the agent, so several pods' sidecars on one node each bind just their own address."""

from __future__ import annotations

from pathlib import Path

from agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, add_starwars_endpoints, agent_in_process, deathstar_app, run_cli, shoot,
)

from cilia.envoy.admin import AdminClient
from cilia.envoy.bootstrap import build_bootstrap, to_json
from cilia.netutil import free_port
from cilia.envoy.supervisor import EnvoySupervisor


def test_sidecar_sees_only_its_endpoint(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with deathstar_app() as app_port, agent_in_process(state, envoy="external") as agent:
        add_starwars_endpoints(state, app_port)
        # a second served endpoint: its listener is on an address the deathstar sidecar cannot bind
        assert run_cli(state, "endpoint", "add", "--name", "probe", "--labels", "app=probe", "--ip", "127.0.1.99",
                       "--port", f"81:{app_port}").code == 0
        admin = f"127.0.0.1:{free_port()}"
        bootstrap = tmp_path / "sidecar.json"
        bootstrap.write_text(to_json(build_bootstrap("deathstar", f"unix:{state / 'xds.sock'}", admin)))
        with EnvoySupervisor(bootstrap, admin, log_path=tmp_path / "envoy.log", extra_args=["--drain-time-s", "0"]):
            res = run_cli(state, "policy", "import", str(STARWARS / "sw_l3_l4_l7_policy.yaml"))
            assert res.code == 0
            wait = run_cli(state, "policy", "wait", res.out.split()[-1])
            assert wait.code == 0, wait.err
            assert "deathstar" in wait.out
            listeners = {li.name for li in AdminClient(admin).listeners()}
            assert listeners == {"deathstar-ingress-80"}
            assert shoot(TIEFIGHTER, *LAND) == "200 Ship landed"
            assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
        assert agent.cache.view("type.googleapis.com/envoy.config.listener.v3.Listener", "probe").resources.keys() \
            == {"probe-ingress-81"}

"""An Envoy never outlives its agent, so a crashed agent cannot freeze enforcement.

Before: ``kill -9`` of the agent left its Envoy running with the old policy and the listener
ports; the restarted agent's Envoy could not bind them (NACK), so every later policy change, a
lockdown included, was rejected. Now the Envoy dies with its agent (parent-death signal), and an
Envoy left over anyway (recorded in the state directory) is stopped by the next agent before it
starts its own. Real agent processes, real Envoy, Star Wars endpoints on loopback addresses.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, XWING, AgentProcess, add_starwars_endpoints, deathstar_app, run_cli, shoot,
)
from security_support import kill_if_running, process_running, start_time, wait_until

from cilia.envoy.supervisor import envoy_binary

# rule1 again, now allowing only a request no ship sends: the tiefighter's landing is refused
LOCKDOWN = """\
apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "rule1"
spec:
  description: "lockdown: the deathstar takes no landings"
  endpointSelector:
    matchLabels: {org: empire, class: deathstar}
  ingress:
  - fromEndpoints:
    - matchLabels: {org: empire}
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/lockdown-only"}]
"""


def status(state: Path) -> dict[str, Any]:
    res = run_cli(state, "status", "-o", "json")
    assert res.code in (0, 1), res.err
    return res.json()  # type: ignore[no-any-return]


def setup_policy(state: Path, app_port: int) -> None:
    add_starwars_endpoints(state, app_port)
    revision = run_cli(state, "policy", "import", str(STARWARS / "sw_l3_l4_l7_policy.yaml")).out.split()[1]
    assert run_cli(state, "policy", "wait", revision).code == 0


def enforced() -> None:
    """The Star Wars L7 policy is served by an Envoy listening on the deathstar's port."""
    wait_until(lambda: shoot(TIEFIGHTER, *LAND) == "200 Ship landed", what="tiefighter lands")
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
    assert shoot(XWING, *LAND) == "blocked"


def lock_down(state: Path, tmp_path: Path) -> None:
    """Import the lockdown; Envoy must take it (no NACK) and enforce it."""
    policy = tmp_path / "lockdown.yaml"
    policy.write_text(LOCKDOWN, encoding="utf-8")
    res = run_cli(state, "policy", "import", str(policy))
    assert res.code == 0, res.err
    waited = run_cli(state, "policy", "wait", res.out.split()[1], "--timeout", "20")
    assert waited.code == 0, waited.out + waited.err
    assert shoot(TIEFIGHTER, *LAND) == "403 Access denied"
    assert shoot(TIEFIGHTER, "GET", "/lockdown-only") != "403 Access denied"
    now = status(state)
    assert [p for p in now["xds"]["proxies"] if p["nack"]] == []
    assert now["healthy"], now["reasons"]


def test_envoy_dies_with_a_killed_agent_and_the_next_agent_enforces_a_lockdown(tmp_path: Path) -> None:
    state = tmp_path / "state"
    agent = AgentProcess(state)
    envoy_pids: list[int] = []
    with deathstar_app() as app_port:
        try:
            agent.start()
            setup_policy(state, app_port)
            enforced()
            envoy_pid = status(state)["envoy"]["pid"]
            envoy_pids.append(envoy_pid)
            assert process_running(envoy_pid)

            assert agent.proc is not None
            agent.proc.kill()  # kill -9: the agent stops nothing
            agent.proc.wait()
            agent.proc = None
            wait_until(lambda: not process_running(envoy_pid), timeout=10, what="the dead agent's Envoy exits")
            assert shoot(TIEFIGHTER, *LAND) == "refused"  # nobody serves a frozen policy

            agent.start()
            envoy_pids.append(status(state)["envoy"]["pid"])
            enforced()
            lock_down(state, tmp_path)
        finally:
            agent.stop()
            for pid in envoy_pids:
                kill_if_running(pid)


def leftover_bootstrap(admin_socket: Path, deathstar: str) -> str:
    """A stale, permissive Envoy of this state directory: its admin socket, and the deathstar's
    port answering every request."""
    return f"""\
node: {{id: cilia-node, cluster: cilia}}
admin:
  address: {{pipe: {{path: "{admin_socket}"}}}}
static_resources:
  listeners:
  - name: leftover
    address: {{socket_address: {{address: {deathstar}, port_value: 80}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: leftover
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 200, body: {{inline_string: "leftover"}}}}
"""


def test_next_agent_stops_the_leftover_envoy_recorded_in_its_state_dir(tmp_path: Path) -> None:
    from agent_support import DEATHSTAR

    state = tmp_path / "state"
    agent = AgentProcess(state)
    leftover: subprocess.Popen[bytes] | None = None
    new_envoy: int | None = None
    with deathstar_app() as app_port:
        try:
            agent.start()
            setup_policy(state, app_port)
            agent.stop()
            # Started outside any supervisor (no parent-death signal), as an Envoy of an agent
            # that died in the instant before its Envoy got the signal, or of an older agent.
            bootstrap = tmp_path / "leftover.yaml"
            bootstrap.write_text(leftover_bootstrap(state / "envoy-admin.sock", DEATHSTAR), encoding="utf-8")
            with open(tmp_path / "leftover.log", "wb") as log:
                leftover = subprocess.Popen([str(envoy_binary()), "-c", str(bootstrap), "--disable-hot-restart"],
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            wait_until(lambda: shoot(TIEFIGHTER, *EXHAUST) == "200 leftover", what="the leftover Envoy serves")
            (state / "envoy.pid").write_text(json.dumps({"pid": leftover.pid, "start_time": start_time(leftover.pid)}))

            agent.start()
            assert leftover.poll() is not None, "the new agent left the recorded Envoy running"
            new_envoy = status(state)["envoy"]["pid"]
            assert f"stopped leftover Envoy pid {leftover.pid}" in (state / "envoy.log").read_text()
            enforced()
            lock_down(state, tmp_path)
        finally:
            agent.stop()
            if leftover is not None and leftover.poll() is None:
                leftover.kill()
                leftover.wait()
            kill_if_running(new_envoy)

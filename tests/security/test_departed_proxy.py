"""A sidecar Envoy that rejected a config and went away is forgotten after the grace period: the
agent is healthy again, `policy wait` no longer waits for it, and `cilia status` lists it as gone.
Within the grace period its NACK still counts."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.agent.agent_support import (
    DEATHSTAR, STARWARS, add_starwars_endpoints, agent_in_process, deathstar_app, run_cli,
)

from cilia.envoy.bootstrap import build_bootstrap, to_json
from cilia.envoy.supervisor import EnvoySupervisor
from cilia.netutil import free_port

GRACE = 2.0


def _deathstar_proxy(state: Path) -> dict[str, object]:
    status = run_cli(state, "status", "-o", "json").json()
    return {"healthy": status["healthy"], "reasons": status["reasons"],
            **next(p for p in status["xds"]["proxies"] if p["node"] == "deathstar" and p["type"] == "Listener")}


def test_a_sidecar_that_nacked_and_left_is_forgotten_after_the_grace_period(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with deathstar_app() as app_port, agent_in_process(state, envoy="external", proxy_grace=GRACE), \
            socket.socket() as squatter:
        add_starwars_endpoints(state, app_port)
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past earlier tests' TIME_WAIT
        squatter.bind((DEATHSTAR, 80))  # the sidecar's listener cannot bind: Envoy rejects it (NACK)
        squatter.listen()
        admin = f"127.0.0.1:{free_port()}"
        bootstrap = tmp_path / "sidecar.json"
        bootstrap.write_text(to_json(build_bootstrap("deathstar", f"unix:{state / 'xds.sock'}", admin)))
        with EnvoySupervisor(bootstrap, admin, log_path=tmp_path / "envoy.log", extra_args=["--drain-time-s", "0"]):
            res = run_cli(state, "policy", "import", str(STARWARS / "sw_l3_l4_l7_policy.yaml"))
            assert res.code == 0, res.err
            wait = run_cli(state, "policy", "wait", "--timeout", "20", res.out.split()[-1])
            assert wait.code != 0 and "deathstar rejected" in wait.err, (wait.out, wait.err)
            proxy = _deathstar_proxy(state)
            assert proxy["stream"] == "open" and proxy["nack"] and not proxy["healthy"]
        # gone, but within the grace period its NACK stands
        proxy = _deathstar_proxy(state)
        assert proxy["stream"] == "closed" and not proxy["healthy"], proxy
        deadline = time.monotonic() + GRACE + 10
        while proxy["stream"] != "gone" and time.monotonic() < deadline:
            time.sleep(0.2)
            proxy = _deathstar_proxy(state)
        assert proxy["stream"] == "gone", proxy
        assert proxy["healthy"] and proxy["reasons"] == [], proxy
        assert "(stream gone)" in run_cli(state, "status").out
        # later revisions are realized without it
        res = run_cli(state, "endpoint", "add", "--name", "probe", "--labels", "app=probe", "--ip", "127.0.1.99")
        assert res.code == 0, res.err
        wait = run_cli(state, "policy", "wait", "--timeout", "5", res.out.split()[-1])
        assert wait.code == 0, wait.err

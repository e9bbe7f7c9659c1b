"""Restarts never open a window where denied traffic gets through, and converge to the same config.

A prober fires the two requests the Star Wars L7 policy denies (tiefighter's PUT to the exhaust
port, xwing's landing) and one it allows, over and over, while the agent process is restarted,
its managed Envoy is killed, and (external mode) the agent restarts under a running Envoy. A
denied request may be refused or closed while nothing listens, but it must never be answered 200.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent_support import (
    EXHAUST, LAND, STARWARS, TIEFIGHTER, XWING, AgentProcess, add_starwars_endpoints, deathstar_app, pid_alive,
    run_cli, shoot,
)

from cilia.envoy.bootstrap import build_bootstrap, to_json
from cilia.netutil import free_port
from cilia.envoy.supervisor import EnvoySupervisor


class Prober:
    """Sends the probes in a loop on a thread; ``outcomes`` keeps (probe, outcome) in order."""

    PROBES = {"tiefighter PUT": (TIEFIGHTER, *EXHAUST), "xwing POST": (XWING, *LAND),
              "tiefighter POST": (TIEFIGHTER, *LAND)}

    def __init__(self) -> None:
        self.outcomes: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, (source, method, path) in self.PROBES.items():
                try:
                    outcome = shoot(source, method, path, timeout=1.0)
                except Exception as e:  # recorded, so the test shows it instead of a thread warning
                    outcome = f"error {e!r}"
                self.outcomes.append((name, outcome))

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def leaks(self) -> list[tuple[str, str]]:
        """Denied probes that got an answer other than 403, a refusal or a closed connection."""
        return [(n, o) for n, o in self.outcomes if n != "tiefighter POST"
                and o not in ("403 Access denied", "blocked", "refused")]

    def count(self, name: str) -> int:
        return sum(n == name for n, _ in self.outcomes)


def wait_until(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.1)


def enforced(state: Path) -> None:
    """The L7 policy is in force: the allowed request lands, the denied ones are denied."""
    wait_until(lambda: shoot(TIEFIGHTER, *LAND) == "200 Ship landed")
    assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
    assert shoot(XWING, *LAND) == "blocked"


def snapshot(state: Path) -> dict[str, object]:
    """What must survive a restart unchanged."""
    status = run_cli(state, "status", "-o", "json").json()
    return {"revision": status["revision"],
            "policies": run_cli(state, "policy", "get", "-o", "json").json(),
            "endpoints": run_cli(state, "endpoint", "list", "-o", "json").json(),
            "identities": run_cli(state, "identity", "list", "-o", "json").json()}


@contextmanager
def agent_process(state: Path, *args: str) -> Iterator[AgentProcess]:
    agent = AgentProcess(state, *args)
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()


def setup_policy(state: Path, app_port: int) -> None:
    add_starwars_endpoints(state, app_port)
    revision = run_cli(state, "policy", "import", str(STARWARS / "sw_l3_l4_l7_policy.yaml")).out.split()[1]
    assert run_cli(state, "policy", "wait", revision).code == 0


def test_agent_restart_and_envoy_crash_never_let_denied_traffic_through(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with deathstar_app() as app_port, agent_process(state) as agent:
        setup_policy(state, app_port)
        enforced(state)
        before = snapshot(state)
        with Prober() as prober:
            time.sleep(0.5)
            agent.stop()  # SIGTERM: the agent stops its Envoy too
            assert run_cli(state, "status").code == 2  # nothing answers on the socket now
            agent.start()
            enforced(state)
            assert snapshot(state) == before  # same revision, policies, endpoints, identities
            assert run_cli(state, "policy", "wait", str(before["revision"])).code == 0

            envoy = run_cli(state, "status", "-o", "json").json()["envoy"]
            os.kill(envoy["pid"], signal.SIGKILL)  # Envoy crashes; the supervisor restarts it
            wait_until(lambda: not pid_alive(envoy["pid"]))
            wait_until(lambda: run_cli(state, "status", "-o", "json").json()["envoy"]["restarts"] == 1)
            enforced(state)
            time.sleep(0.5)
        assert run_cli(state, "status", "-o", "json").json()["envoy"]["state"] == "running"
    assert prober.leaks() == []
    assert prober.count("tiefighter PUT") > 10 and prober.count("xwing POST") > 10


def test_external_envoy_keeps_enforcing_while_the_agent_restarts(tmp_path: Path) -> None:
    state = tmp_path / "state"
    admin = f"127.0.0.1:{free_port()}"
    bootstrap = tmp_path / "bootstrap.json"
    bootstrap.write_text(to_json(build_bootstrap("external-envoy", f"unix:{state / 'xds.sock'}", admin)))
    # the agent serves its own --node-id (and sidecars named after endpoints), nobody else
    with deathstar_app() as app_port, agent_process(state, "--envoy", "external", "--node-id", "external-envoy") \
            as agent:
        envoy = EnvoySupervisor(bootstrap, admin, log_path=tmp_path / "envoy.log",
                                extra_args=["--drain-time-s", "0"])
        with envoy:  # starts it
            setup_policy(state, app_port)  # waits until external-envoy acked
            enforced(state)
            before = snapshot(state)
            with Prober() as prober:
                agent.stop()
                time.sleep(1.0)
                # No control plane: Envoy keeps its last config and keeps enforcing it.
                assert shoot(TIEFIGHTER, *LAND) == "200 Ship landed"
                assert shoot(TIEFIGHTER, *EXHAUST) == "403 Access denied"
                agent.start()
                # Envoy reconnects (it retries the xDS socket) and acks the new agent's version.
                wait_until(lambda: run_cli(state, "policy", "wait", str(before["revision"]), "--timeout", "2")
                           .code == 0)
                enforced(state)
            pid = envoy.status().pid
            assert snapshot(state) == before
        assert pid is not None and envoy.status().restarts == 0  # the same Envoy all along
    assert prober.leaks() == []
    assert ("tiefighter POST", "200 Ship landed") in prober.outcomes

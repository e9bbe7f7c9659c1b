"""A slow proxy stalls no one: a change waiting for the managed Envoy's ACK holds no lock, so
reads and other changes go on meanwhile (Envoy is stopped with SIGSTOP to make it slow)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from agent_support import STARWARS, agent_in_process

from cilia.specs import EndpointSpec, PortSpec


def test_reads_and_changes_go_on_while_a_change_waits_for_envoy(tmp_path: Path) -> None:
    with agent_in_process(tmp_path / "state", apply_timeout=60.0) as agent:
        assert agent.envoy is not None
        pid = agent.envoy.status().pid
        assert pid is not None
        policy = (STARWARS / "sw_l3_l4_policy.yaml").read_text()
        agent.add_endpoint(EndpointSpec("deathstar", ("org=empire", "class=deathstar"), ("127.0.1.40",),
                                        (PortSpec.parse("80:8080"),)))
        result: dict[str, Any] = {}
        os.kill(pid, signal.SIGSTOP)
        try:
            start_revision = agent.revision
            waiting = threading.Thread(target=lambda: result.update(done=agent.import_policies([("p.yaml", policy)])))
            waiting.start()
            deadline = time.monotonic() + 10
            while agent.revision == start_revision and time.monotonic() < deadline:
                time.sleep(0.01)
            assert agent.revision == start_revision + 1  # committed; now it waits for the stopped Envoy
            assert waiting.is_alive()
            # reads answer while it waits
            assert [p.name for p in agent.policies().policies] == ["rule1"]
            assert [e.spec.name for e in agent.endpoints().endpoints] == ["deathstar"]
            # and another change (new listeners too) is committed while the first still waits
            other = threading.Thread(target=agent.add_endpoint, args=(
                EndpointSpec("tiefighter", ("org=empire", "class=tiefighter"), ("127.0.1.41",),
                             (PortSpec.parse("80:8080"),)),))
            other.start()
            while agent.revision == start_revision + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert agent.revision == start_revision + 2
            assert waiting.is_alive()  # the first change is still waiting for Envoy
        finally:
            os.kill(pid, signal.SIGCONT)
        waiting.join(30)
        other.join(30)
        assert not waiting.is_alive() and result["done"].revision == start_revision + 1
        assert agent.wait(start_revision + 2, 10).revision == start_revision + 2

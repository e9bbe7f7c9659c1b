"""The agent with the L7 parsers inside its managed Envoy (``--l7-mode inproc``), sidecar mode,
a real memcached behind Cilium's memcached example policy: enforced, reported in status, and
when Envoy (with its interpreter) crashes, nothing passes until the supervisor has started a new
one, whose interpreter gets the policy and reports in its turn."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_support import agent_in_process, run_cli
from helpers import cilium_examples_dir
from memcache_support import BoundSockets, memcached
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError

from cilia.agent.daemon import Agent
from cilia.envoy.inproc import build

SERVER, A_WING = "127.0.3.10", "127.0.3.11"
POLICY = cilium_examples_dir() / "memcd-sw-security-policy.yaml"


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    build.build()  # as setup does
    build.build_compiled()
    state = tmp_path / "state"
    with memcached("0.0.0.0") as port, agent_in_process(state, l7_mode="inproc") as a:
        for args in (["--name", "memcd-server", "--labels", "app=memcd-server", "--ip", SERVER,
                      "--port", f"11211:{port}"], ["--name", "a-wing", "--labels", "app=a-wing", "--ip", A_WING]):
            assert run_cli(state, "endpoint", "add", *args).code == 0
        res = run_cli(state, "policy", "import", str(POLICY))
        assert res.code == 0, res.err
        assert run_cli(state, "policy", "wait", res.out.split()[-1]).code == 0
        yield a


def _client() -> Client:
    return Client((SERVER, 11211), default_noreply=False, connect_timeout=5, timeout=5,
                  socket_module=BoundSockets(A_WING))


def _until(predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)
    return value


def test_enforced_in_envoy_and_a_crash_fails_closed(agent: Agent) -> None:
    c = _client()
    assert c.set("awing-coord", "1") is True
    with pytest.raises(MemcacheClientError, match="access denied"):
        c.get("xwing-coord")
    c.close()
    status = agent.status()
    assert status["l7"]["mode"] == "inproc" and status["healthy"], status["reasons"]
    interpreter = _until(lambda: agent.status()["l7"]["interpreters"])[0]
    first = interpreter["pid"]
    assert first == agent.envoy.status().pid  # type: ignore[union-attr]  # the interpreter is Envoy's own
    assert _until(lambda: agent.status()["l7"]["interpreters"][0].get("compiled")) == 1  # mypyc modules in use

    os.kill(first, signal.SIGSEGV)  # what an interpreter crash does to Envoy
    _until(lambda: agent.envoy.status().restarts >= 1 and agent.envoy.status().running)  # type: ignore[union-attr]
    assert "exited unexpectedly" in (agent.status()["envoy"]["last_error"] or "")

    def works() -> bool:  # the new Envoy's listener and interpreter are up: allowed and denied again
        c = _client()
        try:
            return c.get("awing-coord") == b"1" and _denied(c)
        except (OSError, MemcacheClientError):
            return False
        finally:
            c.close()

    _until(works)
    interpreters = _until(lambda: [i for i in agent.status()["l7"]["interpreters"] if i["pid"] != first])
    assert interpreters[0]["pid"] == agent.envoy.status().pid  # type: ignore[union-attr]


def _denied(c: Client) -> bool:
    try:
        c.get("xwing-coord")
    except MemcacheClientError as e:
        return "access denied" in str(e)
    return False

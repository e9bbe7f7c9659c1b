"""A third-party L7 parser (examples/r2d2, installed through its entry point) enforced inside a
real Envoy's data path by the agent: network ext_proc to the agent's L7 service, one parser per
connection, denials answered by the parser, the connection kept, verdicts in `cilia observe`."""

from __future__ import annotations

import json
import os
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import agent_in_process, run_cli, simple

from cilia.agent.client import AgentClient
from cilia.agent.daemon import Agent
from cilia.netutil import free_port

DROID, C3PO, JAWA = "127.0.2.10", "127.0.2.11", "127.0.2.12"
POLICY = Path(__file__).parents[2] / "examples" / "r2d2" / "droid.yaml"  # the example plugin's own policy


class _Droid(socketserver.StreamRequestHandler):
    """The r2d2 server: answers every command OK."""

    def handle(self) -> None:
        for _line in self.rfile:
            self.wfile.write(b"OK\r\n")


@pytest.fixture(params=[0, 2], ids=["in-process", "2-workers"])
def droid(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Agent, Path]]:
    server = socketserver.ThreadingTCPServer((DROID, free_port(DROID)), _Droid)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state = tmp_path / "state"
    try:
        with agent_in_process(state, l7_workers=request.param) as agent:
            for args in (["--name", "r2d2", "--labels", "app=r2d2", "--ip", DROID,
                          "--port", f"4242:{server.server_address[1]}"],
                         ["--name", "c3po", "--labels", "app=c3po", "--ip", C3PO],
                         ["--name", "jawa", "--labels", "app=jawa", "--ip", JAWA]):
                assert run_cli(state, "endpoint", "add", *args).code == 0
            res = run_cli(state, "policy", "import", str(POLICY))
            assert res.code == 0, res.err
            assert run_cli(state, "policy", "wait", res.out.split()[-1]).code == 0
            yield agent, state
    finally:
        server.shutdown()
        server.server_close()


def _talk(source: str, lines: list[bytes]) -> list[bytes]:
    """Send each line on one connection from ``source``; the reply line to each."""
    with socket.create_connection((DROID, 4242), timeout=5, source_address=(source, 0)) as s:
        f = s.makefile("rb")
        replies = []
        for line in lines:
            s.sendall(line)
            replies.append(f.readline())
        f.close()
        return replies


def test_plugin_parser_enforces_in_envoy(droid: tuple[Agent, Path]) -> None:
    agent, state = droid
    replies = _talk(C3PO, [b"READ /public/plans\r\n", b"WRITE /public/plans\r\n", b"READ /secret/plans\r\n",
                           b"HALT\r\n"])
    assert replies == [b"OK\r\n", b"ERROR access denied\r\n", b"ERROR access denied\r\n", b"OK\r\n"]
    # another peer: closed at L3/L4 by the network RBAC before any parsing
    assert _talk(JAWA, [b"READ /public/plans\r\n"]) == [b""]
    deadline = time.monotonic() + 10
    while True:
        out = run_cli(state, "observe", "--last", "100", "-o", "json").out
        flows = [simple(json.loads(line)) for line in out.splitlines() if '"r2d2"' in line]
        if len(flows) >= 4 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    got = [(f["l7"]["cmd"], f["l7"].get("file"), f["verdict"]) for f in flows]
    assert got == [("READ", "/public/plans", "FORWARDED"), ("WRITE", "/public/plans", "DROPPED"),
                   ("READ", "/secret/plans", "DROPPED"), ("HALT", None, "FORWARDED")]
    assert flows[0]["source"]["endpoint"] == "c3po" and flows[0]["destination"]["endpoint"] == "r2d2"
    assert "droid.yaml:" in flows[0]["rule"] and flows[1]["rule"].startswith("default deny: default/droid")
    text = run_cli(state, "observe", "--last", "4").out
    assert "r2d2 cmd=WRITE file=/public/plans (no r2d2 rule matches)" in text
    client = AgentClient(state / "cilia.sock")
    try:
        metrics = client._client.get("/metrics").text
    finally:
        client.close()
    for rule, n in (("received", 4), ("forwarded", 2), ("denied", 2)):
        assert f'cilia_policy_l7_total{{proxy_type="r2d2",rule="{rule}"}} {n}.0' in metrics, metrics


def test_unparseable_bytes_close_the_connection_and_never_pass(droid: tuple[Agent, Path]) -> None:
    agent, _ = droid
    with socket.create_connection((DROID, 4242), timeout=5, source_address=(C3PO, 0)) as s:
        s.sendall(b"FLY to the moon\r\n")
        assert s.recv(100) == b""  # closed by the parser; the server saw nothing
    deadline = time.monotonic() + 5
    while b'rule="parse_errors"} 1.0' not in agent.metrics.exposition() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b'cilia_policy_l7_total{proxy_type="r2d2",rule="parse_errors"} 1.0' in agent.metrics.exposition()


def test_audit_mode_reaches_the_parser(droid: tuple[Agent, Path]) -> None:
    _, state = droid
    res = run_cli(state, "policy", "import", "--audit", str(POLICY))
    assert res.code == 0 and run_cli(state, "policy", "wait", res.out.split()[-1]).code == 0
    assert _talk(C3PO, [b"WRITE /public/plans\r\n", b"READ /public/plans\r\n"]) == [b"OK\r\n", b"OK\r\n"]
    deadline = time.monotonic() + 10
    while True:
        out = run_cli(state, "observe", "--protocol", "r2d2", "-o", "json").out
        flows = [simple(json.loads(line)) for line in out.splitlines()]
        if len(flows) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [(f["l7"]["cmd"], f["verdict"]) for f in flows[-2:]] == [("WRITE", "AUDIT"), ("READ", "FORWARDED")]
    assert flows[-2]["drop_reason"] == "no r2d2 rule matches" and flows[-2]["rule"].startswith("default deny")


@pytest.mark.parametrize("droid", [2], indirect=True, ids=["2-workers"])
def test_a_dead_worker_is_started_again(droid: tuple[Agent, Path]) -> None:
    agent, state = droid
    pool = agent.servers.l7_pool
    assert pool is not None
    victim = pool._procs[0]
    os.kill(victim.pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while (pool.restarts < 1 or pool.alive() < 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert pool.restarts >= 1 and pool.alive() == 2
    # Connections Envoy sends the dead worker's way fail (closed: fail closed) until it has
    # reconnected to the new one; then every connection works again, whichever worker it picks
    deadline = time.monotonic() + 15
    streak = 0
    while streak < 6 and time.monotonic() < deadline:
        streak = streak + 1 if _talk(C3PO, [b"READ /public/plans\r\n"]) == [b"OK\r\n"] else 0
        time.sleep(0.05)
    assert streak == 6, "connections still fail after the worker was started again"
    for _ in range(4):
        assert _talk(C3PO, [b"READ /public/plans\r\n", b"WRITE /public/plans\r\n"]) == [
            b"OK\r\n", b"ERROR access denied\r\n"]
    controllers = {c["name"]: c for c in run_cli(state, "status", "-o", "json").json()["controllers"]}
    assert controllers["l7-workers"]["status"] == "ok" and controllers["l7-workers"]["restarts"] >= 1

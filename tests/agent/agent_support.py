"""Helpers for the agent tests: an agent (in this process or as a real `cilia agent` process),
the `cilia` command run against it, a deathstar app, and requests from a ship's own address."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from click.testing import CliRunner

from cilia.agent.api import APIServer
from cilia.agent.client import AgentClient
from cilia.agent.daemon import Agent, AgentConfig
from cilia.cli.main import cli
from cilia.demo import Deathstar
from cilia.netutil import free_port

REPO = Path(__file__).resolve().parents[2]
STARWARS = REPO / "examples" / "starwars"
# Addresses of their own, so these tests never meet the demo's or other tests' listeners;
# CILIA_TEST_NET moves them (e.g. 127.0.19) when two checkouts run these tests at once.
_NET = os.environ.get("CILIA_TEST_NET", "127.0.1")
DEATHSTAR, TIEFIGHTER, XWING = f"{_NET}.10", f"{_NET}.11", f"{_NET}.12"
LAND = ("POST", "/v1/request-landing")
EXHAUST = ("PUT", "/v1/exhaust-port")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run_cli(state_dir: Path, *args: str) -> Result:
    """Run `cilia ARGS` in this process (click's runner) against the agent in ``state_dir``."""
    res = CliRunner().invoke(cli, list(args), env={"CILIA_STATE_DIR": str(state_dir)}, catch_exceptions=False)
    return Result(res.exit_code, res.stdout, res.stderr)


@contextmanager
def agent_in_process(state_dir: Path, envoy: str = "managed", xds_addresses: tuple[str, ...] = (),
                     **config: Any) -> Iterator[Agent]:
    agent = Agent(AgentConfig(state_dir, envoy, xds_addresses, **config))  # type: ignore[arg-type]
    api: APIServer | None = None
    try:
        agent.start()
        api = APIServer(agent.config.api_socket, agent)
        api.start()
        yield agent
    finally:
        if api is not None:
            api.stop()
        agent.stop()


class AgentProcess:
    """`python -m cilia agent` as a real process; stop() sends SIGTERM like an init system."""

    def __init__(self, state_dir: Path, *args: str, wrapper: tuple[str, ...] = ()) -> None:
        self.state_dir = state_dir
        self.args = args
        self.wrapper = wrapper  # e.g. nsenter --net=...: run the agent in another network namespace
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state_dir.parent / f"{state_dir.name}-agent.log"

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*self.wrapper, sys.executable, "-m", "cilia", "agent", "--state-dir",
                                          str(self.state_dir), *self.args], stdout=log, stderr=subprocess.STDOUT)
        client = AgentClient(self.state_dir / "cilia.sock", timeout=2)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
                try:
                    client.status()
                    return
                except Exception:
                    time.sleep(0.1)
        finally:
            client.close()
        raise TimeoutError(f"agent API not up after {timeout}s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextmanager
def deathstar_app(address: str = DEATHSTAR) -> Iterator[int]:
    """Cilium's deathstar app on ``address``; yields its port."""
    server = ThreadingHTTPServer((address, free_port(address)), Deathstar)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def shoot(source: str, method: str, path: str, port: int = 80, timeout: float = 3.0) -> str:
    """One request from ``source`` to deathstar: "<status> <body>", "blocked" (closed before a
    response or no answer) or "refused" (nothing listening)."""
    conn = http.client.HTTPConnection(DEATHSTAR, port, timeout=timeout, source_address=(source, 0))
    try:
        conn.request(method, path, body=b"", headers={"Host": "deathstar.default.svc.cluster.local"})
        resp = conn.getresponse()
        return f"{resp.status} {resp.read().decode().strip()}"
    except ConnectionRefusedError:
        return "refused"
    except (ConnectionError, TimeoutError, http.client.RemoteDisconnected):
        return "blocked"
    finally:
        conn.close()


def add_starwars_endpoints(state_dir: Path, app_port: int) -> None:
    for args in (["--name", "deathstar", "--labels", "org=empire,class=deathstar", "--ip", DEATHSTAR,
                  "--port", f"80:{app_port}"],
                 ["--name", "tiefighter", "--labels", "org=empire,class=tiefighter", "--ip", TIEFIGHTER],
                 ["--name", "xwing", "--labels", "org=alliance,class=xwing", "--ip", XWING]):
        res = run_cli(state_dir, "endpoint", "add", *args)
        assert res.code == 0, res.err
    revision = res.out.split()[-1]
    assert run_cli(state_dir, "policy", "wait", revision).code == 0


def _side(flow: dict[str, Any], which: str) -> dict[str, Any]:
    ep = flow.get(which, {})
    l4 = next(iter(flow.get("l4", {}).values()), {})
    return {"address": flow.get("IP", {}).get(which, ""), "port": l4.get(f"{which}_port", 0),
            "identity": ep.get("identity"), "labels": ep.get("labels", []), "endpoint": ep.get("pod_name", "")}


def simple(line: dict[str, Any]) -> dict[str, Any]:
    """One `cilia observe -o json` line (Hubble's export form) as the few fields tests look at:
    verdict, kind, rule, l7 (our protocol summary), drop_reason, endpoint (whose policy), both
    sides (address, port, identity, labels, endpoint)."""
    flow, ours = line["flow"], line["cilia"]
    return {"verdict": flow["verdict"], "kind": ours["kind"], "rule": ours["rule"], "l7": ours.get("l7", {}),
            "drop_reason": ours.get("drop_reason", ""), "endpoint": ours.get("endpoint", ""),
            "proxy_port": flow.get("proxy_port", 0), "seq": ours["seq"], "type": flow["Type"],
            "direction": flow.get("traffic_direction", "").lower(),
            "source": _side(flow, "source"), "destination": _side(flow, "destination")}


def observed(state_dir: Path, *args: str) -> list[dict[str, Any]]:
    """`cilia observe --last 1000 -o json ARGS`, each flow through ``simple``."""
    res = run_cli(state_dir, "observe", "--last", "1000", "-o", "json", *args)
    assert res.code == 0, res.err
    return [simple(json.loads(line)) for line in res.out.splitlines()]


def wait_flows(state_dir: Path, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The flows `cilia observe -o json` shows (through ``simple``) once at least ``count`` HTTP
    ones arrived (Envoy sends access logs in batches, a moment after the requests)."""
    deadline = time.monotonic() + timeout
    while True:
        flows = observed(state_dir)
        if sum(f["kind"] == "http" for f in flows) >= count or time.monotonic() > deadline:
            return flows
        time.sleep(0.2)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

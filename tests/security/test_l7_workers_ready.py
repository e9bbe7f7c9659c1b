"""Health is honest about the L7 worker processes: ``/healthz`` turns 200 only once every worker's
server listens (connections started that moment are all parsed and answered), and a dead worker
makes the agent degraded until the one started in its place serves again."""

from __future__ import annotations

import os
import select
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tests.agent.agent_support import agent_in_process, run_cli

from cilia.netutil import free_port

DROID, C3PO = "127.0.2.30", "127.0.2.31"
POLICY = Path(__file__).parents[2] / "examples" / "r2d2" / "droid.yaml"
BURST = 100


class _Droid(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for _line in self.rfile:
            self.wfile.write(b"OK\r\n")


@pytest.fixture
def droid_state(tmp_path: Path) -> Iterator[Path]:
    """A state dir holding the r2d2 endpoints and policy (made by an agent that has stopped), and
    the r2d2 server running behind them."""
    server = socketserver.ThreadingTCPServer((DROID, free_port(DROID)), _Droid, bind_and_activate=False)
    server.daemon_threads = True
    server.request_queue_size = 4 * BURST  # the burst reaches it at once
    server.server_bind()
    server.server_activate()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state = tmp_path / "state"
    try:
        with agent_in_process(state):
            for args in (["--name", "r2d2", "--labels", "app=r2d2", "--ip", DROID,
                          "--port", f"4242:{server.server_address[1]}"],
                         ["--name", "c3po", "--labels", "app=c3po", "--ip", C3PO]):
                assert run_cli(state, "endpoint", "add", *args).code == 0
            res = run_cli(state, "policy", "import", str(POLICY))
            assert res.code == 0, res.err
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _read_plans() -> bytes:
    try:
        with socket.create_connection((DROID, 4242), timeout=10, source_address=(C3PO, 0)) as s:
            s.sendall(b"READ /public/plans\r\n")
            return s.makefile("rb").readline()
    except OSError as e:
        return repr(e).encode()


def _healthy(api: Path) -> bool:
    """GET /healthz on the agent's socket: 200 or not (no socket yet counts as not)."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.settimeout(5)
            s.connect(str(api))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            return s.makefile("rb").readline().split()[1:2] == [b"200"]
        except OSError:
            return False


def test_connections_started_when_health_turns_ready_are_all_answered(droid_state: Path) -> None:
    log = droid_state.parent / "agent.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cilia", "agent", "--state-dir", str(droid_state),
                                 "--l7-workers", "2"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not _healthy(droid_state / "cilia.sock"):
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "never healthy: " + log.read_text()[-2000:]
            time.sleep(0.02)
        with ThreadPoolExecutor(BURST) as pool:
            replies = list(pool.map(lambda _: _read_plans(), range(BURST)))
        failed = [r for r in replies if r != b"OK\r\n"]
        assert not failed, f"{len(failed)}/{BURST} connections not answered, e.g. {failed[0]!r}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(path))
            return True
        except OSError:
            return False


def test_a_dead_worker_is_degraded_until_its_successor_serves(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_in_process(state, l7_workers=2) as agent:
        pool = agent.servers.l7_pool
        assert pool is not None
        sockets = agent.config.l7_sockets

        def workers() -> dict[str, object]:
            status = agent.status()
            ctl: dict[str, object] = next(c for c in status["controllers"] if c["name"] == "l7-workers")
            return {**ctl, "healthy": status["healthy"]}

        assert workers()["status"] == "ok" and all(_accepts(p) for p in sockets)  # start waited for them
        victim = pool._procs[0].pid
        pidfd = os.pidfd_open(victim)
        os.kill(victim, signal.SIGKILL)
        # a signal is delivered when the kernel gets to it: until the worker has exited, a health
        # "ok" is still true; from then on it must mean that every socket takes connections
        select.select([pidfd], [], [], 10)
        os.close(pidfd)
        seen_failing = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ctl = workers()
            if ctl["status"] == "ok":
                # ok means serving: every worker's socket takes connections at this moment
                assert all(_accepts(p) for p in sockets), "health ok while a worker does not listen"
                if pool.restarts >= 1:
                    break
            else:
                seen_failing = True
                assert "workers serving" in str(ctl["last_error"])
                assert not ctl["healthy"]
            time.sleep(0.01)
        assert pool.restarts >= 1 and workers()["status"] == "ok" and seen_failing

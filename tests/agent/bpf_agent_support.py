"""A real `cilia agent --datapath bpf` in a node namespace of its own, with the Star Wars ships as
endpoints it creates, for tests that drive it through the `cilia` command.

The node is a network namespace (``ip netns add``); the agent process enters it with ``nsenter
--net`` only, so it shares this process's bpffs mount and its pinned maps outlive it like on a
real node. Endpoint namespaces get per-test names. However a test ends, the agent is stopped,
``cilia cleanup`` runs in the node, and every namespace and pin of the test is deleted.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

from agent_support import AgentProcess, Result, run_cli
from helpers import ip, require_bpf

from cilia.bpf.netns import run_in_netns
from cilia.demo import Deathstar

ROUTER_IP = "10.212.0.1"
SHIPS = {"deathstar": ("10.212.0.10", "org=empire,class=deathstar"),
         "tiefighter": ("10.212.0.11", "org=empire,class=tiefighter"),
         "xwing": ("10.212.0.12", "org=alliance,class=xwing")}
TIMEOUT = "timeout"  # no answer at all: dropped in the kernel (Cilium's guide: curl times out)
CLOSED = "closed"  # reset or closed before any response


class BpfAgentNode:
    def __init__(self, tmp: Path, *agent_args: str) -> None:
        self.suffix = uuid.uuid4().hex[:5]
        self.node = f"cba-node-{self.suffix}"
        self.state_dir = tmp / "state"
        self.pin_dir = f"/sys/fs/bpf/cilia-agent-test-{self.suffix}"
        self.wrapper = ("nsenter", f"--net=/run/netns/{self.node}")
        self.agent = AgentProcess(self.state_dir, "--datapath", "bpf", "--bpf-pin-dir", self.pin_dir,
                                  "--router-ip", ROUTER_IP, *agent_args, wrapper=self.wrapper)
        self.servers: list[ThreadingHTTPServer] = []

    def netns(self, ship: str) -> str:
        return f"cba-{ship}-{self.suffix}"

    def address(self, ship: str) -> str:
        return SHIPS[ship][0]

    # -- lifecycle ------------------------------------------------------------------------

    def setup(self) -> None:
        self.state_dir.mkdir(parents=True)
        ip("netns", "add", self.node)
        ip("-n", self.node, "link", "set", "lo", "up")
        self.agent.start(timeout=60)

    def teardown(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        self.agent.stop()
        try:
            subprocess.run([*self.wrapper, sys.executable, "-m", "cilia", "cleanup", "--state-dir",
                            str(self.state_dir)], capture_output=True, timeout=60, check=False)
        finally:
            for ship in SHIPS:
                ip("netns", "del", self.netns(ship), check=False)
            ip("netns", "del", self.node, check=False)
            shutil.rmtree(self.pin_dir, ignore_errors=True)

    # -- the cilia command ------------------------------------------------------------------

    def cilia(self, *args: str) -> Result:
        return run_cli(self.state_dir, *args)

    def ok(self, *args: str) -> Result:
        res = self.cilia(*args)
        assert res.code == 0, (args, res.out, res.err)
        return res

    def add_ship(self, ship: str, labels: str | None = None) -> None:
        address, default_labels = SHIPS[ship]
        ports = ["--port", "80"] if ship == "deathstar" else []
        self.ok("endpoint", "add", "--name", ship, "--labels", labels or default_labels, "--ip", address,
                "--create-netns", "--netns", self.netns(ship), *ports)

    def import_policy(self, path: Path) -> int:
        revision = int(self.ok("policy", "import", str(path)).out.split()[-1])
        self.ok("policy", "wait", str(revision))
        return revision

    def serve_deathstar(self) -> None:
        """Cilium's deathstar app on port 80 inside deathstar's namespace."""
        server = run_in_netns(self.netns("deathstar"), lambda: ThreadingHTTPServer(("0.0.0.0", 80), Deathstar))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)

    # -- traffic ---------------------------------------------------------------------------

    def connect(self, ship: str, timeout: float = 2.0) -> http.client.HTTPConnection:
        """An HTTP connection from ``ship`` to deathstar:80, opened inside ship's namespace."""
        def open_conn() -> http.client.HTTPConnection:
            conn = http.client.HTTPConnection(self.address("deathstar"), 80, timeout=timeout)
            conn.connect()
            return conn

        return run_in_netns(self.netns(ship), open_conn)

    def shoot(self, ship: str, method: str, path: str, timeout: float = 2.0) -> str:
        """One request on a new connection: "<status> <body>", TIMEOUT or CLOSED."""
        try:
            conn = self.connect(ship, timeout)
        except TimeoutError:
            return TIMEOUT
        except OSError:
            return CLOSED
        try:
            return request(conn, method, path)
        finally:
            conn.close()

    def monitor(self, *args: str) -> Monitor:
        return Monitor(self.state_dir, *args)


def request(conn: http.client.HTTPConnection, method: str, path: str) -> str:
    try:
        conn.request(method, path, body=b"", headers={"Host": "deathstar.default.svc.cluster.local"})
        resp = conn.getresponse()
        return f"{resp.status} {resp.read().decode().strip()}"
    except TimeoutError:
        return TIMEOUT
    except (OSError, http.client.HTTPException):
        return CLOSED


class Monitor:
    """`cilia monitor ARGS -o json` as a real process; its events are collected on a thread."""

    def __init__(self, state_dir: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "cilia", "monitor", "--state-dir", str(state_dir),
                                      "-o", "json", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()
        time.sleep(1.0)  # the first long poll is in flight: later events reach it

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.events.append(json.loads(line))

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                hits = [e for e in self.events if pred(e)]
            if hits:
                return hits[0]
            if self.proc.poll() is not None:
                raise AssertionError(f"cilia monitor exited {self.proc.returncode}: {self.proc.stderr.read()}")
            time.sleep(0.1)
        raise AssertionError(f"no matching event in {len(self.events)}: {self.events[-5:]}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@contextmanager
def bpf_agent(tmp: Path, *agent_args: str) -> Iterator[BpfAgentNode]:
    require_bpf()
    node = BpfAgentNode(tmp, *agent_args)
    try:
        node.setup()
        yield node
    finally:
        node.teardown()

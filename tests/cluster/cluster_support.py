"""Three simulated nodes on a real 3-member etcd: network namespaces joined by an underlay, each
running a real `cilia agent --datapath bpf --kvstore etcd` (with its managed Envoy), pods made by
the agents (`cilia endpoint add --create-netns`).

Layout (every name carries the prefix ``cdp`` and the test run's tag, and is removed at close):

    netns cdp-ul-TAG   the underlay: bridge cdpbr0 10.223.0.254/24, the etcd members listen there
    netns cdp-nI-TAG   node I (1..3): eth0 10.223.0.I/24 on the bridge, pods 10.224.I.0/24 routed
                       by the agent (router 10.224.I.1), bpffs pins /sys/fs/bpf/cdp-TAG-nI
    netns cdp-out-TAG  an outside host: 10.223.0.100, routes the pod prefixes via their nodes

The underlay (cilia.demo_cluster.Underlay, shared with `make demo-cluster`) has an MTU of 9000, so
the tunnel device (50 bytes less) still carries 1500-byte frames.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

from cilia.bpf.netns import create_netns, delete_netns, netlink, run_in_netns
from cilia.demo import Deathstar
from cilia.demo_cluster import UNDERLAY_IP, Underlay, node_ip, pod_cidr
from tests.agent.agent_support import AgentProcess
from tests.kvstore.etcd_support import EtcdCluster
from tests.helpers import accept_forever

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
STARWARS = REPO / "examples" / "starwars"
OUTSIDE_IP = "10.223.0.100"
DEATHSTAR_HOST = "deathstar.default.svc.cluster.local"
SHIPS = {  # name: (node, address, labels)
    "xwing": (1, "10.224.1.12", "org=alliance,class=xwing"),
    "tiefighter": (2, "10.224.2.11", "org=empire,class=tiefighter"),
    "deathstar": (3, "10.224.3.10", "org=empire,class=deathstar"),
}
BLOCKED = "blocked"


def wait_until(what: str, predicate: Callable[[], T], timeout: float = 30.0, every: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        time.sleep(every)


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@dataclass
class Node:
    index: int
    netns: str
    pin_dir: str
    agent: AgentProcess
    servers: list[ThreadingHTTPServer] = field(default_factory=list)

    @property
    def ip(self) -> str:
        return node_ip(self.index)

    @property
    def state_dir(self) -> Path:
        return self.agent.state_dir

    def cilia(self, *args: str, check: bool = True) -> Result:
        env = {**os.environ, "CILIA_STATE_DIR": str(self.state_dir)}
        res = subprocess.run([sys.executable, "-m", "cilia", *args], env=env, capture_output=True, text=True,
                             timeout=120)
        out = Result(res.returncode, res.stdout, res.stderr)
        if check and res.returncode != 0:
            raise AssertionError(f"node {self.index}: cilia {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return out


class SimCluster:
    """``SimCluster(base, tunnel)``: etcd, underlay, outside host and three nodes with agents;
    ``close()`` stops the agents and removes everything."""

    def __init__(self, base: Path, tunnel: str = "disabled", tag: str | None = None) -> None:
        self.base = base
        self.tunnel = tunnel
        self.tag = tag or f"{os.getpid() % 10000}{'v' if tunnel == 'vxlan' else 'd'}"
        self.underlay = f"cdp-ul-{self.tag}"
        self.outside = f"cdp-out-{self.tag}"
        self.nodes: list[Node] = []
        self.etcd: EtcdCluster | None = None
        self._made: list[str] = []
        self._listeners: list[socket.socket] = []

    # ------------------------------------------------------------------ setup

    def start(self) -> SimCluster:
        try:
            self._underlay()
            self.etcd = EtcdCluster(self.base, members=3, host=UNDERLAY_IP, netns=self.underlay)
            for i in (1, 2, 3):
                self._node(i)
            self._outside_host()
            for node in self.nodes:
                node.agent.start(timeout=90)
        except BaseException:
            self.close()
            raise
        return self

    def _netns(self, name: str) -> None:
        delete_netns(name)  # a leftover of a killed run with the same tag
        create_netns(name)
        self._made.append(name)

    def _underlay(self) -> None:
        delete_netns(self.underlay)  # a leftover of a killed run with the same tag
        self._made.append(self.underlay)
        Underlay(self.underlay).create()

    def _node(self, i: int) -> None:
        netns = f"cdp-n{i}-{self.tag}"
        self._netns(netns)
        Underlay(self.underlay).plug(netns, f"cdpn{i}", node_ip(i))
        state = self.base / f"node{i}"
        state.mkdir(parents=True, exist_ok=True)
        pin_dir = f"/sys/fs/bpf/cdp-{self.tag}-n{i}"
        assert self.etcd is not None
        args = ["--datapath", "bpf", "--bpf-pin-dir", pin_dir, "--router-ip", f"10.224.{i}.1",
                "--node-id", f"cdp-node{i}", "--kvstore", "etcd", "--kvstore-endpoints", self.etcd.endpoints_arg,
                "--kvstore-lease-ttl", "3", "--node-ip", node_ip(i), "--pod-cidr", pod_cidr(i),
                "--tunnel", self.tunnel]
        agent = AgentProcess(state, *args, wrapper=("nsenter", f"--net=/run/netns/{netns}"))
        self.nodes.append(Node(i, netns, pin_dir, agent))

    def _outside_host(self) -> None:
        self._netns(self.outside)
        Underlay(self.underlay).plug(self.outside, "cdpout", OUTSIDE_IP)

        def routes() -> None:
            with netlink("outside host's routes") as ipr:
                for i in (1, 2, 3):
                    ipr.route("add", dst=pod_cidr(i), gateway=node_ip(i))

        run_in_netns(self.outside, routes)

    def node(self, i: int) -> Node:
        return self.nodes[i - 1]

    # ------------------------------------------------------------------ the Star Wars app

    def add_ship(self, name: str) -> int:
        """The ship's pod on its node (deathstar with port 80 and its app); returns its identity."""
        i, address, labels = SHIPS[name]
        node = self.node(i)
        port = ["--port", "80"] if name == "deathstar" else []
        res = node.cilia("endpoint", "add", "--name", name, "--labels", labels, "--ip", address, "--create-netns",
                         "--netns", self.pod_netns(name), *port, "-o", "json")
        if name == "deathstar":
            server = run_in_netns(self.pod_netns(name), lambda: ThreadingHTTPServer(("0.0.0.0", 80), Deathstar))
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, name="deathstar", daemon=True).start()
            node.servers.append(server)
        return int(res.json()["endpoint"]["identity"])

    def listen(self, name: str, port: int) -> None:
        """A TCP listener on ``port`` in the ship's pod (closed at close)."""
        def bind() -> socket.socket:
            sock = socket.create_server(("0.0.0.0", port))
            return sock

        sock = run_in_netns(self.pod_netns(name), bind)
        self._listeners.append(sock)
        accept_forever(sock, name=f"listen-{name}-{port}")

    def pod_netns(self, name: str) -> str:
        return f"cdp-{name[:4]}-{self.tag}"

    def import_policy(self, path: Path, nodes: tuple[int, ...] = (1, 2, 3)) -> None:
        for i in nodes:
            rev = self.node(i).cilia("policy", "import", str(path)).out.split()[-1]
            self.node(i).cilia("policy", "wait", rev)

    def shoot_from(self, netns: str, method: str, path: str, target: str = SHIPS["deathstar"][1],
                   timeout: float = 2.0, source: str | None = None) -> str:
        """One HTTP request from ``netns`` (from address ``source``, else the route's): "<status>
        <body>" or BLOCKED (no answer / closed)."""
        def go() -> str:
            conn = http.client.HTTPConnection(target, 80, timeout=timeout,
                                              source_address=(source, 0) if source else None)
            try:
                conn.request(method, path, body=b"", headers={"Host": DEATHSTAR_HOST})
                resp = conn.getresponse()
                return f"{resp.status} {resp.read().decode().strip()}"
            except (OSError, http.client.HTTPException):
                return BLOCKED
            finally:
                conn.close()

        return run_in_netns(netns, go)

    def shoot(self, ship: str, method: str, path: str, timeout: float = 2.0) -> str:
        return self.shoot_from(self.pod_netns(ship), method, path, timeout=timeout)

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        for sock in self._listeners:
            sock.close()
        for node in self.nodes:
            for server in node.servers:
                server.shutdown()
                server.server_close()
            node.agent.stop()
        for node in self.nodes:  # the agent is stopped: its programs, pins, routes and pods' namespaces
            if os.path.exists(f"/run/netns/{node.netns}"):
                subprocess.run(["nsenter", f"--net=/run/netns/{node.netns}", sys.executable, "-m", "cilia",
                                "cleanup", "--state-dir", str(node.state_dir)], capture_output=True, timeout=60,
                               check=False)
            subprocess.run(["rm", "-rf", node.pin_dir], check=False)
        for name in SHIPS:
            delete_netns(self.pod_netns(name))
        if self.etcd is not None:
            self.etcd.close()
        for name in reversed(self._made):
            delete_netns(name)
        self._made.clear()


@contextmanager
def sim_cluster(base: Path, tunnel: str) -> Iterator[SimCluster]:
    cluster = SimCluster(base, tunnel).start()
    try:
        yield cluster
    finally:
        cluster.close()


def tcp_open(netns: str, address: str, port: int, timeout: float = 1.0, source: str | None = None) -> bool:
    """Whether a TCP connection from ``netns`` (from ``source``) to ``address:port`` is accepted."""
    def go() -> bool:
        try:
            with socket.create_connection((address, port), timeout=timeout,
                                          source_address=(source, 0) if source else None):
                return True
        except OSError:
            return False

    return run_in_netns(netns, go)


def add_local_address(netns: str, address: str) -> None:
    """Put ``address``/32 on the loopback of ``netns`` (gone with the namespace)."""
    def go() -> None:
        with netlink(f"{address} on lo of {netns}") as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname="lo")[0], address=address, prefixlen=32)

    run_in_netns(netns, go)

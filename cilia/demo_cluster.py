"""The three-node Star Wars demo (``make demo-cluster``, as root): Cilium's guide across nodes.

Three simulated nodes (network namespaces joined by a bridge in a fourth, the underlay) each run
a real `cilia agent --datapath bpf --kvstore etcd` with its Envoy; a real 3-member etcd (Debian's
etcd-server) in the underlay namespace is all they share. xwing lives on node 1, tiefighter on
node 2, deathstar on node 3. Identities, endpoint addresses and nodes travel through etcd; the
agents route to each other's pods directly over the underlay (``CILIA_DEMO_TUNNEL=disabled``,
the default) or through VXLAN with the sender's identity in the VNI (``CILIA_DEMO_TUNNEL=vxlan``).
It says which mode ran, exits non-zero if any outcome differs from the guide's, and removes
everything it made, whatever happens.
"""

from __future__ import annotations

import functools
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO, TypeVar

from .bpf.loader import bpf_available
from .bpf.netns import create_netns, delete_netns, netlink, run_in_netns
from .demo import EXAMPLES, TIMEOUT, AgentRun, Deathstar, MonitorRun, _request, ship_labels

T = TypeVar("T")

UNDERLAY_IP = "10.223.0.254"
UNDERLAY_MTU = 9000  # VXLAN's 50 bytes fit: pods keep their 1500
SHIPS = {"xwing": (1, "10.224.1.12"), "tiefighter": (2, "10.224.2.11"), "deathstar": (3, "10.224.3.10")}
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380  # member i: + 10 * i (their own namespace: nothing else there)


def node_ip(i: int) -> str:
    return f"10.223.0.{i}"


def pod_cidr(i: int) -> str:
    return f"10.224.{i}.0/24"


class Underlay:
    """A named network namespace holding a bridge (``cdpbr0``, ``UNDERLAY_IP``/24); ``plug`` joins
    another namespace to it by a veth whose inside end is ``eth0`` with the given address."""

    BRIDGE = "cdpbr0"

    def __init__(self, name: str) -> None:
        self.name = name

    def create(self) -> None:
        create_netns(self.name)

        def bridge() -> None:
            with netlink("underlay bridge") as ipr:
                ipr.link("add", ifname=self.BRIDGE, kind="bridge")
                idx = ipr.link_lookup(ifname=self.BRIDGE)[0]
                ipr.link("set", index=idx, mtu=UNDERLAY_MTU, state="up")
                ipr.addr("add", index=idx, address=UNDERLAY_IP, prefixlen=24)

        run_in_netns(self.name, bridge)

    def plug(self, netns: str, port: str, address: str) -> None:
        fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)

        def bridge_end() -> None:
            with netlink(f"underlay port {port}") as ipr:
                ipr.link("add", ifname=port, kind="veth", peer=f"{port}p")
                ipr.link("set", index=ipr.link_lookup(ifname=f"{port}p")[0], net_ns_fd=fd)
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], mtu=UNDERLAY_MTU, state="up",
                         master=ipr.link_lookup(ifname=self.BRIDGE)[0])

        def inside() -> None:
            with netlink(f"eth0 of {netns}") as ipr:
                idx = ipr.link_lookup(ifname=f"{port}p")[0]
                ipr.link("set", index=idx, ifname="eth0")
                ipr.link("set", index=idx, mtu=UNDERLAY_MTU, state="up")
                ipr.addr("add", index=idx, address=address, prefixlen=24)

        try:
            run_in_netns(self.name, bridge_end)
        finally:
            os.close(fd)
        run_in_netns(netns, inside)

    def delete(self) -> None:
        delete_netns(self.name)


class Etcd:
    """Three etcd members in the underlay namespace, on ``UNDERLAY_IP``."""

    def __init__(self, netns: str, base: Path) -> None:
        self.netns = netns
        self.base = base
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls = [f"http://{UNDERLAY_IP}:{ETCD_CLIENT_PORT + 10 * i}" for i in range(3)]

    def start(self) -> None:
        etcd = shutil.which("etcd") or "/usr/bin/etcd"
        peers = ",".join(f"m{i}=http://{UNDERLAY_IP}:{ETCD_PEER_PORT + 10 * i}" for i in range(3))
        for i in range(3):
            peer = f"http://{UNDERLAY_IP}:{ETCD_PEER_PORT + 10 * i}"
            args = [etcd, "--name", f"m{i}", "--data-dir", str(self.base / f"etcd-{i}"),
                    "--listen-client-urls", self.urls[i], "--advertise-client-urls", self.urls[i],
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", peers, "--initial-cluster-state", "new",
                    "--initial-cluster-token", f"cilia-demo-{os.getpid()}", "--logger", "zap",
                    "--log-outputs", "stderr"]
            with open(self.base / f"etcd-{i}.log", "wb") as log:  # the child keeps its own copy
                self.procs.append(run_in_netns(self.netns, functools.partial(_spawn, args, log)))
        for url in self.urls:
            _wait(f"etcd member {url} healthy", functools.partial(run_in_netns, self.netns,
                                                                  functools.partial(_healthy, url)))

    def stop(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        self.procs.clear()


def _spawn(args: list[str], log: BinaryIO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)


def _healthy(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=1)
    try:
        conn.request("GET", "/health")
        return b'"health":"true"' in conn.getresponse().read()
    except OSError:
        return False
    finally:
        conn.close()


def _wait(what: str, predicate: Callable[[], T], timeout: float = 60.0) -> T:
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        if time.monotonic() > deadline:
            raise OSError(f"{what}: not after {timeout:g}s")
        time.sleep(0.3)
    return got


class ClusterDemo:
    def __init__(self, tunnel: str, base: Path) -> None:
        tag = f"{os.getpid() % 100000}"
        self.tunnel = tunnel
        self.base = base
        self.underlay = Underlay(f"cilia-demo-ul-{tag}")
        self.etcd = Etcd(self.underlay.name, base)
        self.nodes = [f"cilia-demo-n{i}-{tag}" for i in (1, 2, 3)]
        self.pins = [f"/sys/fs/bpf/cilia-demo-{tag}-n{i}" for i in (1, 2, 3)]
        self.pods = {ship: f"cilia-demo-{ship}-{tag}" for ship in SHIPS}
        self.agents: list[AgentRun] = []
        self.servers: list[ThreadingHTTPServer] = []

    def agent(self, ship: str) -> AgentRun:
        return self.agents[SHIPS[ship][0] - 1]

    def setup(self) -> None:
        self.underlay.create()
        self.etcd.start()
        for i, name in enumerate(self.nodes, start=1):
            create_netns(name)
            self.underlay.plug(name, f"cdpn{i}", node_ip(i))
            state = self.base / f"node{i}"
            state.mkdir()
            self.agents.append(AgentRun(state, [
                "--datapath", "bpf", "--bpf-pin-dir", self.pins[i - 1], "--router-ip", f"10.224.{i}.1",
                "--node-id", f"node{i}", "--kvstore", "etcd", "--kvstore-endpoints", ",".join(self.etcd.urls),
                "--node-ip", node_ip(i), "--pod-cidr", pod_cidr(i), "--tunnel", self.tunnel], name))
        for agent in self.agents:
            agent.start()

    def add_ships(self) -> None:
        labels = ship_labels(EXAMPLES / "http-sw-app.yaml")
        for ship, (i, address) in SHIPS.items():
            port = ["--port", "80"] if ship == "deathstar" else []
            print(f"\n   on node {i}:")
            self.agent(ship).cilia("endpoint", "add", "--name", ship, "--labels",
                                   ",".join(f"{k}={v.value}" for k, v in labels[ship].items()), "--ip", address,
                                   "--create-netns", "--netns", self.pods[ship], *port)
        server = run_in_netns(self.pods["deathstar"], lambda: ThreadingHTTPServer(("0.0.0.0", 80), Deathstar))
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="deathstar", daemon=True).start()
        self.servers.append(server)

    def shoot(self, ship: str, method: str, path: str) -> tuple[str, str]:
        return run_in_netns(self.pods[ship], lambda: _request(None, SHIPS["deathstar"][1], method, path))

    def teardown(self) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()
        for agent in self.agents:
            agent.stop()
        for agent, node in zip(self.agents, self.nodes):
            try:  # the agent is stopped: its programs, pins, routes, tunnel and pods' namespaces
                run_in_netns(node, functools.partial(
                    subprocess.run, [sys.executable, "-m", "cilia", "cleanup", "--state-dir", str(agent.state_dir)],
                    capture_output=True, timeout=60, check=False))
            except OSError:
                pass
        self.etcd.stop()
        for name in [*self.pods.values(), *self.nodes]:
            delete_netns(name)
        self.underlay.delete()
        for pin in self.pins:
            shutil.rmtree(pin, ignore_errors=True)


STEPS = (  # (ship, method, path, expected outcome, what Cilium's guide shows)
    ("tiefighter", "POST", "/v1/request-landing", "200 Ship landed", "lands"),
    ("tiefighter", "PUT", "/v1/exhaust-port", "403 Access denied", "refused by node 3's Envoy"),
    ("xwing", "POST", "/v1/request-landing", TIMEOUT, "dropped in node 3's kernel"),
)


def run(demo: ClusterDemo) -> int:
    demo.setup()
    print(f"   3 nodes, each a network namespace on the underlay {UNDERLAY_IP}/24 with a cilia agent "
          f"(BPF datapath, Envoy); etcd: {', '.join(demo.etcd.urls)}")
    demo.add_ships()
    policy = EXAMPLES / "sw_l3_l4_l7_policy.yaml"
    print("\n-- the same policy on every node")
    for agent in demo.agents:
        agent.cilia("policy", "wait", agent.cilia("policy", "import", str(policy), show=False).split()[-1], show=False)
    print(f"   imported {policy.name} on nodes 1-3")
    print("\n-- node 3 sees the cluster through etcd")
    node3 = demo.agent("deathstar")
    node3.cilia("node", "list")
    _wait("node 3 knows tiefighter", lambda: demo.shoot("tiefighter", "POST", "/v1/request-landing")[0]
          == "200 Ship landed")
    print("\n-- requests across nodes")
    failures = 0
    monitor = MonitorRun(node3.env)
    for ship, method, path, expect, meaning in STEPS:
        outcome, seen = demo.shoot(ship, method, path)
        ok = outcome == expect
        failures += not ok
        print(f"   {ship:>10} (node {SHIPS[ship][0]}) {method:<4} {path:<22} -> {seen}  "
              f"[{'ok' if ok else 'UNEXPECTED'}: {meaning}]")
    lines = monitor.stop()
    print("   $ cilia monitor --type drop     (on node 3, meanwhile)")
    for line in lines:
        print(f"     {line}")
    if not any("10.224.1.12" in line and "Policy denied" in line for line in lines):
        print("   UNEXPECTED: node 3's monitor did not show xwing's drop")
        failures += 1
    print("\n-- what node 3's kernel and Envoy decided, with identities and the deciding rule")
    time.sleep(1.2)  # Envoy flushes access logs about once a second
    node3.cilia("observe", "--last", "6")
    return failures


def main() -> int:
    tunnel = os.environ.get("CILIA_DEMO_TUNNEL", "disabled")
    if tunnel not in ("disabled", "vxlan"):
        print(f"CILIA_DEMO_TUNNEL={tunnel}: expected disabled or vxlan")
        return 2
    mode = "VXLAN (the sender's identity in the VNI)" if tunnel == "vxlan" else "direct routing over the underlay"
    print("cilia Star Wars across three nodes (Cilium's getting-started guide, policies unchanged)")
    why = bpf_available() or (None if shutil.which("etcd") else "etcd is not installed (Debian etcd-server)")
    if why is not None:
        print(f"cannot run: {why}")
        return 1
    print(f"\n## mode: {mode}")
    with tempfile.TemporaryDirectory(prefix="cilia-demo-cluster-") as tmp:
        demo = ClusterDemo(tunnel, Path(tmp))
        try:
            failures = run(demo)
        except KeyboardInterrupt:
            print("\ninterrupted: everything the demo started was stopped")
            return 130
        except OSError as exc:
            print(f"\nthe demo could not run: {exc}")
            print("demo-cluster FAILED")
            return 1
        finally:
            demo.teardown()
    if failures:
        print(f"\ndemo-cluster FAILED ({mode}): {failures} outcome(s) differ from Cilium's")
        return 1
    print(f"\ndemo-cluster passed ({mode}): every request across nodes matches Cilium's getting-started guide")
    return 0


if __name__ == "__main__":
    sys.exit(main())

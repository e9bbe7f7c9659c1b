"""toFQDNs through the agent and the kernel: ``Agent.learn_fqdn`` (what the DNS proxy calls for
each allowed answer) returns only once the BPF maps select the learned addresses, so the first
connection to them passes; addresses nobody learned are dropped; expiry closes new connections
unless conntrack still holds a flow; a restarted agent keeps what it learned.

The agent runs in this process, on threads inside a node namespace of the test's own; "outside"
hosts are namespaces routed through the node, never registered as endpoints.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.agent.agent_support import run_cli
from tests.helpers import accept_forever, ip, require_bpf

from cilia.agent.api import APIServer
from cilia.agent.client import AgentClient
from cilia.agent.daemon import Agent, AgentConfig
from cilia.fqdn.config import FqdnConfig
from cilia.bpf import maps
from cilia.bpf.netns import Namespace, run_in_netns
from cilia.specs import EndpointSpec

T = TypeVar("T")
ROUTER = "10.214.0.1"
CLIENT = "10.214.0.11"
OUTSIDE = {"api": "203.0.113.10", "other": "203.0.113.11", "cdn": "203.0.113.12"}
PORT = 8080
POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: to-fqdn}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toFQDNs: [{matchName: api.example.com}, {matchPattern: "*.cdn.example.com"}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


class FqdnNode:
    """A node namespace running an in-process agent with the BPF datapath, a client endpoint it
    created and outside hosts that accept TCP on PORT."""

    def __init__(self, tmp: Path) -> None:
        self.suffix = uuid.uuid4().hex[:5]
        self.node = f"cfq-node-{self.suffix}"
        self.state_dir = tmp / "state"
        self.pin_dir = f"/sys/fs/bpf/cilia-fqdn-test-{self.suffix}"
        self.outside: dict[str, Namespace] = {}
        self.listeners: list[socket.socket] = []
        self.agent: Agent | None = None
        self.api: APIServer | None = None

    def call(self, fn: Callable[[], T]) -> T:
        """On a thread inside the node (threads it starts stay there)."""
        return run_in_netns(self.node, fn)

    def setup(self) -> None:
        ip("netns", "add", self.node)
        ip("-n", self.node, "link", "set", "lo", "up")
        ip("netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for n, (name, address) in enumerate(sorted(OUTSIDE.items())):
            ns = Namespace(f"cfq-{name}-{self.suffix}", address, f"cfx{n}{self.suffix}", node=self.node)
            ns.create(ROUTER)
            self.outside[name] = ns
            self.listeners.append(ns.run_in(lambda a=address: _listen(a)))  # type: ignore[misc]
        self.start_agent()
        assert self.agent is not None
        spec = EndpointSpec("client", ("app=client",), (CLIENT,), netns=f"cfq-client-{self.suffix}", create=True)
        self.call(lambda: self.agent.add_endpoint(spec))  # type: ignore[union-attr]

    def start_agent(self) -> None:
        config = AgentConfig(self.state_dir, envoy="none", datapath="bpf", bpf_pin_dir=self.pin_dir,
                             router_ip=ROUTER, fqdn=FqdnConfig(grace=0.0, ct_idle=1.0, interval=0.2))

        def start() -> Agent:
            agent = Agent(config)
            agent.start()
            return agent

        self.agent = self.call(start)
        self.api = APIServer(config.api_socket, self.agent)
        self.api.start()

    def stop_agent(self) -> None:
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self.agent is not None:
            self.call(self.agent.stop)
            self.agent = None

    def teardown(self) -> None:
        try:
            self.stop_agent()
        finally:
            for sock in self.listeners:
                sock.close()
            ip("netns", "del", f"cfq-client-{self.suffix}", check=False)
            for ns in self.outside.values():
                ns.delete()
            ip("netns", "del", self.node, check=False)
            shutil.rmtree(self.pin_dir, ignore_errors=True)

    def learn(self, name: str, ips: list[str], ttl: int) -> None:
        assert self.agent is not None
        agent = self.agent
        self.call(lambda: agent.learn_fqdn("client", name, ips, ttl))

    def connect(self, address: str, timeout: float = 1.0) -> socket.socket | None:
        """A TCP connection from the client to address:PORT; None when it is dropped (no answer)."""
        def open_conn() -> socket.socket | None:
            sock = socket.create_connection((address, PORT), timeout=timeout)
            return sock

        try:
            return run_in_netns(f"cfq-client-{self.suffix}", open_conn)
        except TimeoutError:
            return None

    def reaches(self, address: str, timeout: float = 1.0) -> bool:
        sock = self.connect(address, timeout)
        if sock is None:
            return False
        sock.close()
        return True


def _listen(address: str) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, PORT))
    sock.listen(128)
    accept_forever(sock, lambda conn: threading.Thread(target=_echo, args=(conn,), daemon=True).start())
    return sock


def _echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(4096):
            conn.sendall(data)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[FqdnNode]:
    require_bpf()
    n = FqdnNode(tmp_path)
    try:
        n.setup()
        assert n.agent is not None
        agent = n.agent
        n.call(lambda: agent.import_policies([("fqdn.yaml", POLICY)]))
        yield n
    finally:
        n.teardown()


def wait_until(pred: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll for a state change driven by the agent's own clock (not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.05)


def ipcache_of(node: FqdnNode) -> dict[str, int]:
    assert node.agent is not None and node.agent.node is not None
    return {str(k.network_address): v for k, v in
            maps.ipcache_items(node.agent.node.loader.maps["ipcache"]).items() if k.prefixlen == 32}


def test_learned_address_passes_first_try_and_others_drop(node: FqdnNode) -> None:
    assert not node.reaches(OUTSIDE["api"])  # nothing learned: denied in the kernel
    node.learn("API.example.com.", [OUTSIDE["api"]], 300)
    assert OUTSIDE["api"] in ipcache_of(node)  # in the BPF ipcache when learn returned
    assert node.reaches(OUTSIDE["api"])  # and the first connection passes
    assert not node.reaches(OUTSIDE["other"])  # never learned
    node.learn("other.example.org", [OUTSIDE["other"]], 300)  # learned, but no selector matches it
    assert OUTSIDE["other"] not in ipcache_of(node) and not node.reaches(OUTSIDE["other"])
    assert node.agent is not None
    revision = node.agent.revision
    node.learn("api.example.com", [OUTSIDE["api"]], 300)  # a repeated answer: no new revision
    assert node.agent.revision == revision


def test_first_connection_after_each_new_answer(node: FqdnNode) -> None:
    """Every new name's address is reachable by the very first SYN after learn returns."""
    for i in range(20):
        address = OUTSIDE["cdn"] if i % 2 else OUTSIDE["api"]
        name = f"n{i}.cdn.example.com"
        node.learn(name, [address], 300)
        assert node.reaches(address), f"answer {i}"
        node.call(lambda n=name: node.agent.fqdn.clean(n))  # type: ignore[union-attr,misc]
        assert not node.reaches(address, timeout=0.3), f"after clean {i}"  # a SYN here is answered in µs


def test_known_only_for_addresses_the_maps_hold(node: FqdnNode) -> None:
    """The proxy's on-loop shortcut (``known_fqdn``) may release an answer without the learner
    only when the maps hold every address: not before learning, not for an address another
    answer has put in the cache but not yet fed to the maps, not after a clean."""
    assert node.agent is not None
    agent = node.agent
    name, api, cdn = "api.example.com", OUTSIDE["api"], OUTSIDE["cdn"]
    assert not agent.known_fqdn("client", name, [api], 300)
    node.learn(name, [api], 300)
    assert agent.known_fqdn("client", name, [api], 300)
    assert agent.known_fqdn("client", name.upper() + ".", [api], 300)  # names compare as DNS names do
    # another answer's learner mid-way: its address in the cache, not yet in the maps
    agent.fqdn.cache.learn(name, [cdn], 300, time.time(), "client")
    assert cdn not in ipcache_of(node)
    assert not agent.known_fqdn("client", name, [api, cdn], 300)
    node.learn(name, [api, cdn], 300)  # nothing new for the cache, but it is fed and realized
    assert cdn in ipcache_of(node) and agent.known_fqdn("client", name, [api, cdn], 300)
    node.call(lambda: agent.fqdn.clean(name))
    assert not agent.known_fqdn("client", name, [api], 300)
    assert not node.reaches(api)


def test_expiry_closes_new_connections_but_open_flows_keep_it(node: FqdnNode) -> None:
    assert node.agent is not None
    agent = node.agent
    node.learn("x.cdn.example.com", [OUTSIDE["cdn"]], 1)
    held = node.connect(OUTSIDE["cdn"])
    assert held is not None
    try:
        # the TTL runs out while the flow is busy: the address stays selected
        for _ in range(30):
            held.sendall(b"ping")
            assert held.recv(16) == b"ping"
            time.sleep(0.1)
        assert agent.fqdn.cache.get("x.cdn.example.com") == {OUTSIDE["cdn"]}
        assert node.reaches(OUTSIDE["cdn"])
    finally:
        held.close()
    # idle for longer than ct_idle: collected, and new connections drop in the kernel
    wait_until(lambda: not agent.fqdn.cache.get("x.cdn.example.com"))
    assert OUTSIDE["cdn"] not in ipcache_of(node)
    assert not node.reaches(OUTSIDE["cdn"])
    assert agent.fqdn.stats()["expired"] == 1


def test_restart_keeps_learned_addresses(node: FqdnNode) -> None:
    node.learn("api.example.com", [OUTSIDE["api"]], 600)
    held = node.connect(OUTSIDE["api"])
    assert held is not None
    try:
        node.stop_agent()
        held.sendall(b"while away")
        assert held.recv(32) == b"while away"  # the kernel kept enforcing
        node.start_agent()
        assert node.agent is not None
        assert node.agent.fqdn.cache.get("api.example.com") == {OUTSIDE["api"]}
        held.sendall(b"after")
        assert held.recv(32) == b"after"
        assert node.reaches(OUTSIDE["api"])  # new connections too
        assert OUTSIDE["api"] in ipcache_of(node)
    finally:
        held.close()


def test_cache_commands_trace_and_metrics(node: FqdnNode) -> None:
    state = node.state_dir
    node.learn("api.example.com", [OUTSIDE["api"]], 300)
    node.learn("other.example.org", [OUTSIDE["other"]], 300)
    listed = run_cli(state, "fqdn", "cache", "list", "-o", "json")
    assert listed.code == 0, listed.err
    rows = {e["name"]: e for e in listed.json()["entries"]}
    assert rows["api.example.com"]["selected"] and not rows["other.example.org"]["selected"]
    assert rows["api.example.com"]["endpoint"] == "client"
    assert [i["ip"] for i in rows["api.example.com"]["ips"]] == [OUTSIDE["api"]]
    assert 290 <= rows["api.example.com"]["ips"][0]["ttl"] <= 300
    text = run_cli(state, "fqdn", "cache", "list", "--name", "API.example.com.").out
    assert "api.example.com" in text and OUTSIDE["api"] in text and "other.example.org" not in text

    # a destination given as a learned name, and a DNS query, traced live
    allowed = run_cli(state, "policy", "trace", "--from-endpoint", "client", "--dst-fqdn", "api.example.com",
                      "--dport", "8080")
    assert allowed.code == 0, allowed.out + allowed.err
    assert f"api.example.com ({OUTSIDE['api']})" in allowed.out and "fqdn.yaml:" in allowed.out
    denied = run_cli(state, "policy", "trace", "--from-endpoint", "client", "--dst-fqdn", "other.example.org",
                     "--dport", "8080")
    assert denied.code == 1
    unknown = run_cli(state, "policy", "trace", "--from-endpoint", "client", "--dst-fqdn", "never.example.com")
    assert unknown.code != 0 and "has not been learned" in unknown.err
    dns = run_cli(state, "policy", "trace", "--from-endpoint", "client", "--dst-cidr", "10.96.0.10",
                  "--protocol", "udp", "--dport", "53", "--dns-query", "api.example.com", "-o", "json")
    assert dns.json()["l7"] == {"protocol": "dns", "name": "api.example.com"}

    client = AgentClient(state / "cilia.sock")
    try:
        families = {f.name: f for f in text_string_to_metric_families(client.metrics())}
    finally:
        client.close()
    assert families["cilia_fqdn_active_names"].samples[0].value == 2
    assert families["cilia_fqdn_active_ips"].samples[0].value == 2
    assert families["cilia_fqdn_learned"].samples[0].value == 2

    cleaned = run_cli(state, "fqdn", "cache", "clean", "--name", "api.example.com", "-o", "json")
    assert cleaned.code == 0 and cleaned.json()["removed"] == 1
    assert not node.reaches(OUTSIDE["api"])  # forgotten: no longer selected
    assert [e["name"] for e in run_cli(state, "fqdn", "cache", "list", "-o", "json").json()["entries"]] == [
        "other.example.org"]
    assert run_cli(state, "fqdn", "cache", "clean", "-o", "json").json()["removed"] == 1

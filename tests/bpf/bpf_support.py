"""A node namespace with endpoint namespaces around it and the real BPF datapath on their veths.

``bpf_node()`` creates (all with a per-test suffix) a node namespace, endpoints as namespaces
joined to it by veth pairs, loads ``datapath.c`` with its maps pinned in a private bpffs
directory, and removes all of it however the test ends. Policy comes from a real
``PolicyEngine``: ``sync()`` writes its ipcache and every endpoint's map state to the kernel.
Probes open real sockets inside the namespaces.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from helpers import ip, require_bpf

from cilia.bpf import maps
from cilia.bpf.datapath import Datapath, DatapathEvent
from cilia.bpf.loader import Loader
from cilia.bpf.netns import Namespace, run_in_netns
from cilia.policy import Endpoint, LabelSet, PolicyEngine, parse_text

NODE_IP = "10.211.0.1"


@dataclass
class Ep:
    name: str
    address: str
    ns: Namespace
    ep_id: int
    labels: tuple[str, ...]
    servers: list[socket.socket] = field(default_factory=list)


class BpfNode:
    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.node = f"cb-node-{suffix}"
        self.loader = Loader(pin_dir=f"/sys/fs/bpf/cilia-test-{suffix}", netns=self.node)
        self.datapath = Datapath(self.loader)
        self.engine = PolicyEngine()
        self.endpoints: dict[str, Ep] = {}
        self.events: list[DatapathEvent] = []
        self._lock = threading.Lock()

    def setup(self) -> None:
        ip("netns", "add", self.node)
        ip("-n", self.node, "link", "set", "lo", "up")
        ip("-n", self.node, "addr", "add", f"{NODE_IP}/32", "dev", "lo")
        subprocess.run(["ip", "netns", "exec", self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1",
                        "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"], check=True)
        self.loader.load()
        self.datapath.subscribe(self._record)
        self.datapath.start_events()

    def _record(self, ev: DatapathEvent) -> None:
        with self._lock:
            self.events.append(ev)

    def add_endpoint(self, name: str, address: str, labels: str) -> Ep:
        ep_id = len(self.endpoints) + 1
        ns = Namespace(f"cb-{name}-{self.suffix}", address, f"cb{ep_id}{self.suffix}"[:15], node=self.node)
        assert not any(e.ep_id == ep_id for e in self.endpoints.values())
        ep = Ep(name, address, ns, ep_id, tuple(labels.split(",")))
        self.endpoints[name] = ep
        ns.create(NODE_IP)
        self.engine.upsert_endpoint(Endpoint(name, LabelSet.parse(list(ep.labels)),
                                             (ipaddress.ip_address(address),)))
        self.datapath.upsert_endpoint(ep_id, address, ns.host_if, self.engine.identity_of(name).id)
        return ep

    def add_outside(self, name: str, address: str) -> Ep:
        """A host outside the cluster: a namespace routed through the node, with no endpoint."""
        n = len(self.endpoints) + 1
        ns = Namespace(f"cb-{name}-{self.suffix}", address, f"cx{n}{self.suffix}"[:15], node=self.node)
        ep = Ep(name, address, ns, 0, ())
        self.endpoints[name] = ep
        ns.create(NODE_IP)
        return ep

    def relabel(self, name: str, labels: str) -> None:
        ep = self.endpoints[name]
        ep.labels = tuple(labels.split(","))
        self.engine.upsert_endpoint(Endpoint(name, LabelSet.parse(list(ep.labels)),
                                             (ipaddress.ip_address(ep.address),)))
        self.datapath.upsert_endpoint(ep.ep_id, ep.address, ep.ns.host_if, self.engine.identity_of(name).id)

    def set_audit(self, name: str, ingress: bool = False, egress: bool = False) -> None:
        ep = self.endpoints[name]
        flags = (maps.AUDIT_INGRESS if ingress else 0) | (maps.AUDIT_EGRESS if egress else 0)
        self.datapath.upsert_endpoint(ep.ep_id, ep.address, ep.ns.host_if, self.engine.identity_of(name).id, flags)

    def apply(self, yaml_text: str, path: str = "policy.yaml") -> None:
        loaded = parse_text(yaml_text, path)
        assert loaded.ok, loaded.problems
        self.engine.apply(loaded.policies)
        self.sync()

    def delete_all_policies(self) -> None:
        self.engine.delete([p.key for p in self.engine.policies()])
        self.sync()

    def sync(self) -> None:
        items = list(self.engine.ipcache.items())
        items.append((ipaddress.ip_network(f"{NODE_IP}/32"), 1))  # the node: reserved:host
        self.datapath.sync_ipcache(items)
        for ep in self.endpoints.values():
            if ep.ep_id:
                self.datapath.sync_policy(ep.ep_id, self.engine.endpoint_policy(ep.name).map_state)

    # -- probes ---------------------------------------------------------------------------

    def serve_tcp(self, name: str, *ports: int) -> None:
        ep = self.endpoints[name]

        def listen() -> list[socket.socket]:
            out = []
            for port in ports:
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", port))
                s.listen(64)
                out.append(s)
            return out

        ep.servers += run_in_netns(ep.ns.name, listen)

    def serve_udp_echo(self, name: str, port: int) -> None:
        ep = self.endpoints[name]

        def bind() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0", port))
            return s

        sock = run_in_netns(ep.ns.name, bind)
        ep.servers.append(sock)

        def echo() -> None:
            while True:
                try:
                    data, peer = sock.recvfrom(2048)
                    sock.sendto(data, peer)
                except OSError:
                    return

        threading.Thread(target=echo, daemon=True).start()

    def tcp(self, src: str, dst: str, port: int, timeout: float = 0.6) -> bool:
        """True if ``src`` could open a TCP connection to ``dst`` (an endpoint name or IP)."""
        addr = self.endpoints[dst].address if dst in self.endpoints else dst

        def connect() -> bool:
            with socket.socket() as c:
                c.settimeout(timeout)
                try:
                    c.connect((addr, port))
                    return True
                except OSError:
                    return False

        return run_in_netns(self.endpoints[src].ns.name, connect)

    def open_tcp(self, src: str, dst: str, port: int) -> socket.socket:
        addr = self.endpoints[dst].address

        def connect() -> socket.socket:
            c = socket.create_connection((addr, port), timeout=1.0)
            return c

        return run_in_netns(self.endpoints[src].ns.name, connect)

    def udp(self, src: str, dst: str, port: int, timeout: float = 0.6) -> bool:
        addr = self.endpoints[dst].address

        def ask() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(timeout)
                c.sendto(b"ping", (addr, port))
                try:
                    return c.recvfrom(2048)[0] == b"ping"
                except OSError:
                    return False

        return run_in_netns(self.endpoints[src].ns.name, ask)

    def ping(self, src: str, dst: str, timeout: float = 0.6) -> bool:
        """One ICMP echo request from ``src``; True if the reply came back (raw socket: root)."""
        addr = self.endpoints[dst].address if dst in self.endpoints else dst
        ident = os.getpid() & 0xFFFF

        def echo() -> bool:
            with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as s:
                s.settimeout(timeout)
                s.sendto(_icmp_echo(ident, 1), (addr, 0))
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    try:
                        data, peer = s.recvfrom(2048)
                    except OSError:
                        return False
                    icmp = data[(data[0] & 0x0F) * 4:]
                    if peer[0] == addr and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
                        return True
                return False

        return run_in_netns(self.endpoints[src].ns.name, echo)

    def from_node_tcp(self, dst: str, port: int, timeout: float = 0.6) -> bool:
        addr = self.endpoints[dst].address

        def connect() -> bool:
            with socket.socket() as c:
                c.settimeout(timeout)
                c.bind((NODE_IP, 0))
                try:
                    c.connect((addr, port))
                    return True
                except OSError:
                    return False

        return run_in_netns(self.node, connect)

    def wait_events(self, pred: Callable[[DatapathEvent], bool], timeout: float = 3.0) -> list[DatapathEvent]:
        """The events matching ``pred`` once at least one arrived (the poller thread delivers them)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                hits = [e for e in self.events if pred(e)]
            if hits or time.monotonic() > deadline:
                return hits
            time.sleep(0.05)

    def teardown(self) -> None:
        self.datapath.stop_events()
        for ep in self.endpoints.values():
            for s in ep.servers:
                s.close()
        try:
            self.loader.remove_all()
        finally:
            for ep in self.endpoints.values():
                ep.ns.delete()
            ip("netns", "del", self.node, check=False)


@contextmanager
def bpf_node() -> Iterator[BpfNode]:
    require_bpf()
    node = BpfNode(uuid.uuid4().hex[:5])
    try:
        node.setup()
        yield node
    finally:
        node.teardown()


def _icmp_echo(ident: int, seq: int) -> bytes:
    body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"cilia!"  # even length for the checksum
    total = sum(struct.unpack(f"!{len(body) // 2}H", body))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]

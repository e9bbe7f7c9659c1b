"""A BPF agent node with a real dnsmasq playing kube-dns and client endpoints whose egress DNS goes
through the agent's DNS proxy.

Endpoints (made by the agent, ``--create-netns``): ``kube-dns`` (10.212.0.53, dnsmasq on :53),
``silent-dns`` (10.212.0.54, a UDP/TCP socket on :53 that never answers), ``client`` and
``other`` (clients). dnsmasq serves the names below from a hosts file, logs every query it
receives to a file (so a test can show a refused name never reached it), and runs in the
foreground as this test's child. Everything is named with the test's suffix and removed after.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
from tests.agent.bpf_agent_support import BpfAgentNode, bpf_agent
from tests.helpers import ip

from cilia.bpf.netns import run_in_netns

KUBE_DNS = "10.212.0.53"
SILENT_DNS = "10.212.0.54"
CLIENTS = {"client": "10.212.0.20", "other": "10.212.0.21"}
BIG = [f"10.213.0.{i}" for i in range(1, 51)]  # big.test answers with 50 addresses
HOSTS = {
    "allowed.example.com": ["10.212.0.100"],
    "api.example.com": ["10.212.0.101"],
    "example.com": ["10.212.0.102"],
    "a.b.example.com": ["10.212.0.105"],
    "denied.test": ["10.212.0.103"],
    "target.test": ["10.212.0.104"],
    "big.test": BIG,
}
CNAMES = [("alias.test", "mid.test"), ("mid.test", "target.test")]  # a chain of two

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: client-dns
spec:
  endpointSelector:
    matchLabels:
      app: client
  egress:
  - toEndpoints:
    - matchLabels:
        k8s-app: kube-dns
    toPorts:
    - ports:
      - port: "53"
        protocol: ANY
      rules:
        dns:
        - matchName: allowed.example.com
        - matchPattern: "*.example.com"
        - matchName: big.test
        - matchName: alias.test
  - toEndpoints:
    - matchLabels:
        role: silent-dns
    toPorts:
    - ports:
      - port: "53"
        protocol: ANY
      rules:
        dns:
        - matchPattern: "*"
"""
LINES = {"allowed.example.com": 19, "*.example.com": 20, "big.test": 21, "alias.test": 22}  # the dns rules


class DnsNode:
    def __init__(self, node: BpfAgentNode, tmp: Path) -> None:
        self.node = node
        self.tmp = tmp
        self.namespaces: dict[str, str] = {}
        self.dnsmasq: subprocess.Popen[bytes] | None = None
        self.log = tmp / "dnsmasq.log"
        self.silent: list[socket.socket] = []

    def netns(self, name: str) -> str:
        return self.namespaces[name]

    def add(self, name: str, address: str, labels: str) -> None:
        netns = f"dnsp-{name}-{self.node.suffix}"
        self.namespaces[name] = netns
        self.node.ok("endpoint", "add", "--name", name, "--labels", labels, "--ip", address, "--create-netns",
                     "--netns", netns)

    def setup(self) -> None:
        self.add("kube-dns", KUBE_DNS, "k8s-app=kube-dns")
        self.add("silent-dns", SILENT_DNS, "role=silent-dns")
        self.add("client", CLIENTS["client"], "app=client")
        self.add("other", CLIENTS["other"], "app=other")
        self.start_dnsmasq()
        self.start_silent()
        policy = self.tmp / "client-dns.yaml"
        policy.write_text(POLICY, encoding="utf-8")
        self.node.import_policy(policy)

    def start_dnsmasq(self) -> None:
        hosts = self.tmp / "hosts"
        hosts.write_text("".join(f"{a} {n}\n" for n, addrs in HOSTS.items() for a in addrs), encoding="ascii")
        args = ["ip", "netns", "exec", self.netns("kube-dns"), "dnsmasq", "--keep-in-foreground",
                "--conf-file=/dev/null", "--no-resolv", "--no-hosts", f"--addn-hosts={hosts}", "--bind-interfaces",
                f"--listen-address={KUBE_DNS}", "--port=53", "--user=root", "--log-queries",
                f"--log-facility={self.log}", f"--pid-file={self.tmp / 'dnsmasq.pid'}", "--local-ttl=300",
                *(f"--cname={a},{b}" for a, b in CNAMES)]
        self.dnsmasq = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # ready when it answers (asked directly, in its own namespace)
            if self.dnsmasq.poll() is not None:
                raise AssertionError(f"dnsmasq exited: {self.dnsmasq.stderr.read() if self.dnsmasq.stderr else ''}")
            try:
                run_in_netns(self.netns("kube-dns"), lambda: dns.query.udp(
                    dns.message.make_query("target.test", "A"), KUBE_DNS, timeout=0.5))
                return
            except (dns.exception.Timeout, OSError):
                time.sleep(0.1)
        raise AssertionError("dnsmasq did not answer")

    def start_silent(self) -> None:
        """A server that takes queries on :53 (UDP and TCP) and never answers."""
        def bind() -> list[socket.socket]:
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((SILENT_DNS, 53))
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind((SILENT_DNS, 53))
            tcp.listen(16)
            return [udp, tcp]

        self.silent = run_in_netns(self.netns("silent-dns"), bind)

    def teardown(self) -> None:
        for s in self.silent:
            s.close()
        if self.dnsmasq is not None:
            self.dnsmasq.terminate()
            try:
                self.dnsmasq.wait(10)
            except subprocess.TimeoutExpired:
                self.dnsmasq.kill()
                self.dnsmasq.wait(10)
            if self.dnsmasq.stderr is not None:
                self.dnsmasq.stderr.close()
        for netns in self.namespaces.values():
            ip("netns", "del", netns, check=False)

    # -- asking ---------------------------------------------------------------------------

    def query(self, client: str, name: str, rdtype: str = "A", server: str = KUBE_DNS, tcp: bool = False,
              timeout: float = 5.0, edns: bool = True) -> dns.message.Message:
        """A query from ``client``'s namespace with dnspython (TC answers returned as they are)."""
        q = dns.message.make_query(name, rdtype, use_edns=0 if edns else False)
        ask = dns.query.tcp if tcp else dns.query.udp

        def go() -> dns.message.Message:
            return ask(q, server, timeout=timeout)

        return run_in_netns(self.netns(client), go)

    def dig(self, client: str, *args: str) -> str:
        res = subprocess.run(["ip", "netns", "exec", self.netns(client), "dig", f"@{KUBE_DNS}", "+tries=1",
                              "+time=5", *args], capture_output=True, text=True, timeout=30)
        return res.stdout

    def server_saw(self, name: str) -> bool:
        """Whether dnsmasq received a query for ``name`` (its query log)."""
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return any("query[" in line and f" {name} from" in line for line in text.splitlines())


def ips(msg: dns.message.Message) -> list[str]:
    return sorted(rd.address for rrset in msg.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset)


def rcode(msg: dns.message.Message) -> str:
    return dns.rcode.to_text(msg.rcode())


@contextmanager
def dns_node(tmp: Path, *agent_args: str) -> Iterator[DnsNode]:
    with bpf_agent(tmp, *agent_args) as node:
        d = DnsNode(node, tmp)
        try:
            d.setup()
            yield d
        finally:
            d.teardown()

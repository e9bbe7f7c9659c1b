"""toFQDNs end to end: a client resolves a name through the agent's DNS proxy (real dnsmasq as
kube-dns, its query redirected in the kernel) and connects to the answer. The proxy releases the
answer only after the agent learned it, so the first connection passes, every time; a name the DNS
rules refuse leaves its address dropped; a CNAME chain's address is learned under the asked name.

The "outside" hosts are namespaces routed through the node (not endpoints) listening on TCP 8080.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.helpers import accept_forever
from tests.dnsproxy.dns_support import DnsNode, dns_node, ips, rcode

from cilia.bpf.netns import Namespace, run_in_netns

PORT = 8080
OUTSIDE = {"api": "10.212.0.101", "denied": "10.212.0.103", "target": "10.212.0.104"}
ROUTER = "10.212.0.1"
TO_FQDNS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-fqdn}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toFQDNs: [{matchName: api.example.com}, {matchName: denied.test}, {matchName: alias.test}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"""


class Outside:
    def __init__(self, suffix: str, node: str) -> None:
        self.namespaces: list[Namespace] = []
        self.sockets: list[socket.socket] = []
        for n, (name, address) in enumerate(sorted(OUTSIDE.items())):
            ns = Namespace(f"fqe-{name}-{suffix}", address, f"fqe{n}{suffix}", node=node)
            self.namespaces.append(ns)
            ns.create(ROUTER)
            self.sockets.append(ns.run_in(lambda a=address: _listen(a)))  # type: ignore[misc]

    def close(self) -> None:
        for s in self.sockets:
            s.close()
        for ns in self.namespaces:
            ns.delete()


def _listen(address: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((address, PORT))
    sock.listen(256)
    accept_forever(sock)
    return sock


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsNode]:
    tmp = tmp_path_factory.mktemp("dnsfqdn")
    with dns_node(tmp) as d:
        outside = Outside(d.node.suffix, d.node.node)
        try:
            policy = tmp / "client-fqdn.yaml"
            policy.write_text(TO_FQDNS, encoding="utf-8")
            d.node.import_policy(policy)
            yield d
        finally:
            outside.close()


def reaches(d: DnsNode, address: str, timeout: float = 1.0) -> bool:
    """One TCP connection attempt from the client: True if it connected (no retry)."""
    def go() -> bool:
        try:
            socket.create_connection((address, PORT), timeout=timeout).close()
            return True
        except TimeoutError:
            return False

    return run_in_netns(d.netns("client"), go)


def test_resolve_then_connect_first_try_100_times(node: DnsNode) -> None:
    assert not reaches(node, OUTSIDE["api"])  # not learned yet: dropped in the kernel
    for i in range(100):
        node.node.ok("fqdn", "cache", "clean")  # forget it: the next answer must be learned anew
        answer = node.query("client", "api.example.com")
        assert rcode(answer) == "NOERROR" and ips(answer) == [OUTSIDE["api"]]
        assert reaches(node, OUTSIDE["api"]), f"round {i}: the first connection after the answer was dropped"
    listed = node.node.ok("fqdn", "cache", "list", "-o", "json").json()["entries"]
    assert [(e["name"], e["endpoint"], e["selected"]) for e in listed] == [("api.example.com", "client", True)]


def test_refused_name_stays_dropped(node: DnsNode) -> None:
    answer = node.query("client", "denied.test")
    assert rcode(answer) == "REFUSED"
    assert not reaches(node, OUTSIDE["denied"])  # toFQDNs names it, but it was never learned


def test_cname_chain_learned_under_the_asked_name(node: DnsNode) -> None:
    answer = node.query("client", "alias.test")
    assert rcode(answer) == "NOERROR" and OUTSIDE["target"] in ips(answer)
    assert reaches(node, OUTSIDE["target"])
    names = [e["name"] for e in node.node.ok("fqdn", "cache", "list", "-o", "json").json()["entries"]]
    assert "alias.test" in names and "target.test" not in names


def test_trace_a_learned_name_live(node: DnsNode) -> None:
    node.query("client", "api.example.com")
    traced = node.node.cilia("policy", "trace", "--from-endpoint", "client", "--dst-fqdn", "api.example.com",
                             "--dport", str(PORT))
    assert traced.code == 0 and "client-fqdn.yaml:" in traced.out
    dns = node.node.cilia("policy", "trace", "--from-endpoint", "client", "--to-endpoint", "kube-dns",
                          "--protocol", "udp", "--dport", "53", "--dns-query", "denied.test")
    assert dns.code == 1 and "denied" in dns.out.lower()


def test_a_restarted_agent_keeps_learned_names(node: DnsNode, tmp_path: Path) -> None:
    node.query("client", "api.example.com")
    node.node.agent.stop()
    node.node.agent.start(timeout=60)
    assert reaches(node, OUTSIDE["api"])
    names = [e["name"] for e in node.node.ok("fqdn", "cache", "list", "-o", "json").json()["entries"]]
    assert "api.example.com" in names

"""The DNS proxy end to end: a real dnsmasq as kube-dns, clients in endpoint namespaces (dnspython,
dig, raw sockets), their DNS redirected in the kernel (UDP and TCP) to the agent's DNS proxy.

One agent node serves the module (it takes ~20 s to set up); each test asks its own names.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest
from tests.agent.agent_support import simple

from cilia.agent.client import AgentClient

from cilia.bpf.netns import run_in_netns
from cilia.dnsproxy import wire

from .dns_support import BIG, KUBE_DNS, LINES, SILENT_DNS, DnsNode, dns_node, ips, rcode


PROXY_PORT = 10053  # the node is a namespace of its own: the port is free there


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsNode]:
    with dns_node(tmp_path_factory.mktemp("dnsp"), "--tofqdns-proxy-port", str(PROXY_PORT),
                  "--dns-proxy-upstream-timeout", "1") as d:
        yield d


def dns_flows(d: DnsNode, query: str | None = None) -> list[dict[str, Any]]:
    out = d.node.ok("observe", "--last", "10000", "-o", "json").out
    flows = [simple(json.loads(line)) for line in out.splitlines()]
    return [f for f in flows if f["kind"] == "dns" and (query is None or f["l7"].get("query") == query)]


def metrics(d: DnsNode) -> str:
    client = AgentClient(d.node.state_dir / "cilia.sock")
    try:
        return client.metrics()
    finally:
        client.close()


def send_junk(packet: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(packet, (KUBE_DNS, 53))


def proxy_stats(d: DnsNode) -> dict[str, Any]:
    stats: dict[str, Any] = d.node.ok("status", "-o", "json").json()["datapath"]["dns_proxy"]
    return stats


def test_allowed_name_answered_denied_refused_never_forwarded(node: DnsNode) -> None:
    answer = node.query("client", "allowed.example.com")
    assert rcode(answer) == "NOERROR" and ips(answer) == ["10.212.0.100"]
    q = dns.message.make_query("denied.test", "A")
    refused = run_in_netns(node.netns("client"), lambda: dns.query.udp(q, KUBE_DNS, timeout=5))
    assert rcode(refused) == "REFUSED"
    assert refused.id == q.id and refused.question == q.question and not refused.answer
    assert "status: REFUSED" in node.dig("client", "denied.test")
    assert node.server_saw("allowed.example.com") and not node.server_saw("denied.test")
    # the kernel sends UDP and TCP 53 to the DNS proxy's port, not to an Envoy listener
    status = node.node.ok("status", "-o", "json").json()
    port = status["datapath"]["dns_proxy"]["port"]
    assert port == PROXY_PORT  # --tofqdns-proxy-port
    assert status["datapath"]["proxy_ports"] == {}  # Envoy got no listener for port 53
    rows = node.node.ok("bpf", "policy", "get", "client", "-o", "json").json()["entries"]
    redirects = sorted(e["port"] for e in rows if e["verdict"] == "redirect")  # kube-dns and silent-dns
    assert redirects == ["53/TCP", "53/TCP", "53/UDP", "53/UDP"] and all(e.get("proxy_port") == port for e in rows
                                                     if e["verdict"] == "redirect")
    allowed = dns_flows(node, "allowed.example.com")[-1]
    assert allowed["verdict"] == "FORWARDED" and allowed["endpoint"] == "client"
    assert f"client-dns.yaml:{LINES['allowed.example.com']})" in allowed["rule"]
    assert allowed["l7"]["ips"] == ["10.212.0.100"] and allowed["l7"]["rcode"] == "NOERROR"
    assert allowed["source"]["address"] == "10.212.0.20" and allowed["destination"]["address"] == KUBE_DNS
    denied = dns_flows(node, "denied.test")[-1]
    assert denied["verdict"] == "DROPPED" and denied["rule"].startswith("default deny")
    assert denied["l7"]["rcode"] == "Refused"
    only_dns = node.node.ok("observe", "--last", "10000", "--protocol", "dns", "-o", "json").out.splitlines()
    assert only_dns and all(json.loads(line)["flow"]["l7"]["dns"] for line in only_dns)  # Hubble's l7.dns


def test_other_endpoints_dns_is_not_redirected(node: DnsNode) -> None:
    before = len(dns_flows(node))
    answer = node.query("other", "denied.test")  # "other" has no dns rules: straight to dnsmasq
    assert rcode(answer) == "NOERROR" and ips(answer) == ["10.212.0.103"]
    assert node.server_saw("denied.test") and len(dns_flows(node)) == before


def test_match_pattern_star_is_one_label(node: DnsNode) -> None:
    assert ips(node.query("client", "api.example.com")) == ["10.212.0.101"]
    assert ips(node.query("client", "API.Example.COM.")) == ["10.212.0.101"]  # case does not matter
    assert rcode(node.query("client", "example.com")) == "REFUSED"
    assert rcode(node.query("client", "a.b.example.com")) == "REFUSED"
    assert not node.server_saw("example.com") and not node.server_saw("a.b.example.com")
    api = dns_flows(node, "api.example.com")[-1]
    assert f"client-dns.yaml:{LINES['*.example.com']})" in api["rule"]


def test_tcp_several_queries_on_one_connection(node: DnsNode) -> None:
    names = ["allowed.example.com", "denied.test", "api.example.com", "big.test"]
    queries = [dns.message.make_query(n, "A", id=1000 + i) for i, n in enumerate(names)]

    def ask() -> list[dns.message.Message]:
        with socket.create_connection((KUBE_DNS, 53), timeout=5) as s:
            s.sendall(b"".join(wire.frame(q.to_wire()) for q in queries))  # pipelined, in one write
            framer, out = wire.Framer(), []
            while len(out) < len(queries):
                data = s.recv(65536)
                assert data, "the proxy closed the connection"
                out += framer.feed(data)
            return [dns.message.from_wire(m) for m in out]

    answers = run_in_netns(node.netns("client"), ask)
    assert [a.id for a in answers] == [1000, 1001, 1002, 1003]
    assert [rcode(a) for a in answers] == ["NOERROR", "REFUSED", "NOERROR", "NOERROR"]
    assert ips(answers[0]) == ["10.212.0.100"] and sorted(ips(answers[3])) == sorted(BIG)
    assert "status: REFUSED" in node.dig("client", "+tcp", "denied.test")
    tcp_flow = dns_flows(node, "api.example.com")[-1]
    assert tcp_flow["verdict"] == "FORWARDED" and tcp_flow["source"]["address"] == "10.212.0.20"


def test_fifty_addresses_and_truncation_passed_through(node: DnsNode) -> None:
    big = node.query("client", "big.test", edns=True)  # EDNS0: 1232+ bytes fit
    assert sorted(ips(big)) == sorted(BIG) and not big.flags & dns.flags.TC
    small = node.query("client", "big.test", edns=False)  # 512 bytes: the server truncates
    assert small.flags & dns.flags.TC, "the TC answer must reach the client unchanged"
    assert sorted(ips(node.query("client", "big.test", tcp=True))) == sorted(BIG)
    dig = node.dig("client", "+noedns", "+ignore", "big.test")
    assert " tc" in dig.split("flags:")[1].split(";")[0]
    answered = [len(f["l7"].get("ips", ())) for f in dns_flows(node, "big.test")]
    assert 50 in answered and any(0 < n < 50 for n in answered)  # whole (EDNS0, TCP) and truncated


def test_cname_chain_judged_by_the_question(node: DnsNode) -> None:
    answer = node.query("client", "alias.test")
    assert rcode(answer) == "NOERROR" and ips(answer) == ["10.212.0.104"]
    assert [rrset.rdtype for rrset in answer.answer][:2] == [dns.rdatatype.CNAME, dns.rdatatype.CNAME]
    flow = dns_flows(node, "alias.test")[-1]
    assert flow["l7"]["ips"] == ["10.212.0.104"] and flow["l7"]["cnames"] == ["mid.test", "target.test"]
    assert rcode(node.query("client", "target.test")) == "REFUSED"  # the chain's end is not a rule's name


def test_silent_upstream_gives_servfail(node: DnsNode) -> None:
    answer = node.query("client", "anything.test", server=SILENT_DNS, timeout=10)
    assert rcode(answer) == "SERVFAIL"
    answer = node.query("client", "anything-tcp.test", server=SILENT_DNS, tcp=True, timeout=10)
    assert rcode(answer) == "SERVFAIL"
    flow = dns_flows(node, "anything.test")[-1]
    assert flow["verdict"] == "ERROR" and flow["l7"]["rcode"] == "ServFail"
    assert flow["drop_reason"] == "no answer from the server"


def test_malformed_packets_dropped_and_counted(node: DnsNode) -> None:
    before = proxy_stats(node).get("malformed", 0)
    good = dns.message.make_query("allowed.example.com", "A").to_wire()
    response = dns.message.make_response(dns.message.make_query("denied.test", "A")).to_wire()
    loop = good[:12] + b"\xc0\x0c" + good[-4:]  # the question's name points at itself
    bad = [b"", b"\x00", b"garbage that is no DNS message", good[:15], response, loop,
           struct.pack("!6H", 7, 0, 2, 0, 0, 0) + good[12:] + good[12:]]  # two questions

    def send_all() -> dns.message.Message:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((KUBE_DNS, 53))
            s.settimeout(5)
            for packet in bad:
                s.send(packet)
            s.send(good)  # after the bad ones on the same path: its answer comes after their drops
            return dns.message.from_wire(s.recv(65536))  # the one answer is the good query's

    answer = run_in_netns(node.netns("client"), send_all)
    assert ips(answer) == ["10.212.0.100"]
    assert proxy_stats(node)["malformed"] - before == len(bad)  # an empty datagram too
    errors = [f for f in dns_flows(node) if f["verdict"] == "ERROR" and "malformed" in f["drop_reason"]]
    assert len(errors) >= len(bad)
    text = metrics(node)
    assert f'cilia_policy_l7_total{{proxy_type="dns",rule="parse_errors"}} {float(len(bad))}' in text


def test_metrics_count_verdicts(node: DnsNode) -> None:
    node.query("client", "allowed.example.com")
    node.query("client", "denied.test")
    run_in_netns(node.netns("client"), lambda: send_junk(b"junk"))
    node.query("client", "allowed.example.com")  # after the junk: it has been counted
    text = metrics(node)
    for verdict in ("forwarded", "denied", "error"):
        assert f'cilia_dns_proxy_requests_total{{verdict="{verdict}"}}' in text
    assert 'cilia_dns_proxy_latency_seconds_bucket{le="0.001",verdict="forwarded"}' in text
    assert 'cilia_hubble_dns_responses_total{ips_returned="1",qtypes="A",rcode="NOERROR"}' in text


OTHER_DNS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: other-dns
spec:
  endpointSelector:
    matchLabels:
      app: other
  egress:
  - toEndpoints:
    - matchLabels:
        k8s-app: kube-dns
    toPorts:
    - ports:
      - port: "53"
        protocol: UDP
      rules:
        dns:
        - matchName: allowed.example.com
"""


def test_an_established_udp_flow_moves_to_the_proxy_when_a_dns_rule_comes(node: DnsNode) -> None:
    def ask(s: socket.socket, name: str) -> dns.message.Message:
        s.send(dns.message.make_query(name, "A").to_wire())
        return dns.message.from_wire(s.recv(65535))

    sock = run_in_netns(node.netns("other"), lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    try:
        sock.settimeout(5)
        sock.connect((KUBE_DNS, 53))  # one flow (one source port) for every query below
        assert rcode(ask(sock, "denied.test")) == "NOERROR"  # no policy yet: straight to dnsmasq
        path = node.tmp / "other-dns.yaml"
        path.write_text(OTHER_DNS, encoding="utf-8")
        node.node.import_policy(path)
        assert rcode(ask(sock, "denied.test")) == "REFUSED"  # the same flow, now through the proxy
        assert ips(ask(sock, "allowed.example.com")) == ["10.212.0.100"]
    finally:
        sock.close()
        node.node.ok("policy", "delete", "other-dns")


def test_an_idle_tcp_client_is_closed(node: DnsNode) -> None:
    def idle() -> bytes:
        with socket.create_connection((KUBE_DNS, 53), timeout=30) as s:
            s.sendall(wire.frame(dns.message.make_query("allowed.example.com", "A").to_wire()))
            framer, got = wire.Framer(), []
            while not got:
                got = framer.feed(s.recv(65536))
            assert ips(dns.message.from_wire(got[0])) == ["10.212.0.100"]
            return s.recv(100)  # then nothing more is sent: the proxy closes after its idle time

    assert run_in_netns(node.netns("client"), idle) == b""
    assert proxy_stats(node)["tcp_idle_closed"] >= 1


CLIENT_MORE_DNS = OTHER_DNS.replace("other-dns", "client-more-dns").replace("app: other", "app: client").replace(
    "allowed.example.com", "denied.test")


def test_a_new_revision_changes_a_repeated_names_verdict(node: DnsNode) -> None:
    """Verdicts are memoized per policy snapshot: the same query judged again under a new
    revision gets the new revision's answer, both ways."""
    q = dns.message.make_query("denied.test", "A")

    def ask() -> str:
        return rcode(run_in_netns(node.netns("client"), lambda: dns.query.udp(q, KUBE_DNS, timeout=5)))

    assert ask() == "REFUSED" and ask() == "REFUSED"
    path = node.tmp / "client-more-dns.yaml"
    path.write_text(CLIENT_MORE_DNS, encoding="utf-8")
    node.node.import_policy(path)
    try:
        assert ask() == "NOERROR"
    finally:
        node.node.ok("policy", "delete", "client-more-dns")
    assert ask() == "REFUSED"


def test_repeated_queries_go_through_the_fast_lane_each_answered_and_recorded(node: DnsNode) -> None:
    """The same question again (a new id each time, from new source ports) is passed on by the
    compiled lane (cilia/dnsproxy/lane.c), not by Python: each answer carries its query's id, each
    refusal too, and each query is one flow like the one Python recorded for the first."""
    before, flows_before = proxy_stats(node), len(dns_flows(node))
    assert before["fast_lane"] == 1  # setup built it (make test / make demo run setup)
    allowed = [dns.message.make_query("api.example.com", "A") for _ in range(30)]
    denied = [dns.message.make_query("denied.test", "A") for _ in range(10)]

    def ask_all() -> list[dns.message.Message]:
        return [dns.query.udp(q, KUBE_DNS, timeout=5) for q in allowed + denied]

    answers = run_in_netns(node.netns("client"), ask_all)
    for q, a in zip(allowed + denied, answers, strict=True):
        assert a.id == q.id and a.question == q.question
    assert all(ips(a) == ["10.212.0.101"] for a in answers[:30])
    assert all(rcode(a) == "REFUSED" and not a.answer for a in answers[30:])
    after = proxy_stats(node)
    # all but the first of each went by the lane (the first allowed one's answer may be released by
    # Python up to twice: a repeat of it is let go by the lane only once Python has released one)
    assert after["lane_forwarded"] - before["lane_forwarded"] >= 28
    assert after["lane_released"] - before["lane_released"] >= 27
    assert after["lane_refused"] - before["lane_refused"] >= 9
    flows = dns_flows(node)[flows_before:]
    assert len(flows) == 40
    first, rest = flows[0], flows[1:30]
    assert all(f["verdict"] == "FORWARDED" and f["rule"] == first["rule"] and f["l7"] == first["l7"]
               and f["source"]["address"] == first["source"]["address"] == "10.212.0.20"
               and f["destination"] == first["destination"] and f["endpoint"] == "client" for f in rest)
    assert f"client-dns.yaml:{LINES['*.example.com']})" in first["rule"]
    refusals = flows[30:]
    assert all(f["verdict"] == "DROPPED" and f["l7"]["rcode"] == "Refused" and f["rule"] == refusals[0]["rule"]
               for f in refusals)


def test_the_lane_times_out_a_silent_servers_queries_as_python_does(node: DnsNode) -> None:
    before = proxy_stats(node)
    q = dns.message.make_query("again.test", "A")
    for _ in range(2):  # the second through the lane (the route is made by the first)
        q.id = (q.id + 1) & 0xFFFF
        answer = run_in_netns(node.netns("client"), lambda: dns.query.udp(q, SILENT_DNS, timeout=10))
        assert rcode(answer) == "SERVFAIL" and answer.id == q.id
    assert proxy_stats(node)["lane_forwarded"] > before["lane_forwarded"]
    flows = dns_flows(node, "again.test")[-2:]
    assert [f["drop_reason"] for f in flows] == ["no answer from the server"] * 2

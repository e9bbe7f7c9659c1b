"""The proxy's handling of one query over real sockets, without the kernel's redirect: a real UDP
server on loopback records every datagram the proxy forwards to it and answers. Hypothesis feeds
the proxy malformed, truncated and looping packets among good ones: nothing that failed to parse
is ever forwarded, and nothing crashes.

The policy here is a test double (``AllowAll``: every name allowed for one endpoint), named as
such; the real policy decisions are tested end to end in test_dns_proxy_bpf.py.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator, Sequence

import dns.message
import dns.rcode
import dns.rrset
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cilia.dnsproxy import wire
from cilia.dnsproxy.policy import DNSEndpoint, DNSPolicy, Judgement
from cilia.dnsproxy.server import DNSProxy, DNSRecord
from cilia.l7parsers.base import Decision
from cilia.policy.mapstate import DirectionMapState
from cilia.policy.model import Direction, Protocol

from .test_wire import VALID, mutated

CLIENT = ("127.0.0.1", 40000)
NO_RULES = DirectionMapState(Direction.EGRESS, False, {}, {})


class AllowAll(DNSPolicy):
    """Test double: every query of the one endpoint is allowed (by a rule named "allow-all")."""

    def judge(self, source: str, server: str, port: int, protocol: Protocol, name: str) -> Judgement:
        return Judgement(DNSEndpoint("client", 300, NO_RULES), 2, Decision(True, "allow-all"))


class Recorder:
    """A real DNS server on loopback for what the proxy forwards: records each datagram and
    answers every one that parses with one A record (and ignores the rest)."""

    def __init__(self, silent: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        self.received: list[bytes] = []
        self.silent = silent
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            self.received.append(data)
            if self.silent:
                continue
            try:
                resp = dns.message.make_response(dns.message.from_wire(data))
            except Exception:  # noqa: BLE001 (a server ignores what it cannot read)
                continue
            resp.answer.append(dns.rrset.from_text(resp.question[0].name, 30, "IN", "A", "192.0.2.7"))
            self.sock.sendto(resp.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


def make_proxy(learned: list[tuple[str, str, Sequence[str], int]], records: list[DNSRecord],
               timeout: float = 2.0) -> DNSProxy:
    proxy = DNSProxy(learn=lambda *a: learned.append(a), record=records.extend, upstream_timeout=timeout,
                     egress_mark=0)
    proxy.policy = AllowAll()
    return proxy


def test_allowed_query_forwarded_learned_then_released(upstream: Recorder) -> None:
    learned: list[tuple[str, str, Sequence[str], int]] = []
    records: list[DNSRecord] = []
    proxy = make_proxy(learned, records)
    out = asyncio.run(proxy.handle(VALID[0], CLIENT, upstream.address, Protocol.UDP))
    proxy.stop()
    assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.NOERROR
    assert upstream.received[-1] == VALID[0]
    assert learned == [("client", "api.example.com", ("192.0.2.7",), 30)]
    assert records[-1].verdict == "forwarded" and records[-1].ips == ("192.0.2.7",) and records[-1].rule == "allow-all"


def test_a_failing_learner_turns_the_answer_into_servfail(upstream: Recorder) -> None:
    def refuse(*_args: object) -> None:
        raise RuntimeError("the BPF map is full")

    proxy = DNSProxy(learn=refuse, egress_mark=0)
    proxy.policy = AllowAll()
    out = asyncio.run(proxy.handle(VALID[0], CLIENT, upstream.address, Protocol.UDP))
    proxy.stop()
    assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.SERVFAIL


def test_silent_upstream_gives_servfail() -> None:
    silent = Recorder(silent=True)
    try:
        records: list[DNSRecord] = []
        proxy = make_proxy([], records, timeout=0.3)
        out = asyncio.run(proxy.handle(VALID[0], CLIENT, silent.address, Protocol.UDP))
        proxy.stop()
        assert out is not None and dns.message.from_wire(out).rcode() == dns.rcode.SERVFAIL
        assert silent.received == [VALID[0]] and records[-1].reason == "no answer from the server"
    finally:
        silent.close()


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=300), mutated(), st.sampled_from(VALID)), min_size=1, max_size=5))
def test_fuzz_nothing_that_failed_to_parse_is_forwarded(upstream: Recorder, packets: list[bytes]) -> None:
    records: list[DNSRecord] = []
    proxy = make_proxy([], records, timeout=1.0)

    async def feed() -> list[bytes | None]:
        return [await proxy.handle(p, CLIENT, upstream.address, Protocol.UDP) for p in packets]

    before = len(upstream.received)
    answers = asyncio.run(feed())
    proxy.stop()
    parsed = []
    for packet, answer in zip(packets, answers):
        try:
            wire.parse_query(packet)
        except wire.Malformed:
            assert answer is None  # dropped: no answer, nothing forwarded
            continue
        parsed.append(packet)
        assert answer is not None
    assert upstream.received[before:] == parsed  # exactly the packets that parsed, unchanged
    assert proxy.stats["malformed"] == len(packets) - len(parsed)


def test_a_query_addressed_to_the_proxy_itself_is_dropped_not_looped() -> None:
    """Without the kernel's redirect the original destination is the proxy's own port: forwarding
    there would loop back into the proxy."""
    records: list[DNSRecord] = []
    proxy = make_proxy([], records)
    proxy.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(VALID[0], ("127.0.0.1", proxy.port))
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as tcp:
            tcp.sendall(wire.frame(VALID[0]))
            try:
                assert tcp.recv(100) == b""  # closed without an answer
            except ConnectionResetError:
                pass  # closed with the query unread: a reset, also without an answer
        deadline = time.monotonic() + 10
        while proxy.stats["malformed"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proxy.stats["malformed"] == 2 and proxy.stats["forwarded"] == 0
        assert all(r.reason == "malformed: addressed to the DNS proxy itself" for r in records)
    finally:
        proxy.stop()

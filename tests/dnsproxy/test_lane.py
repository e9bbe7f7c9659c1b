"""The fast lane (cilia/dnsproxy/lane.c) on its own, over real loopback sockets: what it passes on,
what it hands to Python whole, the ids it sends upstream and gives back, expiry and socket errors.
Hypothesis feeds it arbitrary datagrams beside one route: only the route's exact bytes (any id) are
ever forwarded; everything else reaches Python unchanged, in order.

The lane is built by setup (scripts/setup.sh); tests build it into a temporary directory if the
venv's is missing, so they never skip.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cilia.dnsproxy import lane as lane_module

IP_RECVORIGDSTADDR = 20
QUERY = bytes.fromhex("1234 0100 0001 0000 0000 0000") + b"\x07example\x03com\x00\x00\x01\x00\x01"


@pytest.fixture(scope="module")
def module(tmp_path_factory: pytest.TempPathFactory) -> Any:
    loaded = lane_module.load()
    if loaded is None:
        loaded = lane_module.load(lane_module.build(Path(tmp_path_factory.mktemp("lane"))).parent)
    assert loaded is not None
    return loaded


class Rig:
    """An inbound socket (as the proxy's), an upstream server that echoes each query back as its
    answer (QR set), a client, and the lane's tables."""

    def __init__(self, module: Any, timeout: float = 5.0) -> None:
        self.inbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.inbound.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        self.inbound.bind(("127.0.0.1", 0))
        self.inbound.setblocking(False)
        self.server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.settimeout(2)
        self.client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.client.bind(("127.0.0.1", 0))
        self.client.settimeout(2)
        self.reply = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the proxy's reply socket
        self.upstream = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.upstream.connect(self.server.getsockname())
        self.upstream.setblocking(False)
        self.routes: dict[bytes, Any] = {}
        self.released: dict[bytes, Any] = {}
        self.lane = module.Lane(self.inbound.fileno(), self.routes, self.released, timeout, 100)
        self.channel = self.lane.add_channel(self.upstream.fileno())

    @property
    def proxy(self) -> tuple[str, int]:
        return self.inbound.getsockname()  # type: ignore[no-any-return]

    def key(self, query: bytes) -> bytes:
        port = self.proxy[1]
        return socket.inet_aton("127.0.0.1") * 2 + port.to_bytes(2, "big") + query[2:]

    def route(self, query: bytes, route_id: int = 7, refused: bytes | None = None) -> None:
        self.routes[self.key(query)] = (self.channel, self.reply.fileno(), route_id, refused, f"route-{route_id}")

    def pump(self, wait: float = 1.0) -> tuple[list[Any], list[Any]]:
        select.select([self.lane.fileno()], [], [], wait)
        return self.lane.pump()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.lane.close()
        for s in (self.inbound, self.server, self.client, self.reply, self.upstream):
            s.close()


@pytest.fixture
def rig(module: Any) -> Iterator[Rig]:
    r = Rig(module)
    yield r
    r.close()


def answer_of(query: bytes) -> bytes:
    return query[:2] + bytes([query[2] | 0x80]) + query[3:]


def test_an_unknown_query_goes_to_python_whole(rig: Rig) -> None:
    rig.client.sendto(QUERY, rig.proxy)
    slow, done = rig.pump()
    assert slow == [("query", QUERY, rig.client.getsockname(), rig.proxy, False)] and done == []


def test_a_routed_query_goes_upstream_under_another_id_and_its_answer_comes_back_with_its_own(rig: Rig) -> None:
    rig.route(QUERY)
    rig.client.sendto(QUERY, rig.proxy)
    assert rig.pump() == ([], [])
    sent, peer = rig.server.recvfrom(512)
    assert sent[2:] == QUERY[2:]
    rig.server.sendto(answer_of(sent), peer)
    slow, done = rig.pump()  # not released before: Python reads it, with the client's id back in it
    assert len(slow) == 1 and done == []
    kind, query, answer, client, server, *_times, info = slow[0]
    assert (kind, query, answer, client, server, info) == (
        "answer", QUERY, answer_of(QUERY), rig.client.getsockname(), rig.proxy, "route-7")
    # released: the next one like it goes back from the lane itself
    rig.released[(7).to_bytes(4, "big") + answer_of(QUERY)[2:]] = (time.monotonic() + 5, "answer-info")
    again = b"\x99\x99" + QUERY[2:]
    rig.client.sendto(again, rig.proxy)
    rig.pump()
    sent, peer = rig.server.recvfrom(512)
    rig.server.sendto(answer_of(sent), peer)
    slow, done = rig.pump()
    assert slow == [] and rig.client.recv(512) == answer_of(again)
    assert [(d[0], d[2], d[3], d[4]) for d in done] == [("released", rig.client.getsockname(), "route-7",
                                                         "answer-info")]
    assert rig.lane.stats()["released"] == 1 and rig.lane.stats()["in_flight"] == 0


def test_a_released_answer_past_its_deadline_goes_to_python(rig: Rig) -> None:
    rig.route(QUERY)
    rig.released[(7).to_bytes(4, "big") + answer_of(QUERY)[2:]] = (time.monotonic() - 1, "stale")
    rig.client.sendto(QUERY, rig.proxy)
    rig.pump()
    sent, peer = rig.server.recvfrom(512)
    rig.server.sendto(answer_of(sent), peer)
    slow, done = rig.pump()
    assert [s[0] for s in slow] == ["answer"] and done == []


def test_a_refused_route_answers_from_the_lane_with_the_querys_id(rig: Rig) -> None:
    refused_tail = b"\x81\x05" + QUERY[4:]
    rig.route(QUERY, refused=refused_tail)
    rig.client.sendto(b"\xab\xcd" + QUERY[2:], rig.proxy)
    slow, done = rig.pump()
    assert slow == [] and [d[0] for d in done] == ["refused"]
    assert rig.client.recv(512) == b"\xab\xcd" + refused_tail
    rig.server.settimeout(0.2)
    with pytest.raises(TimeoutError):
        rig.server.recv(512)  # never forwarded


def test_unanswered_queries_expire_and_socket_errors_fail_theirs(module: Any) -> None:
    rig = Rig(module, timeout=0.2)
    try:
        rig.route(QUERY)
        rig.client.sendto(QUERY, rig.proxy)
        rig.pump()
        assert rig.lane.expire() == []
        time.sleep(0.3)
        (expired,) = rig.lane.expire()
        assert expired[0] == QUERY and expired[1] == rig.client.getsockname() and expired[-1] == "route-7"
        rig.server.close()  # nobody there: the next send draws an ICMP error on the upstream socket
        rig.client.sendto(QUERY, rig.proxy)
        slow: list[Any] = []
        deadline = time.monotonic() + 2
        while not slow and time.monotonic() < deadline:
            slow = rig.pump(0.2)[0]
        assert [s[0] for s in slow] == ["failed"] and slow[0][1] == QUERY
    finally:
        rig.close()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.binary(min_size=2, max_size=2).map(lambda i: i + QUERY[2:])),
                min_size=1, max_size=6))
def test_fuzz_only_the_routes_bytes_are_forwarded_the_rest_reach_python_unchanged(module: Any,
                                                                                  datagrams: list[bytes]) -> None:
    rig = Rig(module)
    try:
        rig.route(QUERY)
        for d in datagrams:
            rig.client.sendto(d, rig.proxy)
        slow: list[Any] = []
        deadline = time.monotonic() + 2
        while len(slow) + rig.lane.stats()["forwarded"] < len(datagrams) and time.monotonic() < deadline:
            slow += rig.pump(0.05)[0]
        routed = [d for d in datagrams if d[2:] == QUERY[2:]]
        assert [s[1] for s in slow] == [d for d in datagrams if d[2:] != QUERY[2:]]
        assert rig.lane.stats()["forwarded"] == len(routed)
        for _ in routed:
            assert rig.server.recv(512)[2:] == QUERY[2:]
    finally:
        rig.close()

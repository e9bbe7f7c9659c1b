"""The DNS proxy's upstream UDP sockets over real loopback servers: queries with one id go on
different sockets, each answer reaches its own query, a late answer after a timeout never
answers a later query with the same id, and a closed port fails the query."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator

import pytest

from cilia.dnsproxy.upstream import UdpUpstreams

Outcome = tuple[bytes | None, BaseException | None]


class EchoServer:
    """A real UDP server: answers each datagram with itself plus the sender's port, at once or,
    for payloads starting with a key of ``DELAYS``, that many seconds later."""

    DELAYS = {b"slow": 1.5, b"mid": 0.8}

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(65535)
            except OSError:
                return
            answer = data + b"|" + str(peer[1]).encode()
            delay = next((d for key, d in self.DELAYS.items() if data[2:].startswith(key)), 0.0)
            if delay:
                threading.Timer(delay, self._send, (answer, peer)).start()
            else:
                self._send(answer, peer)

    def _send(self, answer: bytes, peer: tuple[str, int]) -> None:
        try:
            self.sock.sendto(answer, peer)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server() -> Iterator[EchoServer]:
    s = EchoServer()
    yield s
    s.close()


def ask_all(queries: list[tuple[bytes, tuple[str, int]]], timeout: float) -> list[Outcome]:
    """Send every query at once on one ``UdpUpstreams``; each one's outcome, in order."""
    async def go() -> list[Outcome]:
        loop = asyncio.get_running_loop()
        up = UdpUpstreams(loop, timeout)
        futures: list[asyncio.Future[Outcome]] = []
        for query, server in queries:
            fut: asyncio.Future[Outcome] = loop.create_future()
            futures.append(fut)
            up.ask(query, server, 0, lambda a, e, f=fut: f.done() or f.set_result((a, e)))  # type: ignore[misc]
        try:
            return list(await asyncio.gather(*futures))
        finally:
            up.close()

    return asyncio.run(go())


def test_same_id_in_flight_goes_on_two_sockets_each_gets_its_answer(server: EchoServer) -> None:
    a, b = ask_all([(b"\x12\x34first", server.address), (b"\x12\x34second", server.address)], 2.0)
    assert a[0] is not None and a[0].startswith(b"\x12\x34first|")
    assert b[0] is not None and b[0].startswith(b"\x12\x34second|")
    assert a[0].split(b"|")[1] != b[0].split(b"|")[1]  # from two source ports


def test_late_answer_never_answers_a_later_query_with_the_same_id(server: EchoServer) -> None:
    async def go() -> tuple[Outcome, Outcome]:
        loop = asyncio.get_running_loop()
        up = UdpUpstreams(loop, 1.0)
        first: asyncio.Future[Outcome] = loop.create_future()
        up.ask(b"\x00\x07slow", server.address, 0, lambda a, e: first.set_result((a, e)))
        timed_out = await first  # at 1 s; its answer comes at 1.5 s
        second: asyncio.Future[Outcome] = loop.create_future()
        up.ask(b"\x00\x07mid", server.address, 0, lambda a, e: second.done() or second.set_result((a, e)))
        try:
            return timed_out, await second  # answered at 1.8 s: the first's late answer came meanwhile
        finally:
            up.close()

    timed_out, second = asyncio.run(go())
    assert timed_out[0] is None and isinstance(timed_out[1], TimeoutError)
    assert second[0] is not None and second[0].startswith(b"\x00\x07mid|")


def test_closed_port_fails_the_query() -> None:
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()  # nobody listens there now: ICMP port unreachable
    [(answer, error)] = ask_all([(b"\x00\x01query", address)], 2.0)
    assert answer is None and isinstance(error, OSError) and not isinstance(error, TimeoutError)

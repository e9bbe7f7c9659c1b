"""The memcache parser between real clients and a real memcached 1.6 (``-B auto``), through the
test relay, fed whole and one byte at a time, under Cilium's memcached example policy.

What each client raises on a denial: pymemcache (text) raises ``MemcacheClientError`` with
``b"access denied"`` (and then closes its socket; the next call reconnects); bmemcached
(binary) raises ``MemcachedException`` with ``code == 8`` and keeps its socket.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import bmemcached
import pytest
from bmemcached.exceptions import MemcachedException
from tests.l7parsers.memcache_support import ALLOW_ALL, binary_request, example_check, memcached
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError
from tests.l7parsers.relay import Relay

from cilia.l7parsers.base import Check
from cilia.l7parsers.memcache import MemcacheConnection
from cilia.l7parsers.memcache_text import DENIED

A_WING = example_check("app=a-wing")
FLEET = example_check("name=fleet-tracker")


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with memcached() as p:
        yield p


@pytest.fixture(params=[0, 1], ids=["whole", "byte-by-byte"])
def chunk(request: pytest.FixtureRequest) -> int:
    value: int = request.param
    return value


@pytest.fixture
def direct(port: int) -> Iterator[Client]:
    """A client straight to memcached, to seed data and to see what the parser let through."""
    client = Client(("127.0.0.1", port), default_noreply=False, timeout=5)
    client.set("awing-coord", b"1,2")
    client.set("xwing-coord", b"3,4")
    yield client
    client.close()


@contextmanager
def relay(port: int, check: Check, chunk: int) -> Iterator[Relay]:
    with Relay(("127.0.0.1", port), lambda: MemcacheConnection(check), chunk=chunk) as r:
        yield r
        assert r.errors == []


@contextmanager
def text_client(address: tuple[str, int]) -> Iterator[Client]:
    client = Client(address, default_noreply=False, timeout=5)
    try:
        yield client
    finally:
        client.close()


@contextmanager
def binary_client(address: tuple[str, int]) -> Iterator[bmemcached.Client]:
    client = bmemcached.Client([f"{address[0]}:{address[1]}"], socket_timeout=5)
    try:
        yield client
    finally:
        client.disconnect_all()


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    deadline = time.monotonic() + 10
    while len(data) < n and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _nothing_more(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return True
    finally:
        sock.settimeout(10)


# --- pymemcache, the text protocol ---------------------------------------------------------


def test_pymemcache_under_the_example_policy(port: int, chunk: int, direct: Client) -> None:
    with relay(port, A_WING, chunk) as r, text_client(r.address) as client:
        assert client.set("awing-coord", b"5,6")
        assert client.get("awing-coord") == b"5,6"
        assert client.gets("awing-coord")[0] == b"5,6"
        denied: list[Callable[[], object]] = [
            lambda: client.get("xwing-coord"),
            lambda: client.set("xwing-coord", b"spy"),
            lambda: client.get_many(["awing-coord", "xwing-coord"]),  # one denied key denies the request
            lambda: client.delete("awing-coord"),
            lambda: client.add("awing-coord", b"x"),
            lambda: client.incr("awing-coord", 1),
            lambda: client.touch("awing-coord", 10),
            lambda: client.stats(),
            lambda: client.version(),
        ]
        for operation in denied:
            with pytest.raises(MemcacheClientError, match="access denied"):
                operation()
            assert client.get("awing-coord") == b"5,6"  # the next allowed operation works
        # noreply: the client hears nothing, and the data block never reaches memcached
        assert client.set("xwing-coord", b"spy", noreply=True)
        assert client.get("awing-coord") == b"5,6"
    assert direct.get("xwing-coord") == b"3,4"
    assert direct.get("awing-coord") == b"5,6"
    decisions = [(rec.summary["command"], rec.decision.allowed) for rec in r.records]
    assert ("set", False) in decisions and ("get", True) in decisions


def test_pymemcache_fleet_tracker_reads_both(port: int, chunk: int, direct: Client) -> None:
    with relay(port, FLEET, chunk) as r, text_client(r.address) as client:
        assert client.get_many(["awing-coord", "xwing-coord"]) == {"awing-coord": b"1,2", "xwing-coord": b"3,4"}
        with pytest.raises(MemcacheClientError, match="access denied"):
            client.set("awing-coord", b"0,0")
        assert client.get("xwing-coord") == b"3,4"
    assert direct.get("awing-coord") == b"1,2"


# --- bmemcached, the binary protocol -------------------------------------------------------


def test_bmemcached_under_the_example_policy(port: int, chunk: int, direct: Client) -> None:
    with relay(port, A_WING, chunk) as r, binary_client(r.address) as client:
        assert client.set("awing-coord", "5,6")
        assert client.get("awing-coord") == "5,6"
        server = next(client.servers)
        sock = server.connection
        denied: list[Callable[[], object]] = [
            lambda: client.get("xwing-coord"),
            lambda: client.set("xwing-coord", "spy"),
            lambda: client.delete("awing-coord"),
            lambda: client.add("awing-coord", "x"),
            lambda: client.incr("awing-coord", 1),
            lambda: client.cas("awing-coord", "7,8", client.gets("awing-coord")[1]),  # a cas, not a set
            lambda: client.get_multi(["awing-coord", "xwing-coord"]),  # GetKQ awing, GetK xwing
        ]
        for operation in denied:
            with pytest.raises(MemcachedException) as e:
                operation()
            assert e.value.code == 8
            assert client.get("awing-coord") == "5,6"
            assert server.connection is sock  # the same socket carries on
    assert direct.get("xwing-coord") == b"3,4"
    assert ("get", False) in [(rec.summary["command"], rec.decision.allowed) for rec in r.records]


def test_bmemcached_fleet_tracker_get_multi(port: int, chunk: int, direct: Client) -> None:
    with binary_client(("127.0.0.1", port)) as seed:  # straight to memcached
        seed.set("awing-coord", "1,2")
        seed.set("xwing-coord", "3,4")
    with relay(port, FLEET, chunk) as r, binary_client(r.address) as client:
        with pytest.raises(MemcachedException) as e:
            client.get_multi(["awing-coord", "xwing-coord", "nobody"])  # the last, a GetK, is denied
        assert e.value.code == 8
        assert client.get_multi(["awing-coord", "xwing-coord"]) == {"awing-coord": "1,2", "xwing-coord": "3,4"}
        with pytest.raises(MemcachedException) as e:
            client.set("xwing-coord", "0,0")
        assert e.value.code == 8
        assert client.get("xwing-coord") == "3,4"


# --- raw pipelines: one TCP connection, exact bytes ----------------------------------------


def test_text_pipeline_through_a_real_server(port: int, chunk: int, direct: Client) -> None:
    with relay(port, A_WING, chunk) as r, socket.create_connection(r.address, timeout=10) as sock:
        sock.sendall(b"set awing-coord 0 0 3\r\nabc\r\n"
                     b"get xwing-coord\r\n"
                     b"get awing-coord\r\n"
                     b"set xwing-coord 0 0 3 noreply\r\nspy\r\n"
                     b"mg awing-coord v q\r\n"  # quiet: answered on a hit only
                     b"mg xwing-coord v\r\n"  # denied: must come after the quiet one's answer
                     b"mg nobody v q\r\n"  # quiet and denied: the denial is still an answer
                     b"mg awing-coord v\r\n")
        expected = (b"STORED\r\n" + DENIED + b"VALUE awing-coord 0 3\r\nabc\r\nEND\r\n" + b"VA 3\r\nabc\r\n" +
                    DENIED + DENIED + b"VA 3\r\nabc\r\n")
        assert _read(sock, len(expected)) == expected
        assert _nothing_more(sock)  # the MN of the parser's own mn is kept back
        sock.sendall(b"get awing-coord\r\n")
        value = b"VALUE awing-coord 0 3\r\nabc\r\nEND\r\n"
        assert _read(sock, len(value)) == value
    assert direct.get("xwing-coord") == b"3,4"


def _responses(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out = []
    while len(data) >= 24:
        _, opcode, keylen, extlen, _, status, bodylen, opaque, _ = struct.unpack(">BBHBBHIIQ", data[:24])
        out.append((opcode, status, opaque, data[24 + extlen + keylen:24 + bodylen]))
        data = data[24 + bodylen:]
    assert data == b""
    return out


def test_binary_pipeline_through_a_real_server(port: int, chunk: int, direct: Client) -> None:
    value = struct.pack(">II", 0, 0)
    with relay(port, A_WING, chunk) as r, socket.create_connection(r.address, timeout=10) as sock:
        sock.sendall(binary_request(0x11, b"awing-coord", value, b"9,9", opaque=1)  # SetQ: silent on success
                     + binary_request(0x0D, b"awing-coord", opaque=2)  # GetKQ: a hit
                     + binary_request(0x0D, b"xwing-coord", opaque=3)  # denied
                     + binary_request(0x09, b"awing-coord", opaque=4)
                     + binary_request(0x11, b"xwing-coord", value, b"spy", opaque=5)  # denied
                     + binary_request(0x00, b"awing-coord", opaque=6))
        hit, denial = 24 + 4 + 3, 24 + 13  # header, flags, value; header, "access denied"
        got = _responses(_read(sock, (hit + 11) + denial + hit + denial + hit))  # GetKQ's has its key
        assert [(op, status, opaque) for op, status, opaque, _ in got] == [
            (0x0D, 0, 2), (0x0D, 8, 3), (0x09, 0, 4), (0x11, 8, 5), (0x00, 0, 6)]
        assert [body for *_, body in got] == [b"9,9", b"access denied", b"9,9", b"access denied", b"9,9"]
        assert _nothing_more(sock)  # the parser's own Noops are kept back
    assert direct.get("xwing-coord") == b"3,4"
    assert direct.get("awing-coord") == b"9,9"


def test_allowed_quit_closes_and_unserved_opcodes_are_answered(port: int, chunk: int) -> None:
    with relay(port, ALLOW_ALL, chunk) as r:
        with socket.create_connection(r.address, timeout=10) as sock:
            sock.sendall(b"version\r\nquit\r\n")
            assert _read(sock, 100).startswith(b"VERSION 1.6")  # and then memcached closes
        with socket.create_connection(r.address, timeout=10) as sock:
            verbosity = binary_request(0x1B, extras=struct.pack(">I", 1), opaque=1)
            sock.sendall(verbosity + binary_request(0x0A, opaque=2) + binary_request(0x07, opaque=3))
            got = _responses(_read(sock, 24 + 15 + 24 + 24))
            assert [(op, status, opaque) for op, status, opaque, _ in got] == [
                (0x1B, 0x81, 1), (0x0A, 0, 2), (0x07, 0, 3)]
            assert _read(sock, 1) == b""  # Quit: memcached closed

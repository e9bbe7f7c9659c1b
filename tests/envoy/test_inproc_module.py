"""The in-process L7 filter in the pinned Envoy: it loads, refuses an Envoy it was not built for,
and runs cilia's memcache parser on real connections to a real memcached, with Cilium's
memcached example policy unchanged: denials answered in order, partial frames, pipelining, a
parse error closing the connection, a policy change meeting open connections, records back to
the agent's channel."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.helpers import cilium_examples_dir
from tests.envoy.inproc_support import InprocEnvoy, inproc_envoy
from tests.l7parsers.memcache_support import BoundSockets, memcached
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError

from cilia.envoy.inproc import build
from cilia.envoy.supervisor import EnvoyStartError, envoy_binary

POLICY = cilium_examples_dir() / "memcd-sw-security-policy.yaml"
CLIENTS = {"a-wing": ("app=a-wing", "127.0.0.2"), "x-wing": ("app=x-wing", "127.0.0.3")}


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inproc-module")
    build.build(out)
    return out


@pytest.fixture
def node(tmp_path: Path, module_dir: Path) -> Iterator[InprocEnvoy]:
    with memcached() as port, inproc_envoy(tmp_path, module_dir, (POLICY.read_text(), str(POLICY)), port,
                                           CLIENTS) as n:
        yield n
        for c in OPEN:
            c.close()
        OPEN.clear()


OPEN: list[Client] = []


def client(node: InprocEnvoy, source: str) -> Client:
    c = Client(("127.0.0.1", node.listen_port), default_noreply=False, connect_timeout=5, timeout=5,
               socket_module=BoundSockets(source))
    OPEN.append(c)
    return c


def wait_records(node: InprocEnvoy, want: int) -> list[tuple[object, object]]:
    deadline = time.monotonic() + 10
    while True:
        with node.lock:
            got = list(node.records)
        if len(got) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_example_policy_through_the_module(node: InprocEnvoy) -> None:
    a = client(node, "127.0.0.2")
    assert a.set("awing-coord", "1,2") is True
    assert a.get("awing-coord") == b"1,2"
    with pytest.raises(MemcacheClientError, match="access denied"):
        a.get("xwing-coord")
    assert a.get("awing-coord") == b"1,2"  # the connection stays usable after a denial
    x = client(node, "127.0.0.3")
    assert x.set("xwing-coord", "3,4") is True
    with pytest.raises(MemcacheClientError, match="access denied"):
        x.get("awing-coord")
    records = wait_records(node, 6)
    decided = [(info.peer_identity, rec.summary.get("key"), rec.decision.allowed)  # type: ignore[attr-defined]
               for info, rec in records]
    a_id = node.engine.identity_of("a-wing").id
    assert (a_id, "xwing-coord", False) in decided and (a_id, "awing-coord", True) in decided
    assert all(str(POLICY) in rec.decision.rule for _, rec in records)  # type: ignore[attr-defined]
    assert {info.endpoint for info, _ in records} == {"memcd-server"}  # type: ignore[attr-defined]
    # the connection's addresses, from Envoy: each client's bound address, the listener's
    sources = {info.source.rpartition(":")[0] for info, _ in records}  # type: ignore[attr-defined]
    assert sources == {"127.0.0.2", "127.0.0.3"}
    assert all(int(info.source.rpartition(":")[2]) > 0 for info, _ in records)  # type: ignore[attr-defined]
    assert {info.destination for info, _ in records} == {f"127.0.0.1:{node.listen_port}"}  # type: ignore[attr-defined]
    assert node.channel.interpreters()[0]["connections"] >= 2


def test_pipelined_and_split_requests(node: InprocEnvoy) -> None:
    client(node, "127.0.0.2").set("awing-coord", "5")
    s = node.connect("127.0.0.2")
    # three gets in one chunk: the denied one is answered between the others, in order
    s.sendall(b"get awing-coord\r\nget xwing-coord\r\nget awing-coord\r\n")
    want = b"VALUE awing-coord 0 1\r\n5\r\nEND\r\nCLIENT_ERROR access denied\r\nVALUE awing-coord 0 1\r\n5\r\nEND\r\n"
    assert _read(s, len(want)) == want
    # one request a byte at a time: nothing passes until it is whole, then it is decided once
    for b in b"get xwing-coord\r\n":
        s.send(bytes([b]))
        time.sleep(0.002)
    assert _read(s, len(b"CLIENT_ERROR access denied\r\n")) == b"CLIENT_ERROR access denied\r\n"
    s.close()


def test_parse_error_closes_only_that_connection(node: InprocEnvoy) -> None:
    good = client(node, "127.0.0.2")
    good.set("awing-coord", "7")
    bad = node.connect("127.0.0.2")
    bad.sendall(b"\x00\x01 not memcache at all\r\n")
    assert bad.recv(100) == b""  # closed, nothing passed
    bad.close()
    assert good.get("awing-coord") == b"7"
    errors = [rec for _, rec in wait_records(node, 2) if "error" in rec.summary]  # type: ignore[attr-defined]
    assert errors and "unparseable client data" in errors[0].summary["error"]


def test_policy_change_meets_open_connections(node: InprocEnvoy) -> None:
    c = client(node, "127.0.0.2")
    assert c.set("awing-coord", "1") is True
    node.apply(POLICY.read_text().replace("awing", "bwing"), str(POLICY))  # a-wing's keys are now others'
    deadline = time.monotonic() + 10
    while True:  # the views travel over the channel; the next chunk after they land meets them
        try:
            c.get("awing-coord")
        except MemcacheClientError:
            break
        assert time.monotonic() < deadline, "the new policy never reached the open connection"
        time.sleep(0.05)


def _read(s: object, n: int) -> bytes:
    import socket

    assert isinstance(s, socket.socket)
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def test_refuses_an_envoy_it_was_not_built_for(tmp_path: Path) -> None:
    other = tmp_path / "other-module"
    build.build(other, build_id="00" * 20)
    with memcached() as port, pytest.raises(EnvoyStartError), \
            inproc_envoy(tmp_path, other, (POLICY.read_text(), str(POLICY)), port, CLIENTS):
        pass
    assert "cilia_l7: refusing to load" in (tmp_path / "envoy.log").read_text()


def test_build_refuses_another_abi(tmp_path: Path) -> None:
    fake = tmp_path / "envoy"
    fake.write_bytes(Path(envoy_binary()).read_bytes()[:4096] + b"\x00v0.1.0\x00")
    with pytest.raises(build.BuildError, match="ABI v0.1.0"):
        build.build(tmp_path / "out", fake)


def test_build_reads_the_pinned_envoy() -> None:
    who = build.identify(envoy_binary())
    assert who.abi_version == build.SUPPORTED_ABI == "v0.2.0"
    assert len(who.build_id) == 40


def test_the_channel_notices_an_interpreter_that_stops_reporting(node: InprocEnvoy) -> None:
    client(node, "127.0.0.2").set("awing-coord", "1")  # the interpreter is up and reporting
    node.channel.stale_after = 1.0
    pid = node.envoy.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # a wedged Envoy: its interpreter reports nothing
    try:
        assert _until(lambda: [i["stale"] for i in node.channel.interpreters()] == [True])
    finally:
        os.kill(pid, signal.SIGCONT)
    assert _until(lambda: [i["stale"] for i in node.channel.interpreters()] == [False])


def _until(predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True

"""Real etcd clusters for tests: Debian's etcd-server on loopback ports picked free.

``EtcdCluster(tmp_path, members=3)`` starts every member in its own data dir under the test's
tmp dir; ``stop_member``/``start_member`` kill and restart one member by PID (its data dir kept,
as a crashed and restarted member); ``close`` kills every member this fixture started. The
timings are shortened (heartbeat 50 ms, election 500 ms) so a lost leader is replaced quickly and
the minimum lease TTL is under a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from cilia.netutil import free_port

T = TypeVar("T")
ETCD = shutil.which("etcd") or "/usr/bin/etcd"
HOST = "127.0.0.1"


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    scheme: str = "http"
    host: str = HOST

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"


class EtcdCluster:
    def __init__(self, base: Path, members: int = 3, tls: tuple[Path, Path, Path] | None = None,
                 host: str | None = None, netns: str | None = None) -> None:
        """``tls``: (CA, server certificate, key): clients must speak TLS and show a certificate
        that CA signed (peers stay plaintext on loopback). ``netns``: run the members in that named
        network namespace, listening on ``host`` (an address it has; tests/cluster's underlay)."""
        if not os.path.exists(ETCD):
            pytest.skip("etcd-server is not installed (scripts/apt-packages.txt)")
        self.base = base
        self.tls = tls
        host = host or HOST  # read at call time: a test may point HOST elsewhere
        self.host = host
        self.netns = netns
        self.members: list[Member] = []
        used: set[int] = set()
        for i in range(members):
            client, peer = self._in_netns(lambda: _two_ports(used, host))
            data = base / f"cilia-etcd-{i}"
            self.members.append(Member(f"m{i}", client, peer, data, base / f"cilia-etcd-{i}.log",
                                       scheme="https" if tls else "http", host=host))
        self.initial_cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            self._spawn(m, "new")
        self.wait_healthy()

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def endpoints_arg(self) -> str:
        return ",".join(self.endpoints)

    def _spawn(self, m: Member, state: str) -> None:
        args = [ETCD, "--name", m.name, "--data-dir", str(m.data_dir),
                "--listen-client-urls", m.client_url, "--advertise-client-urls", m.client_url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", self.initial_cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", f"cilia-test-{os.getpid()}-{id(self)}",
                "--heartbeat-interval", "50", "--election-timeout", "500",
                "--enable-v2=false", "--logger", "zap", "--log-outputs", "stderr"]
        if self.tls is not None:
            ca, cert, key = self.tls
            args += ["--cert-file", str(cert), "--key-file", str(key), "--client-cert-auth",
                     "--trusted-ca-file", str(ca)]
        log = open(m.log, "ab")  # noqa: SIM115 - the child keeps it
        try:
            m.proc = self._in_netns(lambda: subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                                             start_new_session=True))
        finally:
            log.close()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running member answers /health with a leader."""
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.proc is None:
                continue
            while not self._healthy(m):
                if m.proc.poll() is not None:
                    raise RuntimeError(f"etcd member {m.name} exited: {m.log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {m.name} not healthy: {m.log.read_text()[-2000:]}")
                time.sleep(0.05)

    def _in_netns(self, fn: Callable[[], T]) -> T:
        """``fn()`` in the members' network namespace (a child forked there stays there)."""
        if self.netns is None:
            return fn()
        from cilia.bpf.netns import run_in_netns

        return run_in_netns(self.netns, fn)

    def _healthy(self, m: Member) -> bool:
        return self._in_netns(lambda: self._probe(m))

    def _probe(self, m: Member) -> bool:
        """/health answers with a leader; with TLS, a TCP connect is all we check (the agent under
        test is what proves the handshake)."""
        try:
            with socket.create_connection((m.host, m.client_port), timeout=1) as s:
                if self.tls is not None:
                    return True
                s.sendall(f"GET /health HTTP/1.0\r\nHost: {m.host}\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
        except OSError:
            return False
        return b'"health":"true"' in data

    def stop_member(self, index: int) -> None:
        m = self.members[index]
        if m.proc is not None:
            m.proc.send_signal(signal.SIGKILL)
            m.proc.wait()
            m.proc = None

    def start_member(self, index: int) -> None:
        m = self.members[index]
        if m.proc is None:
            self._spawn(m, "existing")

    def stop_all(self) -> None:
        for i in range(len(self.members)):
            self.stop_member(i)

    def start_all(self) -> None:
        for i in range(len(self.members)):
            self.start_member(i)
        self.wait_healthy()

    def etcdctl(self, *args: str) -> str:
        env = dict(os.environ, ETCDCTL_API="3")
        out = subprocess.run(["etcdctl", "--endpoints", self.endpoints_arg, *args], env=env,
                             capture_output=True, text=True, timeout=30, check=True)
        return out.stdout

    def close(self) -> None:
        self.stop_all()
        for m in self.members:
            shutil.rmtree(m.data_dir, ignore_errors=True)


def _two_ports(used: set[int], host: str = HOST) -> tuple[int, int]:
    out: list[int] = []
    while len(out) < 2:
        port = free_port(host)
        if port not in used:
            used.add(port)
            out.append(port)
    return out[0], out[1]


@pytest.fixture
def etcd1(tmp_path: Path) -> Iterator[EtcdCluster]:
    """One member: for the interface and backend tests that need no quorum."""
    cluster = EtcdCluster(tmp_path, members=1)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Three members: for everything cluster-level (a member lost, all lost and back)."""
    cluster = EtcdCluster(tmp_path, members=3)
    try:
        yield cluster
    finally:
        cluster.close()

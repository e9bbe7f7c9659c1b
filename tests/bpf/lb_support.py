"""Services on the real BPF datapath: backends that answer their name, clients that count.

``lb_node()`` is ``bpf_node()`` with a ``LoadBalancer`` over the same loaded program (smaller
slot rows than the agent's, so each test's pinned array stays small). A backend serves TCP (sends
its name, then echoes) and UDP (answers every datagram with its name) on the same port.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from tests.bpf.bpf_support import BpfNode
from tests.helpers import require_bpf

from cilia.bpf.lb import LoadBalancer
from cilia.bpf.loader import Loader
from cilia.bpf.netns import run_in_netns
from cilia.services.model import Backend, Frontend, Service

VIP = "10.96.0.10"
VIP_PORT = 80
BACKEND_PORT = 8080
TABLE_SIZE = 251  # a prime; the agent's is 1021
SERVICES_MAX = 64


class LbNode(BpfNode):
    def __init__(self, suffix: str) -> None:
        super().__init__(suffix)
        self.loader = Loader(pin_dir=self.loader.pin_dir, netns=self.node, lb_services_max=SERVICES_MAX,
                             lb_table_size=TABLE_SIZE)
        self.datapath.loader = self.loader
        self.lb: LoadBalancer | None = None
        self._stop = threading.Event()

    def setup(self) -> None:
        super().setup()
        self.lb = LoadBalancer(self.loader)

    def service(self, backends: list[str], *, sid: int = 1, weights: list[int] | None = None,
                algorithm: str = "maglev", affinity: int = 0, frontend: Frontend | None = None,
                states: dict[str, str] | None = None, type_: str = "ClusterIP") -> Service:
        """A service to the named endpoints' BACKEND_PORT (not yet synced)."""
        bs = tuple(Backend(self.endpoints[n].address, BACKEND_PORT, (weights or [1] * len(backends))[i],
                           (states or {}).get(n, "active"))  # type: ignore[arg-type]
                   for i, n in enumerate(backends))
        return Service(sid, frontend or Frontend(VIP, VIP_PORT), bs, algorithm,  # type: ignore[arg-type]
                       affinity, type_)  # type: ignore[arg-type]

    def serve_name(self, name: str, port: int = BACKEND_PORT) -> None:
        """TCP: send the backend's name, then echo; UDP: answer each datagram with the name."""
        ep = self.endpoints[name]

        def bind() -> tuple[socket.socket, socket.socket]:
            t = socket.socket()
            t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            t.bind(("0.0.0.0", port))
            t.listen(1024)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.bind(("0.0.0.0", port))
            return t, u

        tcp, udp = run_in_netns(ep.ns.name, bind)
        ep.servers += [tcp, udp]
        reply = name.encode()

        def echo(c: socket.socket) -> None:
            with c:
                try:
                    c.sendall(reply + b"\n")
                    while data := c.recv(4096):
                        c.sendall(data)
                except OSError:
                    pass

        def accept() -> None:
            while True:
                try:
                    c, _ = tcp.accept()
                except OSError:
                    return
                threading.Thread(target=echo, args=(c,), daemon=True).start()

        def answer() -> None:
            while True:
                try:
                    _, peer = udp.recvfrom(2048)
                    udp.sendto(reply, peer)
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        threading.Thread(target=answer, daemon=True).start()

    def ask_tcp(self, src: str, n: int, addr: str = VIP, port: int = VIP_PORT, timeout: float = 2.0) -> Counter[str]:
        """``n`` TCP connections from ``src``; counts of the name each got ("" when it failed)."""

        def go() -> Counter[str]:
            out: Counter[str] = Counter()
            for _ in range(n):
                out[_name_over_tcp(addr, port, timeout)] += 1
            return out

        return run_in_netns(self.endpoints[src].ns.name, go)

    def open_to(self, src: str, addr: str = VIP, port: int = VIP_PORT) -> tuple[socket.socket, str]:
        """A connection left open, with the name of the backend it reached."""

        def go() -> tuple[socket.socket, str]:
            c = socket.create_connection((addr, port), timeout=2.0)
            return c, _read_line(c)

        return run_in_netns(self.endpoints[src].ns.name, go)

    def teardown(self) -> None:
        if self.lb is not None:
            self.lb.close()
        super().teardown()


def _read_line(c: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        data = c.recv(64)
        if not data:
            break
        buf += data
    return buf.decode().strip()


def _name_over_tcp(addr: str, port: int, timeout: float) -> str:
    try:
        with socket.create_connection((addr, port), timeout=timeout) as c:
            return _read_line(c)
    except OSError:
        return ""


def echo(c: socket.socket, data: bytes = b"still here\n") -> bytes:
    c.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = c.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


@contextmanager
def lb_node() -> Iterator[LbNode]:
    require_bpf()
    node = LbNode("lb" + uuid.uuid4().hex[:4])  # "lb": this task's namespaces and pins
    try:
        node.setup()
        yield node
    finally:
        node.teardown()

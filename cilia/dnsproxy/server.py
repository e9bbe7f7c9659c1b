"""The DNS proxy's sockets: one transparent UDP socket and one transparent TCP listener on the same
port of 127.0.0.1, where the BPF datapath hands endpoints' DNS traffic over (``bpf_sk_assign``).

- UDP: the original destination (the server the pod asked) comes from ``IP_ORIGDSTADDR``; the
  answer goes back from that address and port through a transparent socket bound to it, so the
  client's connected socket accepts it.
- TCP: the accepted socket's own address is the original destination; length-framed messages,
  several per connection, answered in order.
- Upstream: a new socket per UDP query (a fresh random port), one connection per client TCP
  connection, from the node's own address with ``SO_MARK`` 0xB00 | identity << 16 (Cilium's egress
  proxy mark): the server's ingress policy judges the pod that asked, as for Envoy's egress.
- An allowed answer is handed to ``learn`` and released to the client only when it returns (the
  IPs are in the maps then); a learner that fails turns the answer into SERVFAIL (fail closed).
- Denied: REFUSED, never forwarded. Upstream silent for ``upstream_timeout``: SERVFAIL. Bytes that
  do not parse: dropped and counted, never forwarded.

Everything runs on one asyncio loop in a thread of its own; learners run on a small pool.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..policy.model import Protocol
from . import wire
from .policy import DNSPolicy, Judgement

_log = logging.getLogger(__name__)

IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = 20
SO_MARK = 36
EGRESS_MARK = 0x0B00  # Cilium's MARK_MAGIC_PROXY_EGRESS; datapath.c MARK_PROXY_EGRESS
REPLY_SOCKETS_MAX = 256
MAX_IN_FLIGHT = 4096
TCP_IDLE = 10.0
IDLE_UPSTREAM_MAX = 64  # idle upstream UDP sockets kept per (server, mark)

Learner = Callable[[str, str, Sequence[str], int], None]
Address = tuple[str, int]


def no_learning(endpoint: str, qname: str, ips: Sequence[str], ttl: int) -> None:
    """The learner until toFQDNs learns answers: nothing to wait for."""


@dataclass(frozen=True)
class DNSRecord:
    """One query the proxy handled, for flows and metrics."""

    time: float
    protocol: str  # "UDP" or "TCP"
    source: Address
    server: Address
    endpoint: str  # the asking endpoint ("" if unknown)
    peer_identity: int  # the server's identity
    query: str = ""
    qtype: str = ""
    verdict: str = "forwarded"  # forwarded | denied | audit | error
    rcode: str = ""
    ips: tuple[str, ...] = ()
    ttl: int = 0
    cnames: tuple[str, ...] = ()
    rule: str = ""
    reason: str = ""
    latency: float = 0.0  # seconds from the query's arrival to its answer leaving
    upstream: float = 0.0  # seconds the upstream took (0: not asked)


Recorder = Callable[[DNSRecord], None]


def _ignore(_record: DNSRecord) -> None:
    pass


@dataclass
class _Upstream:
    """A client TCP connection's connection to its server (opened on the first allowed query)."""

    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    framer: wire.Framer = field(default_factory=wire.Framer)


class DNSProxy:
    def __init__(self, *, address: str = "127.0.0.1", port: int = 0, learn: Learner = no_learning,
                 record: Recorder = _ignore, upstream_timeout: float = 2.0, egress_mark: int = EGRESS_MARK,
                 max_in_flight: int = MAX_IN_FLIGHT, tcp_idle: float = TCP_IDLE) -> None:
        self.max_in_flight = max_in_flight  # UDP queries being answered; more are dropped (the client retries)
        self.tcp_idle = tcp_idle  # a TCP client silent this long is closed (RFC 7766 asks servers to)
        self.address = address
        self.port = port
        self.learn = learn
        self.record = record
        self.upstream_timeout = upstream_timeout
        self.egress_mark = egress_mark
        self.policy = DNSPolicy()  # swapped whole by the sink; read without a lock
        self.stats: Counter[str] = Counter()  # malformed, refused, forwarded, servfail, ...
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._reply_socks: dict[Address, socket.socket] = {}
        self._idle: dict[tuple[Address, int], list[socket.socket]] = {}  # upstream UDP sockets by (server, mark)
        self._learners = ThreadPoolExecutor(4, thread_name_prefix="dns-learn")
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Bind UDP and TCP on the same port (``port`` 0: any free one) and serve."""
        for _ in range(20):
            udp = _transparent(socket.SOCK_DGRAM)
            udp.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
            udp.bind((self.address, self.port))
            port = udp.getsockname()[1]
            tcp = _transparent(socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.address, port))
            except OSError:
                udp.close()
                tcp.close()
                if self.port:
                    raise
                continue  # the TCP port of that number was taken: another one
            tcp.listen(1024)
            break
        else:
            raise OSError(f"no port free for both UDP and TCP on {self.address}")
        udp.setblocking(False)
        tcp.setblocking(False)
        self._udp, self._tcp, self.port = udp, tcp, port
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="dns-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        assert self._udp is not None and self._tcp is not None
        loop.add_reader(self._udp.fileno(), self._udp_readable)
        self._server = loop.run_until_complete(asyncio.start_server(self._tcp_client, sock=self._tcp))
        ready.set()
        try:
            loop.run_forever()
        finally:
            for task in list(self._tasks):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            loop.close()

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None:
            def shut() -> None:
                if self._udp is not None:
                    loop.remove_reader(self._udp.fileno())
                if self._server is not None:
                    self._server.close()
                loop.stop()

            loop.call_soon_threadsafe(shut)
            self._thread.join(10)
        self._loop = self._thread = None
        for s in (self._udp, self._tcp, *self._reply_socks.values(), *(x for xs in self._idle.values() for x in xs)):
            if s is not None:
                s.close()
        self._udp = self._tcp = None
        self._reply_socks.clear()
        self._idle.clear()
        self._learners.shutdown(wait=False, cancel_futures=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ UDP

    def _udp_readable(self) -> None:
        assert self._udp is not None
        for _ in range(64):  # a burst, then let the loop serve the others
            try:
                data, ancillary, flags, client = self._udp.recvmsg(wire.MAX_UDP, socket.CMSG_SPACE(16))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                _log.warning("DNS proxy: UDP receive: %s", e)
                return
            server = _original_destination(ancillary)
            if server is None or flags & socket.MSG_TRUNC:
                self._malformed("UDP", client, server or ("", 0), "no original destination" if server is None
                                else "truncated datagram")
                continue
            if self._itself(server):
                self._malformed("UDP", client, server, "addressed to the DNS proxy itself")
                continue
            if len(self._tasks) >= self.max_in_flight:
                self.stats["overload"] += 1  # counted, not recorded: a flood must not cost a flow each
                continue
            self._spawn(self._udp_query(data, client, server))

    def _itself(self, server: Address) -> bool:
        """A query sent straight to the proxy's own port: forwarding it would send it back here."""
        return server[1] == self.port and (server[0] == self.address or server[0].startswith("127."))

    async def _udp_query(self, data: bytes, client: Address, server: Address) -> None:
        out = await self.handle(data, client, server, Protocol.UDP)
        if out is None:
            return
        try:
            self._reply_socket(server).sendto(out, client)
        except OSError as e:
            self.stats["reply_errors"] += 1
            _log.warning("DNS proxy: answer to %s:%d from %s:%d: %s", *client, *server, e)

    def _reply_socket(self, server: Address) -> socket.socket:
        """A socket bound to the server's address and port (transparent: not this node's), so the
        answer comes from where the client sent its query."""
        sock = self._reply_socks.get(server)
        if sock is None:
            if len(self._reply_socks) >= REPLY_SOCKETS_MAX:
                self._reply_socks.pop(next(iter(self._reply_socks))).close()
            sock = _transparent(socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(server)
            sock.setblocking(False)
            self._reply_socks[server] = sock
        return sock

    async def _udp_upstream(self, query: bytes, server: Address, mark: int) -> bytes:
        """Ask ``server`` on a connected socket of the pool for (server, mark), so a busy client
        does not make a new flow (and conntrack entry) per query; a socket is used by one query at a
        time and put back only after a good answer (after a timeout a late answer could follow)."""
        loop = asyncio.get_running_loop()
        idle = self._idle.setdefault((server, mark), [])
        if idle:
            sock = idle.pop()  # connected to server
        else:
            sock = _upstream_socket(socket.SOCK_DGRAM, mark)
            try:
                sock.connect(server)
            except OSError:
                sock.close()
                raise
        answer: asyncio.Future[bytes] = loop.create_future()
        qid = query[:2]

        def readable() -> None:
            while not answer.done():
                try:
                    data = sock.recv(wire.MAX_UDP)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as e:  # e.g. ICMP port unreachable: nobody serves DNS there
                    answer.set_exception(e)
                    return
                if data[:2] == qid:  # the same id; anything else is not the answer (a late one)
                    answer.set_result(data)

        def expire() -> None:
            if not answer.done():
                answer.set_exception(TimeoutError())

        timer = loop.call_later(self.upstream_timeout, expire)
        good = False
        try:
            loop.add_reader(sock.fileno(), readable)
            sock.send(query)
            data = await answer
            good = True
            return data
        finally:
            timer.cancel()
            loop.remove_reader(sock.fileno())
            if good and len(idle) < IDLE_UPSTREAM_MAX:
                idle.append(sock)
            else:
                sock.close()

    # ------------------------------------------------------------------ TCP

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client: Address = writer.get_extra_info("peername")[:2]
        server: Address = writer.get_extra_info("sockname")[:2]  # transparent: what the client dialed
        framer = wire.Framer()
        upstream = _Upstream()
        try:
            if self._itself(server):
                self._malformed("TCP", client, server, "addressed to the DNS proxy itself")
                return
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), self.tcp_idle)
                except TimeoutError:
                    self.stats["tcp_idle_closed"] += 1
                    return
                if not data:
                    return
                for message in framer.feed(data):
                    out = await self.handle(message, client, server, Protocol.TCP, upstream)
                    if out is not None:
                        writer.write(wire.frame(out))
                        await writer.drain()
        except (ConnectionError, OSError):
            return
        finally:
            for w in (writer, upstream.writer):
                if w is not None:
                    w.close()

    async def _tcp_upstream(self, query: bytes, server: Address, mark: int, up: _Upstream) -> bytes:
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):  # a kept connection the server closed meanwhile: open a new one once
            if up.writer is None or up.reader is None:
                sock = _upstream_socket(socket.SOCK_STREAM, mark)
                try:
                    await asyncio.wait_for(loop.sock_connect(sock, server), self.upstream_timeout)
                except BaseException:
                    sock.close()
                    raise
                up.reader, up.writer = await asyncio.open_connection(sock=sock)
                up.framer = wire.Framer()
            try:
                up.writer.write(wire.frame(query))
                await up.writer.drain()
                return await asyncio.wait_for(self._tcp_answer(query, up), self.upstream_timeout)
            except (ConnectionError, EOFError):
                up.writer.close()
                up.reader = up.writer = None
                if attempt:
                    raise
        raise ConnectionError("unreachable")

    @staticmethod
    async def _tcp_answer(query: bytes, up: _Upstream) -> bytes:
        assert up.reader is not None
        while True:
            data = await up.reader.read(65536)
            if not data:
                raise EOFError("the server closed the connection")
            for message in up.framer.feed(data):
                if message[:2] == query[:2]:
                    return message

    # ------------------------------------------------------------------ one query

    async def handle(self, data: bytes, client: Address, server: Address, protocol: Protocol,
                      upstream: _Upstream | None = None) -> bytes | None:
        """One query from ``client`` to ``server``: the bytes to answer the client with (None:
        nothing, the query is dropped). Runs on whatever loop awaits it."""
        arrived, now = time.monotonic(), time.time()
        proto = protocol.name
        try:
            query = wire.parse_query(data)
        except wire.Malformed as e:
            self._malformed(proto, client, server, str(e))
            return None
        judged = self.policy.judge(client[0], server[0], server[1], protocol, query.name)
        d = judged.decision
        endpoint = judged.endpoint.name if judged.endpoint else ""

        def record(verdict: str, rcode: str, reason: str = d.reason, answer: wire.Answer | None = None,
                   upstream: float = 0.0) -> None:
            self._record(DNSRecord(now, proto, client, server, endpoint, judged.peer_identity, query.name,
                                   query.qtype, verdict, rcode, answer.ips if answer else (),
                                   answer.ttl if answer else 0, answer.cnames if answer else (), d.rule, reason,
                                   time.monotonic() - arrived, upstream))

        if not d.allowed:
            self.stats["refused"] += 1
            record("denied", "Refused")
            return wire.reply(query, wire.REFUSED)
        mark = self.egress_mark | ((judged.endpoint.identity & 0xFFFF) << 16 if judged.endpoint else 0)
        asked = time.monotonic()
        try:
            if upstream is None:
                answer_wire = await self._udp_upstream(query.wire, server, mark)
            else:
                answer_wire = await self._tcp_upstream(query.wire, server, mark, upstream)
            answer = wire.read_answer(query, answer_wire)
        except (TimeoutError, OSError, EOFError, wire.Malformed) as e:
            why = "no answer from the server" if isinstance(e, TimeoutError) else f"upstream: {e}"
            self.stats["servfail"] += 1
            record("error", "ServFail", why, upstream=time.monotonic() - asked)
            return wire.reply(query, wire.SERVFAIL)
        took = time.monotonic() - asked
        if answer.ips and self.learn is not no_learning and not await self._learned(judged, query, answer):
            self.stats["servfail"] += 1
            record("error", "ServFail", "the answer could not be learned", upstream=took)
            return wire.reply(query, wire.SERVFAIL)
        self.stats["forwarded"] += 1
        record("audit" if d.audit else "forwarded", answer.rcode_name, answer=answer, upstream=took)
        return answer.wire  # unchanged: TC, EDNS0 and all

    async def _learned(self, judged: Judgement, query: wire.Query, answer: wire.Answer) -> bool:
        """Hand the answer to the learner and wait until it returns (the IPs are in the maps)."""
        name = judged.endpoint.name if judged.endpoint else ""
        try:
            await asyncio.get_running_loop().run_in_executor(self._learners, self.learn, name, query.name,
                                                             answer.ips, answer.ttl)
        except Exception:
            _log.exception("DNS proxy: learning %s for %s", query.name, name)
            return False
        return True

    def _malformed(self, proto: str, client: Address, server: Address, why: str) -> None:
        self.stats["malformed"] += 1
        self._record(DNSRecord(time.time(), proto, client, server, self.policy.endpoint_name(client[0]), 0,
                               verdict="error", reason=f"malformed: {why}"))

    def _record(self, rec: DNSRecord) -> None:
        try:
            self.record(rec)
        except Exception:
            _log.exception("DNS proxy: recording a flow")


def _upstream_socket(kind: socket.SocketKind, mark: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    return sock


def _transparent(kind: socket.SocketKind) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    return sock


def _original_destination(ancillary: list[tuple[int, int, bytes]]) -> Address | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port, addr = struct.unpack_from("!H4s", data, 2)  # sockaddr_in: family, port, address
            return socket.inet_ntoa(addr), port
    return None

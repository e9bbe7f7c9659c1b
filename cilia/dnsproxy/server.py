"""The DNS proxy's sockets: one transparent UDP socket and one transparent TCP listener on the same
port of 127.0.0.1, where the BPF datapath hands endpoints' DNS traffic over (``bpf_sk_assign``).

- UDP: the original destination (the server the pod asked) comes from ``IP_ORIGDSTADDR``; the
  answer goes back from that address and port through a transparent socket bound to it, so the
  client's connected socket accepts it.
- TCP: the accepted socket's own address is the original destination; length-framed messages,
  several per connection, answered in order.
- Upstream: UDP queries share connected sockets per (server, mark) (``upstream.UdpUpstreams``),
  one connection per client TCP connection, from the node's own address with ``SO_MARK``
  0xB00 | identity << 16 (Cilium's egress proxy mark): the server's ingress policy judges the pod
  that asked, as for Envoy's egress.
- An allowed answer is handed to ``learn`` and released to the client only when it returns (the
  IPs are in the maps then); a learner that fails turns the answer into SERVFAIL (fail closed).
  ``known`` (optional) is asked first, on the loop: True when every address is in the maps
  already (a repeated answer), so the answer goes without the learner's thread.
- Denied: REFUSED, never forwarded. Upstream silent for ``upstream_timeout``: SERVFAIL. Bytes that
  do not parse: dropped and counted, never forwarded.

Everything runs on one asyncio loop in a thread of its own; learners run on a small pool. The UDP
path is callbacks, not a coroutine per query (``_udp_readable``); ``handle`` is the same steps as a
coroutine, for TCP and for tests.

With the fast lane built (``lane.c``; ``routes.py``), the lane reads the UDP socket instead: what
Python has judged and released before passes in C, the rest reaches ``_udp_datagram`` /
``_udp_answered`` whole (``_lane_ready``), and the lane's finished queries become records here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..policy.model import Protocol
from . import lane as lane_module
from . import wire
from .policy import DNSPolicy, Judgement
from .routes import LaneTables, Route
from .upstream import SO_MARK, UdpUpstreams

_log = logging.getLogger(__name__)

IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
IP_ORIGDSTADDR = 20
EGRESS_MARK = 0x0B00  # Cilium's MARK_MAGIC_PROXY_EGRESS; datapath.c MARK_PROXY_EGRESS
REPLY_SOCKETS_MAX = 256
LANE_TICK = 0.05  # seconds between looks for the lane's queries that got no answer
MAX_IN_FLIGHT = 4096
TCP_IDLE = 10.0

Learner = Callable[[str, str, Sequence[str], int], None]
Known = Callable[[str, str, Sequence[str], int], bool]  # (endpoint, name, ips, ttl): all in the maps?
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


Recorder = Callable[[Sequence[DNSRecord]], None]  # records in the order handled, a batch per turn of the loop


def _ignore(_records: Sequence[DNSRecord]) -> None:
    pass


@dataclass(slots=True)
class _Asked:
    """A query on its way through the proxy: what its answer and its record need."""

    query: wire.Query
    client: Address
    server: Address
    protocol: str  # "UDP" or "TCP"
    judged: Judgement
    endpoint: str  # the asking endpoint's name ("" if unknown)
    mark: int  # SO_MARK of the upstream socket
    arrived: float  # monotonic
    now: float  # wall clock, for the record
    sent: float = 0.0  # monotonic, when it went upstream
    took: float = 0.0  # seconds the upstream took
    route: Route | None = None  # the fast lane's route for queries like it (None: Python's alone)


@dataclass
class _Upstream:
    """A client TCP connection's connection to its server (opened on the first allowed query)."""

    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    framer: wire.Framer = field(default_factory=wire.Framer)


class DNSProxy:
    def __init__(self, *, address: str = "127.0.0.1", port: int = 0, learn: Learner = no_learning,
                 record: Recorder = _ignore, known: Known | None = None, upstream_timeout: float = 2.0,
                 egress_mark: int = EGRESS_MARK, max_in_flight: int = MAX_IN_FLIGHT,
                 tcp_idle: float = TCP_IDLE, fast_lane: bool = True) -> None:
        self.fast_lane = fast_lane  # pass judged queries and released answers on in C (lane.c) if built
        self.max_in_flight = max_in_flight  # UDP queries being answered; more are dropped (the client retries)
        self.tcp_idle = tcp_idle  # a TCP client silent this long is closed (RFC 7766 asks servers to)
        self.address = address
        self.port = port
        self.learn = learn
        self.known = known
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
        self._udp_up: UdpUpstreams | None = None  # the loop's upstream UDP sockets
        self._in_flight = 0  # UDP queries sent upstream or being learned, not yet answered
        self._learners = ThreadPoolExecutor(4, thread_name_prefix="dns-learn")
        self._tasks: set[asyncio.Task[bool]] = set()  # learners being waited for (UDP)
        self._loop_thread = 0  # the loop's thread id: records made there are handed over in batches
        self._records: list[DNSRecord] = []  # made on the loop this turn, handed over at its end
        self._lane: LaneTables | None = None  # the fast lane, if built and wanted
        self._lane_timer: asyncio.TimerHandle | None = None
        self._retired: list[tuple[float, socket.socket]] = []  # reply sockets to close when the lane is done with them

    # ------------------------------------------------------------------ lifecycle

    def counters(self) -> dict[str, int]:
        """``stats`` and the fast lane's own (``lane_*``: what it passed on, what it handed over)."""
        lane = self._lane
        return {**self.stats, **(lane.stats() if lane is not None else {}), "fast_lane": int(lane is not None)}

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
        self._loop_thread = threading.get_ident()
        asyncio.set_event_loop(loop)
        assert self._udp is not None and self._tcp is not None
        self._udp_up = UdpUpstreams(loop, self.upstream_timeout)
        module = lane_module.load() if self.fast_lane else None
        if module is not None:  # the lane reads the UDP socket; what it cannot finish comes to Python
            self._lane = LaneTables(module, self._udp, self.upstream_timeout, self.max_in_flight)
            loop.add_reader(self._lane.fileno(), self._lane_ready)
            self._lane_timer = loop.call_later(LANE_TICK, self._lane_tick)
        else:
            loop.add_reader(self._udp.fileno(), self._udp_readable)
        self._server = loop.run_until_complete(asyncio.start_server(self._tcp_client, sock=self._tcp))
        ready.set()
        try:
            loop.run_forever()
        finally:
            for task in list(self._tasks):
                task.cancel()
            loop.run_until_complete(asyncio.sleep(0))
            self._flush_records()
            loop.close()

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None:
            def shut() -> None:
                if self._lane is not None:
                    loop.remove_reader(self._lane.fileno())
                    if self._lane_timer is not None:
                        self._lane_timer.cancel()
                elif self._udp is not None:
                    loop.remove_reader(self._udp.fileno())
                if self._server is not None:
                    self._server.close()
                if self._udp_up is not None:
                    self._udp_up.close()
                loop.stop()

            loop.call_soon_threadsafe(shut)
            self._thread.join(10)
        self._loop = self._thread = None
        for s in (self._udp, self._tcp, *self._reply_socks.values(), *(sock for _, sock in self._retired)):
            if s is not None:
                s.close()
        if self._lane is not None:
            self._lane.close()
            self._lane = None
        self._udp = self._tcp = None
        self._udp_up = None
        self._reply_socks.clear()
        self._retired.clear()
        self._learners.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ UDP

    def _udp_readable(self) -> None:
        """Every datagram waiting (up to a burst) is parsed, judged and sent on or answered here,
        with no task per query: the answer comes back through ``UdpUpstreams``' callback."""
        assert self._udp is not None and self._udp_up is not None
        recvmsg, space = self._udp.recvmsg, socket.CMSG_SPACE(16)
        for _ in range(64):  # a burst, then let the loop serve the others
            try:
                data, ancillary, flags, client = recvmsg(wire.MAX_UDP, space)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                _log.warning("DNS proxy: UDP receive: %s", e)
                return
            self._udp_datagram(data, client, _original_destination(ancillary), bool(flags & socket.MSG_TRUNC))

    def _udp_datagram(self, data: bytes, client: Address, server: Address | None, truncated: bool) -> None:
        if server is None or truncated:
            self._malformed("UDP", client, server or ("", 0), "no original destination" if server is None
                            else "truncated datagram")
            return
        if self._itself(server):
            self._malformed("UDP", client, server, "addressed to the DNS proxy itself")
            return
        if self._in_flight >= self.max_in_flight:
            self.stats["overload"] += 1  # counted, not recorded: a flood must not cost a flow each
            return
        asked = self._judge(data, client, server, Protocol.UDP)
        if asked is None:
            return
        refused = None if asked.judged.decision.allowed else self._refuse(asked)
        lane = self._lane  # (its tables must be of the snapshot this query was judged under)
        if lane is not None and lane.policy is self.policy and (reply_fd := self._reply_fd(server)) is not None:
            asked.route = lane.add(data, client, server, asked.query, asked.judged, asked.endpoint, asked.mark,
                                   reply_fd, refused)
        if refused is None:
            self._udp_ask(asked)
        else:
            self._reply_udp(refused, client, server)

    def _reply_fd(self, server: Address) -> int | None:
        try:
            return self._reply_socket(server).fileno()
        except OSError:
            return None  # (``_reply_udp`` says why)

    # ------------------------------------------------------------------ the fast lane (lane.c)

    def _lane_ready(self) -> None:
        """The lane has datagrams: it passes on what it may and hands the rest over, in order."""
        lane = self._lane
        assert lane is not None
        if lane.policy is not self.policy:  # a new snapshot: every judgement is made again
            lane.reset(self.policy)
        slow, done = lane.lane.pump()
        for item in slow:
            if item[0] == "query":
                _, data, client, server, truncated = item
                self._udp_datagram(data, client, server, truncated)
            elif item[0] == "answer":
                _, query, answer, client, server, arrived, sent, wall, route = item
                self._udp_answered(self._lane_asked(query, client, server, arrived, sent, wall, route), answer, None)
            else:  # "failed": an error on the route's upstream socket
                _, query, client, server, arrived, sent, wall, route, errno = item
                self._udp_answered(self._lane_asked(query, client, server, arrived, sent, wall, route), None,
                                   OSError(errno, os.strerror(errno)))
        if done:
            self._lane_records(done)

    def _lane_tick(self) -> None:
        """Queries the lane sent that got no answer in time: SERVFAIL, as in Python's path."""
        lane = self._lane
        if lane is None or self._loop is None:
            return
        for query, client, server, arrived, sent, wall, route in lane.lane.expire():
            self._udp_answered(self._lane_asked(query, client, server, arrived, sent, wall, route), None,
                               TimeoutError())
        now = time.monotonic()
        while self._retired and self._retired[0][0] <= now:
            self._retired.pop(0)[1].close()
        self._lane_timer = self._loop.call_later(LANE_TICK, self._lane_tick)

    @staticmethod
    def _lane_asked(query: bytes, client: Address, server: Address, arrived: float, sent: float, wall: float,
                    route: Route) -> _Asked:
        return _Asked(wire.parse_query(query), client, server, "UDP", route.judged, route.endpoint, route.mark,
                      arrived, wall, sent=sent, route=route)

    def _lane_records(self, done: list[tuple[str, float, Address, Route, wire.Answer | None, float, float]]) -> None:
        """Records of what the lane finished, as Python's path makes them."""
        for _kind, wall, client, route, answer, latency, upstream in done:
            if answer is None:  # refused
                self.stats["refused"] += 1
                record = _dns_record(wall, "UDP", client, route.server, route.endpoint, route.judged, route.query,
                                     "denied", "Refused", latency=latency)
            else:
                self.stats["forwarded"] += 1
                record = _dns_record(wall, "UDP", client, route.server, route.endpoint, route.judged, route.query,
                                     _released_verdict(route.judged), answer.rcode_name, answer=answer,
                                     latency=latency, upstream=upstream)
            self._records.append(record)
        self._flush_records()

    def _itself(self, server: Address) -> bool:
        """A query sent straight to the proxy's own port: forwarding it would send it back here."""
        return server[1] == self.port and (server[0] == self.address or server[0].startswith("127."))

    def _udp_ask(self, asked: _Asked) -> None:
        assert self._udp_up is not None

        def answered(answer_wire: bytes | None, error: BaseException | None) -> None:
            self._in_flight -= 1
            self._udp_answered(asked, answer_wire, error)

        try:
            self._udp_up.ask(asked.query.wire, asked.server, asked.mark, answered)
        except OSError as e:
            self._reply_udp(self._failed(asked, e), asked.client, asked.server)
            return
        self._in_flight += 1

    def _udp_answered(self, asked: _Asked, answer_wire: bytes | None, error: BaseException | None) -> None:
        """The server's answer (or the error instead): read, learned if new, released."""
        if answer_wire is None:
            self._reply_udp(self._failed(asked, error), asked.client, asked.server)
            return
        read = self._read(asked, answer_wire)
        if isinstance(read, bytes):
            self._reply_udp(read, asked.client, asked.server)
        elif not self._must_learn(asked, read):
            self._reply_udp(self._release(asked, read, True), asked.client, asked.server)
        else:  # something new: the learner runs off the loop; the answer waits for it
            assert self._loop is not None
            self._in_flight += 1

            def learned(fut: asyncio.Task[bool]) -> None:
                self._in_flight -= 1
                ok = not fut.cancelled() and fut.result()
                self._reply_udp(self._release(asked, read, ok), asked.client, asked.server)

            task = self._loop.create_task(self._learned(asked, read))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(learned)

    def _reply_udp(self, out: bytes, client: Address, server: Address) -> None:
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
                old = self._reply_socks.pop(next(iter(self._reply_socks)))
                if self._lane is None:
                    old.close()
                else:  # the lane's routes and queries may name it: closed once they cannot
                    self._lane.reset(self._lane.policy)
                    self._retired.append((time.monotonic() + self.upstream_timeout + 1.0, old))
            sock = _transparent(socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(server)
            sock.setblocking(False)
            self._reply_socks[server] = sock
        return sock

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
        nothing, the query is dropped). Runs on whatever loop awaits it (the proxy's own UDP
        path does the same steps without a coroutine per query: ``_udp_readable``)."""
        begun = self._begin(data, client, server, protocol)
        if not isinstance(begun, _Asked):
            return begun
        asked = begun
        try:
            if upstream is None:
                answer_wire = await self._udp_once(asked)
            else:
                answer_wire = await self._tcp_upstream(asked.query.wire, server, asked.mark, upstream)
        except (TimeoutError, OSError, EOFError) as e:
            return self._failed(asked, e)
        read = self._read(asked, answer_wire)
        if isinstance(read, bytes):
            return read
        ok = not self._must_learn(asked, read) or await self._learned(asked, read)
        return self._release(asked, read, ok)

    async def _udp_once(self, asked: _Asked) -> bytes:
        """One UDP exchange through the proxy's upstream sockets if this is the proxy's loop, else
        through sockets made for this call (``handle`` awaited elsewhere, as tests do)."""
        loop = asyncio.get_running_loop()
        mine = loop is self._loop and self._udp_up is not None
        upstreams = self._udp_up if mine and self._udp_up is not None else UdpUpstreams(loop, self.upstream_timeout)
        result: asyncio.Future[bytes] = loop.create_future()

        def done(answer_wire: bytes | None, error: BaseException | None) -> None:
            if result.done():
                return
            if answer_wire is not None:
                result.set_result(answer_wire)
            else:
                result.set_exception(error or OSError("no answer"))

        try:
            upstreams.ask(asked.query.wire, asked.server, asked.mark, done)
            return await result
        finally:
            if not mine:
                upstreams.close()

    def _begin(self, data: bytes, client: Address, server: Address, protocol: Protocol) -> bytes | _Asked | None:
        """Parse and judge: the allowed query to forward, or the reply that ends it here
        (REFUSED), or None (malformed: dropped)."""
        asked = self._judge(data, client, server, protocol)
        if asked is None or asked.judged.decision.allowed:
            return asked
        return self._refuse(asked)

    def _judge(self, data: bytes, client: Address, server: Address, protocol: Protocol) -> _Asked | None:
        """The query parsed and judged (None: malformed, dropped and counted)."""
        arrived, now = time.monotonic(), time.time()
        proto = protocol.name
        try:
            query = wire.parse_query(data)
        except wire.Malformed as e:
            self._malformed(proto, client, server, str(e))
            return None
        judged = self.policy.decide(client[0], server[0], server[1], protocol, query.name)
        ep = judged.endpoint
        mark = self.egress_mark | ((ep.identity & 0xFFFF) << 16 if ep is not None else 0)
        return _Asked(query, client, server, proto, judged, ep.name if ep is not None else "", mark, arrived, now,
                      sent=time.monotonic())

    def _refuse(self, asked: _Asked) -> bytes:
        """A denied query: counted, recorded, answered REFUSED (never forwarded)."""
        self.stats["refused"] += 1
        self._record_query(asked, "denied", "Refused")
        return wire.reply(asked.query, wire.REFUSED)

    def _failed(self, asked: _Asked, error: BaseException | None) -> bytes:
        """No answer (timeout, socket error): SERVFAIL."""
        why = "no answer from the server" if isinstance(error, TimeoutError) else f"upstream: {error}"
        self.stats["servfail"] += 1
        self._record_query(asked, "error", "ServFail", why, upstream=time.monotonic() - asked.sent)
        return wire.reply(asked.query, wire.SERVFAIL)

    def _read(self, asked: _Asked, answer_wire: bytes) -> wire.Answer | bytes:
        """The server's answer read, or SERVFAIL if it is not one to this query."""
        asked.took = time.monotonic() - asked.sent
        try:
            return wire.read_answer(asked.query, answer_wire)
        except wire.Malformed as e:
            self.stats["servfail"] += 1
            self._record_query(asked, "error", "ServFail", f"upstream: {e}", upstream=asked.took)
            return wire.reply(asked.query, wire.SERVFAIL)

    def _must_learn(self, asked: _Asked, answer: wire.Answer) -> bool:
        """Whether the answer must wait for the learner: it has addresses, and ``known`` (cheap,
        on the loop) cannot tell that every one of them is in the maps already."""
        if not answer.ips or self.learn is no_learning:
            return False
        if self.known is None:
            return True
        try:
            return not self.known(asked.endpoint, asked.query.name, answer.ips, answer.ttl)
        except Exception:
            _log.exception("DNS proxy: checking %s for %s", asked.query.name, asked.endpoint)
            return True  # the learner decides

    def _release(self, asked: _Asked, answer: wire.Answer, learned: bool) -> bytes:
        """The answer for the client once learning is done (SERVFAIL if it failed)."""
        if not learned:
            self.stats["servfail"] += 1
            self._record_query(asked, "error", "ServFail", "the answer could not be learned", upstream=asked.took)
            return wire.reply(asked.query, wire.SERVFAIL)
        self.stats["forwarded"] += 1
        self._record_query(asked, _released_verdict(asked.judged), answer.rcode_name, answer=answer,
                           upstream=asked.took)
        if asked.route is not None and self._lane is not None:  # its like may go from the lane a while
            self._lane.release(asked.route, answer, time.monotonic())
        return answer.wire  # unchanged: TC, EDNS0 and all

    async def _learned(self, asked: _Asked, answer: wire.Answer) -> bool:
        """Hand the answer to the learner and wait until it returns (the IPs are in the maps)."""
        try:
            await asyncio.get_running_loop().run_in_executor(self._learners, self.learn, asked.endpoint,
                                                             asked.query.name, answer.ips, answer.ttl)
        except Exception:
            _log.exception("DNS proxy: learning %s for %s", asked.query.name, asked.endpoint)
            return False
        return True

    def _record_query(self, asked: _Asked, verdict: str, rcode: str, reason: str | None = None,
                      answer: wire.Answer | None = None, upstream: float = 0.0) -> None:
        self._record(_dns_record(asked.now, asked.protocol, asked.client, asked.server, asked.endpoint, asked.judged,
                                 asked.query, verdict, rcode, reason, answer, time.monotonic() - asked.arrived,
                                 upstream))

    def _malformed(self, proto: str, client: Address, server: Address, why: str) -> None:
        self.stats["malformed"] += 1
        self._record(DNSRecord(time.time(), proto, client, server, self.policy.endpoint_name(client[0]), 0,
                               verdict="error", reason=f"malformed: {why}"))

    def _record(self, rec: DNSRecord) -> None:
        """Records made on the proxy's loop go over once per turn of it (the recorder's locks and
        counters then cost once per batch); elsewhere (``handle`` on another loop) at once."""
        if threading.get_ident() != self._loop_thread or self._loop is None:
            self._hand_over([rec])
            return
        if not self._records:
            self._loop.call_soon(self._flush_records)
        self._records.append(rec)

    def _flush_records(self) -> None:
        records, self._records = self._records, []
        if records:
            self._hand_over(records)

    def _hand_over(self, records: list[DNSRecord]) -> None:
        try:
            self.record(records)
        except Exception:
            _log.exception("DNS proxy: recording flows")


def _dns_record(now: float, protocol: str, client: Address, server: Address, endpoint: str, judged: Judgement,
                query: wire.Query, verdict: str, rcode: str, reason: str | None = None,
                answer: wire.Answer | None = None, latency: float = 0.0, upstream: float = 0.0) -> DNSRecord:
    """The record of one query (Python's path and the lane's alike); ``reason`` defaults to the judgement's."""
    d = judged.decision
    return DNSRecord(now, protocol, client, server, endpoint, judged.peer_identity, query.name, query.qtype, verdict,
                     rcode, answer.ips if answer else (), answer.ttl if answer else 0, answer.cnames if answer else (),
                     d.rule, d.reason if reason is None else reason, latency, upstream)


def _released_verdict(judged: Judgement) -> str:
    return "audit" if judged.decision.audit else "forwarded"


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

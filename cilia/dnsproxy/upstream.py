"""The DNS proxy's UDP side towards the servers: connected sockets per (server, mark), each
registered with the loop once and carrying several queries at a time, told apart by their ids.

A query is sent unchanged (its id included), so two queries with the same id to one server go on
different sockets of that server's pool. An answer is handed to the query's ``done`` callback on
the loop, no task or future per query (asyncio's per-datagram machinery cost more than the rest of
the proxy's work). A query unanswered after ``timeout`` gets ``TimeoutError`` and its socket is
retired (no new queries; closed once its last query ends), so a late answer can never be taken
for the answer to a later query with the same id.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable

Address = tuple[str, int]
Done = Callable[[bytes | None, BaseException | None], None]  # (answer, None) or (None, error)

SO_MARK = 36
MAX_UDP = 65535
IDLE_MAX = 64  # sockets without a query kept per (server, mark)
SOCKETS_MAX = 1024  # per (server, mark): this many queries with one id in flight, no more
RECV_BURST = 64  # answers read per wakeup before the loop serves the others


class _Channel:
    """One connected socket and the queries waiting on it, by id."""

    __slots__ = ("sock", "key", "pending", "retired")

    def __init__(self, sock: socket.socket, key: tuple[Address, int]) -> None:
        self.sock = sock
        self.key = key
        self.pending: dict[bytes, Done] = {}
        self.retired = False


class UdpUpstreams:
    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self._pools: dict[tuple[Address, int], list[_Channel]] = {}
        self._deadlines: deque[tuple[float, _Channel, bytes, Done]] = deque()  # in sending order
        self._timer: asyncio.TimerHandle | None = None
        self._tick = min(0.05, timeout / 10)  # expiry is checked this often at most

    def ask(self, query: bytes, server: Address, mark: int, done: Done) -> None:
        """Send ``query`` to ``server`` from a socket marked ``mark``; ``done`` gets its answer
        (or the error) later, on the loop. Raises OSError if it could not be sent."""
        qid = query[:2]
        channel = self._channel((server, mark), qid)
        channel.sock.send(query)
        channel.pending[qid] = done
        self._deadlines.append((self.loop.time() + self.timeout, channel, qid, done))
        if self._timer is None:
            self._timer = self.loop.call_later(self.timeout + self._tick, self._expire)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for pool in self._pools.values():
            for channel in pool:
                self._close(channel)
        self._pools.clear()
        self._deadlines.clear()

    def _channel(self, key: tuple[Address, int], qid: bytes) -> _Channel:
        pool = self._pools.setdefault(key, [])
        for channel in pool:
            if qid not in channel.pending:
                return channel
        if len(pool) >= SOCKETS_MAX:
            raise OSError(f"{SOCKETS_MAX} queries with one id in flight to {key[0][0]}:{key[0][1]}")
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, key[1])
            sock.connect(key[0])
        except OSError:
            sock.close()
            raise
        channel = _Channel(sock, key)
        self.loop.add_reader(sock.fileno(), self._readable, channel)
        pool.append(channel)
        return channel

    def _readable(self, channel: _Channel) -> None:
        for _ in range(RECV_BURST):
            try:
                data = channel.sock.recv(MAX_UDP)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # e.g. ICMP port unreachable: nobody serves DNS there; all of them fail
                waiting = list(channel.pending.values())
                channel.pending.clear()
                for done in waiting:
                    done(None, e)
                self._settled(channel)
                return
            callback = channel.pending.pop(data[:2], None)
            if callback is None:
                continue  # no query of that id waits here: not an answer of ours
            callback(data, None)
            if not channel.pending:  # nothing more awaited here: no read to learn that (a datagram
                self._settled(channel)  # left over wakes the loop again)
                return

    def _settled(self, channel: _Channel) -> bool:
        """``channel`` has no query left: close it if retired or one too many idle (True: closed)."""
        pool = self._pools.get(channel.key)
        if channel.retired:
            self._close(channel)
            return True
        if pool is not None and len(pool) > IDLE_MAX:
            pool.remove(channel)
            self._close(channel)
            return True
        return False

    def _expire(self) -> None:
        self._timer = None
        now = self.loop.time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, channel, qid, done = deadlines.popleft()
            if channel.pending.get(qid) is not done:
                continue  # answered (or failed) already
            del channel.pending[qid]
            self._retire(channel)
            done(None, TimeoutError())
        if deadlines:
            self._timer = self.loop.call_at(max(deadlines[0][0], now + self._tick), self._expire)

    def _retire(self, channel: _Channel) -> None:
        if not channel.retired:
            channel.retired = True
            pool = self._pools.get(channel.key)
            if pool is not None and channel in pool:
                pool.remove(channel)
        if not channel.pending:
            self._close(channel)

    def _close(self, channel: _Channel) -> None:
        if channel.sock.fileno() >= 0:
            self.loop.remove_reader(channel.sock.fileno())
            channel.sock.close()

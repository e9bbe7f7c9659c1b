"""What the fast lane (``lane.c``) may pass on without Python, and the lane itself.

A route is a query Python judged: the same bytes (after the id) from the same client address to
the same server are judged the same under one policy snapshot, so the lane answers REFUSED or
forwards them itself. A released answer is one Python read, learned and let go on a route: the
same bytes (after the id) on that route may go back to the client from the lane for
``RELEASE_FOR`` seconds; after that one goes through Python again (``known`` moves the learned
name's expiry, a new revision may have removed it). Every new policy snapshot starts both tables
over (``reset``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from . import wire
from .policy import Judgement
from .upstream import SO_MARK

Address = tuple[str, int]

RELEASE_FOR = 1.0  # seconds a released answer is passed on without Python
ROUTES_MAX = 65_536  # routes (and released answers) kept; beyond, the tables start over
CHANNELS_MAX = 256  # lane.c's MAX_CHANNELS: upstream sockets, one per (server, mark)


@dataclass(frozen=True, slots=True)
class Route:
    """One judged query shape: what the lane's records and Python's late steps need."""

    id: int
    query: wire.Query  # as first asked (its id is not the one of later queries)
    server: Address
    judged: Judgement
    endpoint: str
    mark: int


class LaneTables:
    def __init__(self, module: Any, inbound: socket.socket, timeout: float, max_in_flight: int) -> None:
        self.routes: dict[bytes, tuple[int, int, int, bytes | None, Route]] = {}
        self.released: dict[bytes, tuple[float, wire.Answer]] = {}
        self.lane = module.Lane(inbound.fileno(), self.routes, self.released, timeout, max_in_flight)
        self.policy: object | None = None  # the snapshot the tables were made under
        self._channels: dict[tuple[Address, int], int] = {}
        self._sockets: list[socket.socket] = []
        self._next_id = 0

    def fileno(self) -> int:
        return int(self.lane.fileno())

    def reset(self, policy: object) -> None:
        self.routes.clear()
        self.released.clear()
        self.policy = policy

    def add(self, data: bytes, client: Address, server: Address, query: wire.Query, judged: Judgement,
            endpoint: str, mark: int, reply_fd: int, refused: bytes | None) -> Route | None:
        """Let the lane handle queries like ``data`` from ``client`` to ``server`` (None: it cannot)."""
        try:
            key = socket.inet_aton(client[0]) + socket.inet_aton(server[0]) + server[1].to_bytes(2, "big") + data[2:]
            channel = -1 if refused is not None else self._channel(server, mark)
        except OSError:
            return None
        if channel is None:
            return None
        if len(self.routes) >= ROUTES_MAX:
            self.routes.clear()
        self._next_id += 1
        route = Route(self._next_id, query, server, judged, endpoint, mark)
        self.routes[key] = (channel, reply_fd, route.id, refused[2:] if refused is not None else None, route)
        return route

    def release(self, route: Route, answer: wire.Answer, now: float) -> None:
        """Python let ``answer`` go on ``route``: its like may go from the lane for a while."""
        if len(self.released) >= ROUTES_MAX:
            self.released.clear()
        self.released[route.id.to_bytes(4, "big") + answer.wire[2:]] = (now + RELEASE_FOR, answer)

    def _channel(self, server: Address, mark: int) -> int | None:
        index = self._channels.get((server, mark))
        if index is None:
            if len(self._channels) >= CHANNELS_MAX:
                return None
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
                sock.connect(server)
                index = self._channels[(server, mark)] = int(self.lane.add_channel(sock.fileno()))
            except OSError:
                sock.close()
                raise
            self._sockets.append(sock)
        return index

    def stats(self) -> dict[str, int]:
        return {f"lane_{k}": v for k, v in self.lane.stats().items()}

    def close(self) -> None:
        self.lane.close()
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self._channels.clear()
        self.reset(None)

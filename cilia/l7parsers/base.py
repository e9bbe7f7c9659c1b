"""The data-path half of an L7 protocol: a sans-I/O parser per TCP connection (h11's model).

Bytes in, decisions and bytes out; no sockets, no asyncio, no grpc. The host (the network
ext_proc service in the agent, or a test relay) feeds each chunk a side sent and writes what
comes back::

    conn = MemcacheConnection(check)          # check: L7Request -> Decision (the endpoint's policy)
    out = conn.receive_client(chunk)          # bytes the client sent (b"" = the client closed)
    send_to_server(out.to_server); send_to_client(out.to_client)
    out = conn.receive_server(chunk)          # bytes the server sent (b"" = the server closed)
    send_to_client(out.to_client); send_to_server(out.to_server)

Chunks are TCP reads, not messages: a parser buffers partial frames and handles many frames
per chunk; a byte is forwarded only once the frame holding it has been read whole and allowed,
so nothing unread ever passes. A request is allowed when every ``L7Request`` it carries is
(one per key of a multi-key get, per statement of a batch; a Kafka request carries its topics);
a denied one is answered with the protocol's own error, in reply order (``ReplyQueue``), and the
connection stays usable. Bytes that cannot be parsed raise ``ProtocolError``: the host closes the
connection and logs it; it never passes.

Every request yields a ``Record`` (its summary fields and the decision) for flow logs and
metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from cilia.policy.flows import L7Request

DEFAULT_MAX_BUFFER = 16 << 20  # bytes of one unfinished frame a parser holds before giving up


@dataclass(frozen=True, slots=True)
class Decision:
    """Policy's answer for one request: allowed or not, the deciding rule (policy, path and
    file:line, for flow records) and why. ``audit``: allowed only because the endpoint is in
    audit mode; the policy would have denied it."""

    allowed: bool
    rule: str = ""
    reason: str = ""
    audit: bool = False


#: The endpoint's policy for the connection's peer, as a function of one request.
Check = Callable[[L7Request], Decision]


def allow_all(_request: L7Request) -> Decision:
    return Decision(True, "", "no policy")


NO_POLICY_DECISION = Decision(True, "", "not a request policy applies to")


def decide(check: Check, requests: Sequence[L7Request]) -> Decision:
    """All of ``requests`` must be allowed; the first denial decides, else the allowing rules
    together. No requests (a handshake, an options frame): allowed without policy."""
    if not requests:
        return NO_POLICY_DECISION
    rules: list[str] = []
    reasons: list[str] = []
    audited: Decision | None = None
    for request in requests:
        d = check(request)
        if not d.allowed:
            return d
        if d.audit and audited is None:
            audited = d  # the first request the policy would have denied names the decision
        if d.rule and d.rule not in rules:
            rules.append(d.rule)
        if d.reason and d.reason not in reasons:
            reasons.append(d.reason)
    return audited or Decision(True, "; ".join(rules), "; ".join(reasons))


@dataclass(frozen=True, slots=True)
class Record:
    """One request as a flow record: its protocol fields (e.g. ``{"command": "get", "key": "a"}``,
    ``{"api_key": "produce", "topic": "t1,t2"}``, ``{"query_action": "select", "query_table":
    "ks.t"}``) and what policy decided. ``handshake``: a protocol step the parser answered itself
    without asking policy (a Cassandra version refused so the driver falls back): a flow, not a
    policy drop."""

    summary: Mapping[str, str]
    decision: Decision
    handshake: bool = False


@dataclass(frozen=True, slots=True)
class Output:
    """What to write after feeding a chunk: bytes for each side and the requests decided."""

    to_server: bytes = b""
    to_client: bytes = b""
    records: tuple[Record, ...] = ()

    def __add__(self, other: Output) -> Output:
        return Output(self.to_server + other.to_server, self.to_client + other.to_client,
                      self.records + other.records)


class ProtocolError(Exception):
    """The peer on ``side`` ("client" or "server") sent bytes that cannot be parsed. The host
    closes the connection; the connection object must not be fed again."""

    def __init__(self, side: str, message: str) -> None:
        super().__init__(f"{side}: {message}")
        self.side = side
        self.message = message


class L7Connection(ABC):
    """One TCP connection's parser state. Subclasses set ``protocol`` (the l7proto name, or
    ``kafka``) and implement both directions; after a ProtocolError the object is spent."""

    protocol: ClassVar[str]

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        self.check = check
        self.max_buffer = max_buffer

    @abstractmethod
    def receive_client(self, data: bytes) -> Output:
        """Bytes the client sent (``b""``: it closed its side)."""

    @abstractmethod
    def receive_server(self, data: bytes) -> Output:
        """Bytes the server sent (``b""``: it closed its side)."""


class FramedConnection(L7Connection):
    """An ``L7Connection`` whose subclasses read each side in ``_from_client``/``_from_server``:
    empty chunks (a side closing) are ignored, and after a ProtocolError the connection stays
    failed (h11's rule), so a host feeding it again gets the first error back."""

    def __init__(self, check: Check, max_buffer: int = DEFAULT_MAX_BUFFER) -> None:
        super().__init__(check, max_buffer)
        self._failed: ProtocolError | None = None

    def receive_client(self, data: bytes) -> Output:
        return self._guard(self._from_client, data)

    def receive_server(self, data: bytes) -> Output:
        return self._guard(self._from_server, data)

    @abstractmethod
    def _from_client(self, data: bytes) -> Output: ...

    @abstractmethod
    def _from_server(self, data: bytes) -> Output: ...

    def _guard(self, receive: Callable[[bytes], Output], data: bytes) -> Output:
        if self._failed is not None:
            raise ProtocolError(self._failed.side, f"fed after failing ({self._failed.message})")
        if not data:
            return Output()
        try:
            return receive(data)
        except ProtocolError as e:
            self._failed = e
            raise


@dataclass
class ReplyQueue:
    """Replies owed to the client, in request order: a forwarded request's reply will come from
    the server; a denied request's reply is made here and must not overtake earlier ones.

    ``forwarded()`` when a request that the server will answer is sent on; ``denied(reply)``
    returns the bytes to send now (``reply`` itself if nothing is outstanding, else ``b""`` and
    it waits); ``replied()`` when the server finished the oldest outstanding reply returns the
    denials that are now due (to be sent right after that reply's bytes)."""

    _slots: list[bytes | None] = field(default_factory=list)  # None: the server's reply

    def forwarded(self) -> None:
        self._slots.append(None)

    def denied(self, reply: bytes) -> bytes:
        if not self._slots:
            return reply
        self._slots.append(reply)
        return b""

    def replied(self) -> bytes:
        """The server completed its oldest outstanding reply. Raises ProtocolError if none was
        outstanding (the server answered a request nobody sent)."""
        if not self._slots or self._slots[0] is not None:
            raise ProtocolError("server", "a reply to no outstanding request")
        self._slots.pop(0)
        due = b""
        while self._slots and self._slots[0] is not None:
            due += self._slots.pop(0) or b""
        return due

    @property
    def outstanding(self) -> int:
        return sum(1 for s in self._slots if s is None)

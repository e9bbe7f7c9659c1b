"""The Python that runs inside Envoy: cilia's L7 parsers behind the ``cilia_l7`` dynamic module.

``cilia_l7.c`` calls ``new_filter_config`` once per listener filter (on Envoy's main thread) and,
on the connection's worker thread, ``FilterConfig.connection()`` per TCP connection and
``Connection.read``/``write`` per chunk, with the GIL held. Each answers what the ext_proc
service (``cilia.envoy.l7service.StreamHandler``) answers, through the same parser classes and
the same ``check_for``: bytes to pass on in the chunk's direction, bytes to answer the sender
with (a denial, in reply order), and whether to close the connection (a parse error, a
connection whose endpoint or peer is unknown, no parser for the protocol: fail closed).

The connection's listener, direction, port and protocol come from ``filter_config`` (JSON); the
peer identity and local endpoint from the naming RBAC filters' dynamic metadata, and the
connection's client and server-side addresses from Envoy, both read through ``_cilia_inproc``
(the module's built-in) at the first chunk. Policy comes from the agent over
``AgentLink`` (the whole ``PolicyViews`` at every publish; a connection meets a new revision at
its next chunk), and decided requests go back to it in batches.

A Python exception closes only its connection and is counted; the module times every call and
counts those over 10 ms as slow (they stalled every connection of that Envoy worker).
"""

from __future__ import annotations

import gc
from collections import deque
import importlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import Protocol

from cilia.envoy.metadata import LOCAL_PREFIX, NO_LOCAL, PEER_PREFIX, RBAC_NAMESPACE, naming_key
from cilia.l7parsers.base import Check, Decision, L7Connection, Output, ProtocolError, Record
from cilia.l7parsers.registry import ConnectionFactory, connection_factory
from cilia.policy.flows import L7Request
from cilia.envoy.l7service import ConnectionInfo
from cilia.envoy.l7views import PolicyViews, check_for

_log = logging.getLogger("cilia.envoy.inproc")

#: (same direction, reply to the sender, close) as the module reads it; None: the chunk passes unchanged
Answer = tuple[bytes, bytes, int] | None
Metadata = Callable[[str, str], "str | None"]
#: the running connection's (client, server side) addresses as ``ip:port`` ("" when unknown)
Addresses = Callable[[], tuple[str, str]]

FLUSH_SECONDS = 0.05  # records go to the agent this often
HEARTBEAT_SECONDS = 1.0  # ... and a report at least this often, records or not
FIRST_VIEWS_SECONDS = 5.0  # a new listener waits this long for the agent's first policy
_PEER_KEY = naming_key(PEER_PREFIX)
_LOCAL_KEY = naming_key(LOCAL_PREFIX)
_EMPTY = Output()
MEMO_SIZE = 4096  # decisions kept per (policy revision, endpoint, peer) before starting over
#: parsers with a fast path in front (same decisions and bytes: tests/l7parsers/test_*_fast.py), as
#: (module, class): imported at first use, after ``use_compiled`` put the compiled modules in front
FAST = {"memcache": ("cilia.l7parsers.memcache_fast", "FastMemcacheConnection"),
        "kafka": ("cilia.l7parsers.kafka_fast", "FastKafkaConnection"),
        "cassandra": ("cilia.l7parsers.cassandra_fast", "FastCassandraConnection")}
_CONFIG_FIELDS = {"listener": str, "direction": str, "port": int, "protocol": str, "agent": str}


def use_compiled(module_dir: str) -> bool:
    """Put the mypyc-compiled parser modules (``build.build_compiled``) in front of the pure-Python
    ones, if they were built from exactly the sources here; else the pure ones stay."""
    import cilia.l7parsers
    from cilia.envoy.inproc.build import COMPILED_DIR, source_hashes

    compiled = Path(module_dir) / COMPILED_DIR
    root = Path(cilia.__file__).resolve().parents[1]
    try:
        if json.loads((compiled / "stamp.json").read_text(encoding="utf-8")) != source_hashes(root):
            _log.warning("compiled parser modules in %s are stale: using the pure-Python ones", compiled)
            return False
    except (OSError, ValueError):
        return False
    if any(name.startswith("cilia.l7parsers.kafka") for name in sys.modules):
        return False  # too late: already imported
    sys.path.append(str(compiled))  # the modules' shared mypyc runtime
    cilia.l7parsers.__path__.insert(0, str(compiled / "cilia" / "l7parsers"))
    return True


class PolicyLink(Protocol):
    """Where a filter's connections get policy and leave records (``AgentLink`` inside Envoy)."""

    views: PolicyViews
    counters: dict[str, int]

    def add(self, info: ConnectionInfo, records: tuple[Record, ...]) -> None: ...


class AgentLink:
    """This interpreter's connection to the agent (``cilia.envoy.inproc.channel``): the current
    ``PolicyViews`` in, records and counters out. Reconnects when the agent restarts; until the
    first views arrive, every connection meets an empty policy (which denies everything)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.views = PolicyViews()
        self.has_views = threading.Event()
        # chunks, python_us (with the GIL held) and slow ones come from the module's own count
        self.counters = {"connections": 0, "errors": 0, "slow": 0, "closed": 0, "chunks": 0, "python_us": 0}
        # workers append, the reporter pops: deque ends are thread-safe, so nothing falls between
        self._pending: deque[tuple[float, ConnectionInfo, tuple[Record, ...]]] = deque()
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        threading.Thread(target=self._receive, name="cilia-inproc-views", daemon=True).start()
        threading.Thread(target=self._report, name="cilia-inproc-records", daemon=True).start()

    def add(self, info: ConnectionInfo, records: tuple[Record, ...]) -> None:
        self._pending.append((time.time(), info, records))

    def _receive(self) -> None:
        while True:
            try:
                conn = Client(self.address.removeprefix("unix:"), family="AF_UNIX")
            except OSError:
                time.sleep(0.2)  # the agent is not (yet, or no longer) there
                continue
            with self._send_lock:
                self._conn = conn
                conn.send(("hello", os.getpid()))
            try:
                while True:
                    views = conn.recv()
                    if isinstance(views, PolicyViews):
                        self.views = views  # replaced whole: a connection never sees half a change
                        gc.freeze()  # the views live long: keep the collector from walking them
                        self.has_views.set()
            except (EOFError, OSError):
                with self._send_lock:
                    self._conn = None
                conn.close()

    def _count_chunks(self) -> None:
        try:
            chunks, nanoseconds, slow = importlib.import_module("_cilia_inproc").stats()
        except ImportError:
            return  # not inside Envoy
        self.counters.update(chunks=chunks, python_us=nanoseconds // 1000, slow=slow, compiled=int(COMPILED))

    def _report(self) -> None:
        last = 0.0
        while True:
            time.sleep(FLUSH_SECONDS)
            if not self._pending and time.monotonic() - last < HEARTBEAT_SECONDS:
                continue
            batch: list[tuple[float, ConnectionInfo, Record]] = []
            for _ in range(len(self._pending)):
                when, info, records = self._pending.popleft()
                batch += ((when, info, r) for r in records)
            self._count_chunks()
            with self._send_lock:
                if self._conn is None:
                    continue  # records made while the agent is away are dropped; the data path goes on
                try:
                    self._conn.send(("report", dict(self.counters), batch))
                    last = time.monotonic()
                except OSError:
                    pass


def _inside_envoy() -> None:
    try:
        module = importlib.import_module("_cilia_inproc")
    except ImportError:
        return  # imported outside Envoy (tests, the agent): nothing to set up
    global COMPILED
    COMPILED = use_compiled(module.MODULE_DIR)


COMPILED = False  # whether the mypyc-compiled parser modules are in use (reported to the agent)
_inside_envoy()
_links: dict[str, AgentLink] = {}
_links_lock = threading.Lock()


def fast_factory(protocol: str) -> ConnectionFactory | None:
    """The connection class with the fast path for ``protocol``, if it has one."""
    where = FAST.get(protocol)
    if where is None:
        return None
    factory: ConnectionFactory = getattr(importlib.import_module(where[0]), where[1])
    return factory


def link_for(address: str) -> AgentLink:
    with _links_lock:
        link = _links.get(address)
        if link is None:
            link = _links[address] = AgentLink(address)
    return link


def _envoy_metadata() -> Metadata:
    module = importlib.import_module("_cilia_inproc")  # only inside Envoy
    read: Metadata = module.dynamic_metadata
    return read


def ip_port(address: tuple[str, int] | None) -> str:
    """Envoy's ``ip:port`` text of an (ip, port), as its access-log formatters write it
    (``[ipv6]:port``); "" for no address (a connection that is not over IP)."""
    if address is None:
        return ""
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _envoy_addresses() -> Addresses:
    module = importlib.import_module("_cilia_inproc")  # only inside Envoy
    read = getattr(module, "addresses", None)
    if read is None:  # a module built before it offered them: flows go without addresses
        return lambda: ("", "")

    def addresses() -> tuple[str, str]:
        remote, local = read()
        return ip_port(remote), ip_port(local)

    return addresses


class FilterConfig:
    """One listener filter's configuration: what its connections are, and where policy comes from."""

    def __init__(self, listener: str, direction: str, port: int, protocol: str, link: PolicyLink,
                 metadata: Metadata | None = None, addresses: Addresses | None = None,
                 factory_of: Callable[[str], ConnectionFactory | None] = connection_factory) -> None:
        self.listener, self.direction, self.port, self.protocol = listener, direction, port, protocol
        self.link = link
        self.metadata = metadata or _envoy_metadata()
        self.addresses = addresses or _envoy_addresses()
        self.factory = fast_factory(protocol) or factory_of(protocol)  # once; None closes every connection
        self._checks: dict[tuple[int, str, int], Check] = {}  # this revision's, by (endpoint, peer)

    def check(self, views: PolicyViews, info: ConnectionInfo) -> Check:
        """The connection's policy, its decisions memoized for every connection of the same
        endpoint and peer until the policy changes."""
        key = (views.revision, info.endpoint, info.peer_identity)
        check = self._checks.get(key)
        if check is None:
            if self._checks and next(iter(self._checks))[0] != views.revision:
                self._checks.clear()
            check = self._checks[key] = memoized(check_for(views, info))
        return check

    def connection(self) -> FilterConnection:
        self.link.counters["connections"] += 1
        return FilterConnection(self)


def memoized(check: Check) -> Check:
    """``check`` remembering its answers (requests are frozen values; policy is the same for as
    long as the returned function is used)."""
    cache: dict[L7Request, Decision] = {}

    def remembered(request: L7Request) -> Decision:
        try:
            return cache[request]
        except KeyError:
            pass
        except TypeError:  # a request holding something unhashable: decide it every time
            return check(request)
        if len(cache) >= MEMO_SIZE:
            cache.clear()
        decision = cache[request] = check(request)
        return decision

    return remembered


def new_filter_config(name: str, config: bytes) -> FilterConfig:
    """``filter_config`` is JSON: listener, direction, port, protocol, agent (``unix`` path of
    the agent's channel). A bad one raises: Envoy rejects the listener."""
    try:
        fields = json.loads(config)
    except ValueError as e:
        raise ValueError(f"filter {name}: filter_config is not JSON: {e}") from None
    if not isinstance(fields, dict):
        raise ValueError(f"filter {name}: filter_config must be a JSON object")
    for key, kind in _CONFIG_FIELDS.items():
        if not isinstance(fields.get(key), kind):
            raise ValueError(f"filter {name}: filter_config.{key} must be a {kind.__name__}")
    if fields["direction"] not in ("ingress", "egress"):
        raise ValueError(f"filter {name}: filter_config.direction must be ingress or egress")
    link = link_for(fields["agent"])
    if not link.has_views.wait(FIRST_VIEWS_SECONDS):
        _log.warning("%s: no policy from the agent at %s yet: connections are denied until it comes",
                     fields["listener"], fields["agent"])
    return FilterConfig(fields["listener"], fields["direction"], fields["port"], fields["protocol"], link)


class _Refused(Exception):
    pass


class FilterConnection:
    """One TCP connection: its parser, opened at the first chunk (the naming RBAC filters have
    run by then), and the policy revision its parser checks against."""

    __slots__ = ("config", "link", "info", "conn", "revision", "closed")

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.link = config.link
        self.info: ConnectionInfo | None = None
        self.conn: L7Connection | None = None
        self.revision = -1
        self.closed = False

    def read(self, data: bytes, end_stream: bool) -> Answer:
        """A chunk from the client: (bytes for the server, reply to the client, close)."""
        conn = self.conn
        if conn is None or end_stream or not data or self.revision != self.link.views.revision:
            return self._chunk(data, end_stream, True)
        try:  # the common case, kept short: an open connection, the same policy, a chunk of data
            out = conn.receive_client(data)
        except Exception as e:
            return self._failed(e)
        if out.records:
            self.link.add(self.info, out.records)  # type: ignore[arg-type]  # set with conn
        return (out.to_server, out.to_client, 0)

    def write(self, data: bytes, end_stream: bool) -> Answer:
        """A chunk from the server: (bytes for the client, b"", close)."""
        conn = self.conn
        if conn is None or end_stream or not data or self.revision != self.link.views.revision:
            return self._chunk(data, end_stream, False)
        try:
            out = conn.receive_server(data)
            if out.to_server:  # nothing in flight could carry it: a parser must not answer the server
                raise ProtocolError("server", "the parser wanted to answer the server")
        except Exception as e:
            return self._failed(e)
        if out.records:
            self.link.add(self.info, out.records)  # type: ignore[arg-type]
        return (out.to_client, b"", 0)

    def close(self) -> None:
        if not self.closed:
            self.link.counters["closed"] += 1
        self.closed = True
        self.conn = None

    def _chunk(self, data: bytes, end_stream: bool, from_client: bool) -> Answer:
        """Any chunk: opens the parser, meets a new policy, passes on the end of a side."""
        if self.closed:
            return (b"", b"", 1)
        try:
            conn = self.conn or self._open()
            views = self.link.views
            if views.revision != self.revision:  # policy changed: the next request meets the new one
                assert self.info is not None
                self.revision = views.revision
                conn.check = self.config.check(views, self.info)
            receive = conn.receive_client if from_client else conn.receive_server
            out = receive(data) if data else _EMPTY
            if end_stream:
                out = out + receive(b"")
            if out.records:
                assert self.info is not None
                self.link.add(self.info, out.records)
            if from_client:
                return (out.to_server, out.to_client, 0)
            if out.to_server:
                raise ProtocolError("server", "the parser wanted to answer the server")
            return (out.to_client, b"", 0)
        except Exception as e:
            return self._failed(e)

    def _failed(self, e: Exception) -> Answer:
        if isinstance(e, ProtocolError):
            return self._fail(f"unparseable {e.side} data: {e.message}", record=True)
        if isinstance(e, _Refused):
            return self._fail(str(e))
        # a bug in a parser: this connection closes, the others go on
        self.link.counters["errors"] += 1
        _log.error("L7 %s: parser error", self.config.listener, exc_info=e)
        return self._fail(f"{type(e).__name__}: {e}", record=True)

    def _open(self) -> L7Connection:
        cfg = self.config
        peer = cfg.metadata(RBAC_NAMESPACE, _PEER_KEY)
        local = cfg.metadata(RBAC_NAMESPACE, _LOCAL_KEY)
        try:
            peer_identity = int(peer) if peer is not None else -1
        except ValueError:
            peer_identity = -1
        source, destination = cfg.addresses()
        self.info = ConnectionInfo(cfg.listener, cfg.direction, cfg.port, cfg.protocol, local or "", peer_identity,
                                   source, destination)
        if self.info.endpoint in ("", NO_LOCAL) or peer_identity < 0:
            raise _Refused(f"{cfg.listener}: the connection's endpoint or peer is unknown")
        if cfg.factory is None:
            raise _Refused(f"{cfg.listener}: no parser for {cfg.protocol!r} is installed")
        views = cfg.link.views
        self.revision = views.revision
        self.conn = cfg.factory(cfg.check(views, self.info))
        return self.conn

    def _fail(self, why: str, record: bool = False) -> Answer:
        self.closed = True
        self.conn = None
        _log.warning("L7 %s: closing the connection: %s", self.config.listener, why)
        if record and self.info is not None:
            self.link.add(self.info, (Record({"error": why}, Decision(False, "", why)),))
        return (b"", b"", 1)


__all__ = ["AgentLink", "FilterConfig", "FilterConnection", "PolicyLink", "link_for", "memoized", "new_filter_config"]

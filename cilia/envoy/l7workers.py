"""The L7 service on several processes, for more than one Python interpreter's worth of parsing.

One grpc.aio L7 service answers Envoy's network ext_proc streams at about 5,000 requests a second
in one process (bench/README.md); ``cilia agent --l7-workers N`` runs N worker processes instead,
each serving on a socket of its own, and Envoy's L7 cluster spreads connections over them (each
TCP connection is one stream, so it stays with one worker and one parser).

The agent sends every worker the whole ``PolicyViews`` at each publish (pickled over a pipe);
workers send back what their parsers decided, in batches, for flows and metrics. A worker says
``READY`` once its gRPC server listens; until every worker has, the pool is not ready (health says
so). A worker that dies takes its connections with it (Envoy closes them: fail closed), is not
ready, and is started again.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import socket
import threading
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from cilia.l7parsers.base import Record

from .l7service import ConnectionInfo, L7Server
from .l7views import PolicyViews, ViewSource

_log = logging.getLogger(__name__)

RecordCallback = Callable[[float, ConnectionInfo, Record], None]
FLUSH_SECONDS = 0.05  # how often a worker sends its parsers' records
READY = "ready"  # a worker's first message: its server listens on its socket


def worker_main(address: str, conn: Connection, group: int | None = None) -> None:
    """A worker process: serve ``address`` with the policy the agent sends on ``conn``."""
    source = ViewSource()
    pending: list[tuple[float, ConnectionInfo, Record]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sink(info: ConnectionInfo, record: Record) -> None:
        with lock:
            pending.append((time.time(), info, record))

    def flush() -> None:
        while not stop.wait(FLUSH_SECONDS):
            with lock:
                batch = pending[:]
                pending.clear()
            if batch:
                try:
                    conn.send(batch)
                except OSError:
                    return

    try:
        source.views = conn.recv()  # the policy first: no stream may meet an empty one
    except (EOFError, OSError):
        return
    if address.startswith("unix:"):  # a dead predecessor's socket file would refuse Envoy
        Path(address.removeprefix("unix:")).unlink(missing_ok=True)
    server = L7Server(source, sink)
    server.add_address(address, group)
    server.start()
    try:
        conn.send(READY)
    except OSError:
        server.stop(0)
        return
    threading.Thread(target=flush, daemon=True).start()
    try:
        while True:
            message = conn.recv()
            if message == "stop":
                break
            source.views = message  # PolicyViews, replaced whole
    except (EOFError, OSError):
        pass  # the agent went away
    finally:
        stop.set()
        server.stop(0)


class WorkerPool:
    def __init__(self, addresses: Sequence[str], on_record: RecordCallback, group: int | None = None) -> None:
        self.addresses = list(addresses)
        self.group = group  # UNIX sockets: 0660 with this group, else 0600
        self.on_record = on_record
        self._ctx = multiprocessing.get_context("spawn")  # the agent runs grpc threads: never fork it
        self._procs: list[Any] = [None] * len(self.addresses)
        self._conns: list[Connection | None] = [None] * len(self.addresses)
        self._ready = [False] * len(self.addresses)  # said READY since it was (re)started
        self._views = PolicyViews()
        self._lock = threading.Lock()
        self._ready_changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._reader: threading.Thread | None = None
        self.restarts = 0

    def start(self) -> None:
        for i in range(len(self.addresses)):
            self._spawn(i)
        self._reader = threading.Thread(target=self._read, name="cilia-l7-workers", daemon=True)
        self._reader.start()

    def _spawn(self, i: int) -> None:
        mine, theirs = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, args=(self.addresses[i], theirs, self.group), name=f"cilia-l7-{i}",
                                 daemon=True)
        proc.start()
        theirs.close()
        mine.send(self._views)  # its policy before any stream reaches it
        self._procs[i], self._conns[i], self._ready[i] = proc, mine, False

    def publish(self, views: PolicyViews) -> None:
        with self._lock:
            self._views = views
            for conn in self._conns:
                if conn is not None:
                    try:
                        conn.send(views)
                    except OSError:
                        pass  # dead: the reader starts it again with these views

    def alive(self) -> int:
        return sum(1 for p in self._procs if p is not None and p.is_alive())

    def ready(self) -> int:
        """How many workers serve now: said READY, still running and their socket takes
        connections (a killed worker's socket is gone a moment before waitpid sees it dead)."""
        with self._lock:
            return sum(1 for p, r, a in zip(self._procs, self._ready, self.addresses, strict=True)
                       if r and p is not None and p.is_alive() and _listening(a))

    def wait_ready(self, timeout: float) -> bool:
        """Block until every worker serves (True) or ``timeout`` seconds pass (False)."""
        deadline = time.monotonic() + timeout
        with self._ready_changed:
            while not all(self._ready):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ready_changed.wait(left)
        return True

    def _read(self) -> None:
        while not self._stop.is_set():
            conns = [c for c in self._conns if c is not None]
            for ready in wait(conns, timeout=0.5):
                assert isinstance(ready, Connection)
                try:
                    batch: list[tuple[float, ConnectionInfo, Record]] | str = ready.recv()
                except (EOFError, OSError):
                    self._restart(ready)
                    continue
                if batch == READY:
                    self._mark_ready(ready)
                    continue
                assert not isinstance(batch, str)
                for when, info, record in batch:
                    try:
                        self.on_record(when, info, record)
                    except Exception:
                        _log.exception("L7 record callback failed")

    def _mark_ready(self, conn: Connection) -> None:
        with self._ready_changed:
            if conn in self._conns:
                self._ready[self._conns.index(conn)] = True
                self._ready_changed.notify_all()

    def _restart(self, conn: Connection) -> None:
        with self._lock:
            if self._stop.is_set() or conn not in self._conns:
                return
            i = self._conns.index(conn)
            conn.close()
            _log.warning("L7 worker %d exited (%s); starting it again", i, self._procs[i].exitcode)
            self.restarts += 1
            self._spawn(i)

    def stop(self) -> None:
        self._stop.set()
        for conn in self._conns:
            if conn is not None:
                try:
                    conn.send("stop")
                except OSError:
                    pass
        for proc in self._procs:
            if proc is not None:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        if self._reader is not None:
            self._reader.join(5)
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._conns = [None] * len(self.addresses)


def _listening(address: str) -> bool:
    """Whether a listener holds this worker address (``unix:PATH``; other kinds are not probed)."""
    if not address.startswith("unix:"):
        return True
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.setblocking(False)
        try:
            s.connect(address[len("unix:"):])
        except BlockingIOError:
            return True  # backlog full: listening, busy
        except OSError as e:
            return e.errno == errno.EAGAIN
        return True

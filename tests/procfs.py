"""What /proc says about a process: alive, running (a zombie does not count), and its start time."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """True while ``pid`` names any process, zombies included (a reaped child is gone)."""
    return os.path.exists(f"/proc/{pid}")


def process_running(pid: int) -> bool:
    """True while any thread of ``pid`` runs. A killed multi-threaded process (Envoy) shows its
    leader as a zombie before its other threads have exited and released its sockets, so the
    process counts as gone only when every thread is a zombie or gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if stat[stat.rindex(b")") + 2:].split()[0] not in (b"Z", b"X"):
            return True
    return False


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat, which the supervisor records next to an Envoy's PID."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[19])

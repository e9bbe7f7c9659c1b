"""What /proc says about a process: alive, running (a zombie does not count), and its start time."""

from __future__ import annotations

import os


def process_exists(pid: int) -> bool:
    """True while ``pid`` names any process, zombies included (a reaped child is gone)."""
    return os.path.exists(f"/proc/{pid}")


def process_running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not reaped yet) does not count."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat, which the supervisor records next to an Envoy's PID."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[19])

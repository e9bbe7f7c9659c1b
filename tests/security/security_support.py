"""Helpers for the security tests: a throwaway unprivileged user, a directory that user can
traverse, code run as that user, and process checks that count a zombie as dead."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"  # the user runs only the standard library


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@contextmanager
def unprivileged_user() -> Iterator[User]:
    """A new system user with no home and no login shell, removed when the block ends."""
    name = f"cilia-e1sec-{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@contextmanager
def traversable_dir() -> Iterator[Path]:
    """A directory every user may enter and list (0755), so that what protects the agent's files
    in it is their own mode, not a private pytest directory above them."""
    path = Path(tempfile.mkdtemp(prefix="cilia-e1sec-", dir="/tmp"))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_as(user: User, code: str, *args: str) -> str:
    """Run Python ``code`` as ``user`` (no supplementary groups, no capabilities); its stdout."""
    res = subprocess.run(["setpriv", f"--reuid={user.uid}", f"--regid={user.gid}", "--clear-groups",
                          SYSTEM_PYTHON, "-I", "-c", code, *args],
                         capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"}, cwd="/")
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


# What a local user tries against an admin address (unix:PATH or host:port): "answered ..." if
# anything talked back, else "refused <exception>".
ADMIN_PROBE = r"""
import socket, sys
address = sys.argv[1]
try:
    if address.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(address[len("unix:"):])
    else:
        host, port = address.rsplit(":", 1)
        s = socket.create_connection((host.strip("[]"), int(port)), timeout=5)
    s.sendall(b"GET /config_dump HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n")
    print("answered", s.recv(64)[:15])
except OSError as e:
    print("refused", type(e).__name__)
"""

READ_PROBE = r"""
import sys
try:
    with open(sys.argv[1], "rb") as f:
        print("read", len(f.read()), "bytes")
except OSError as e:
    print("refused", type(e).__name__)
"""

LIST_PROBE = r"""
import os, sys
print(" ".join(sorted(os.listdir(sys.argv[1]))))
"""


def process_running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not reaped yet) does not count."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2:].split()[0] != b"Z"


def start_time(pid: int) -> int:
    """Field 22 of /proc/PID/stat: what the agent records next to an Envoy's PID."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout}s"
        time.sleep(0.1)


def kill_if_running(pid: int | None) -> None:
    """Cleanup for a process this test started (directly or through its agent)."""
    if pid is not None and process_running(pid):
        os.kill(pid, 9)

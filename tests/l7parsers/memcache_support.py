"""Shared pieces of the memcache parser tests: real policies as Checks (Cilium's example and
small ones of our own), frame builders, and a real memcached on a free port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from tests.helpers import cilium_examples_dir
from tests.l7parsers.policy_support import check_from_policy

from cilia.l7parsers.base import Check
from cilia.netutil import free_port

EXAMPLE_POLICY = cilium_examples_dir() / "memcd-sw-security-policy.yaml"
SERVER_LABELS = "app=memcd-server"

_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: memcache-test
spec:
  endpointSelector:
    matchLabels:
      app: cache
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "11211"
        protocol: TCP
      rules:
        l7proto: memcache
        l7:
"""


def example_check(client_labels: str) -> Check:
    """Cilium's memcached example policy (unchanged) for a client: ``app=a-wing``, ``app=x-wing``
    or ``name=fleet-tracker``."""
    return check_from_policy(EXAMPLE_POLICY.read_text(), client_labels, SERVER_LABELS, 11211,
                             path=str(EXAMPLE_POLICY))


def rules_check(*rules: Mapping[str, str]) -> Check:
    """A policy of our own whose ``l7`` list is ``rules`` (``{}`` allows everything)."""
    text = _POLICY + "".join(f"        - {json.dumps(dict(rule))}\n" for rule in rules)
    return check_from_policy(text, "app=client", "app=cache", 11211)


ALLOW_ALL = rules_check({})
DENY_ALL = rules_check({"command": "misbehave"})  # a command none of the tests send


def binary_request(opcode: int, key: bytes = b"", extras: bytes = b"", value: bytes = b"", opaque: int = 0,
                   cas: int = 0, magic: int = 0x80, data_type: int = 0, status: int = 0) -> bytes:
    """A binary frame (a response with magic 0x81 and ``status``)."""
    body = extras + key + value
    return struct.pack(">BBHBBHIIQ", magic, opcode, len(key), len(extras), data_type, status, len(body), opaque,
                       cas) + body


def binary_response(opcode: int, status: int = 0, key: bytes = b"", extras: bytes = b"", value: bytes = b"",
                    opaque: int = 0, cas: int = 0) -> bytes:
    return binary_request(opcode, key, extras, value, opaque, cas, magic=0x81, status=status)


MEMCACHED = "/usr/bin/memcached"


@contextmanager
def memcached(host: str = "127.0.0.1") -> Iterator[int]:
    """A real memcached 1.6 (text and binary, ``-B auto``) on a free loopback port (on ``host``,
    e.g. ``0.0.0.0`` behind a sidecar that forwards to the endpoint's own address); stopped by PID.
    A port found free can be taken before memcached binds it (it then exits 71, EX_OSERR): that
    start is retried on another port."""
    binary = MEMCACHED if os.path.exists(MEMCACHED) else shutil.which("memcached")
    assert binary, "memcached is not installed (scripts/setup.sh installs it)"
    for attempt in range(5):
        port = free_port(host)
        args = [binary, "-l", host, "-p", str(port), "-U", "0", "-B", "auto", "-t", "2", "-m", "64"]
        if os.geteuid() == 0:
            args += ["-u", "root"]  # memcached refuses to run as root without it
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            if _listening(proc, port):
                break
        except BaseException:
            _stop(proc)
            raise
        _stop(proc)
        assert proc.returncode == 71 and attempt < 4, f"memcached exited with {proc.returncode}"
    try:
        yield port
    finally:
        _stop(proc)


def _listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    """Wait until memcached answers on ``port``; False if it exited first (its port was taken)."""
    deadline = time.monotonic() + 10
    while proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            assert time.monotonic() < deadline, "memcached did not start listening"
            time.sleep(0.02)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class BoundSockets:
    """A ``socket_module`` for pymemcache whose sockets leave from ``source`` (where a client's
    address is its identity)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def socket(self, *args: Any) -> socket.socket:
        s = socket.socket(*args)
        s.bind((self.source, 0))
        return s

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

"""Shared pieces of the memcache parser tests: real policies as Checks (Cilium's example and
small ones of our own), feeding helpers, and a real memcached on a free port."""

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

from helpers import cilium_examples_dir
from policy_support import check_from_policy

from cilia.l7parsers.base import Check, L7Connection, Output

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


def feed(conn: L7Connection, data: bytes, chunk: int = 0, side: str = "client") -> Output:
    """Feed ``data`` whole (chunk 0) or in pieces of ``chunk`` bytes; the outputs added up."""
    receive = conn.receive_client if side == "client" else conn.receive_server
    if not chunk:
        return receive(data)
    out = Output()
    for i in range(0, len(data), chunk):
        out = out + receive(data[i:i + chunk])
    return out


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def memcached(host: str = "127.0.0.1") -> Iterator[int]:
    """A real memcached 1.6 (text and binary, ``-B auto``) on a free loopback port (on ``host``,
    e.g. ``0.0.0.0`` behind a sidecar that forwards to the endpoint's own address); stopped by PID."""
    binary = MEMCACHED if os.path.exists(MEMCACHED) else shutil.which("memcached")
    assert binary, "memcached is not installed (scripts/setup.sh installs it)"
    port = _free_port()
    args = [binary, "-l", host, "-p", str(port), "-U", "0", "-B", "auto", "-t", "2", "-m", "64"]
    if os.geteuid() == 0:
        args += ["-u", "root"]  # memcached refuses to run as root without it
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, f"memcached exited with {proc.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "memcached did not start listening"
                time.sleep(0.02)
        yield port
    finally:
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

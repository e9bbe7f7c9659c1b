"""A private network namespace with a real Envoy in it, for node-mode (transparent) proxying.

``node_namespace`` creates the namespace (lo up, the endpoints' /32 addresses on lo), starts
``tests.envoy.envoy_node_driver`` inside it and deletes the namespace however the test ends. iptables
rules in the namespace redirect connections to Envoy's transparent listeners; Envoy's own
upstream connections carry its socket mark and are let through.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cilia.envoy.translate import ProxyResources

DRIVER = "tests.envoy.envoy_node_driver"  # run with -m from the repository root
REPO = Path(__file__).resolve().parents[2]


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, iptables, SO_MARK)")


class Node:
    """The test's handle on the namespace and the driver process inside it."""

    def __init__(self, name: str, proc: subprocess.Popen[str]) -> None:
        self.name = name
        self._proc = proc

    def call(self, **cmd: Any) -> dict[str, Any]:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(json.dumps(cmd) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the netns driver exited (code {self._proc.poll()})")
        reply: dict[str, Any] = json.loads(line)
        assert "error" not in reply, reply["error"]
        return reply

    def publish(self, res: ProxyResources) -> None:
        self.call(op="publish",
                  listeners=[base64.b64encode(li.SerializeToString()).decode() for li in res.listeners],
                  clusters=[base64.b64encode(c.SerializeToString()).decode() for c in res.clusters])

    def http(self, source: str, host: str, port: int, method: str, path: str) -> dict[str, Any]:
        return self.call(op="http", source=source, host=host, port=port, method=method, path=path)

    def iptables(self, *rule: str) -> None:
        ip("netns", "exec", self.name, "iptables", "-w", *rule)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def node_namespace(addresses: Sequence[str]) -> Iterator[Node]:
    """A fresh namespace holding ``addresses`` (/32 on lo) and a driver; both removed on exit."""
    require_root()
    name = f"cilia-node-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    ip("netns", "add", name)
    proc: subprocess.Popen[str] | None = None
    try:
        ip("-n", name, "link", "set", "lo", "up")
        for address in addresses:
            ip("-n", name, "addr", "add", f"{address}/32", "dev", "lo")
        proc = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-m", DRIVER],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=REPO)
        yield Node(name, proc)
    finally:
        try:
            if proc is not None:
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    proc.stdin.close()
                    proc.wait(timeout=20)
                except (OSError, subprocess.TimeoutExpired):
                    proc.kill()  # our own child, by its Popen
                    proc.wait()
                finally:
                    if proc.stdout is not None:
                        proc.stdout.close()
        finally:
            ip("netns", "del", name)

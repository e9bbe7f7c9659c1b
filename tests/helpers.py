"""Paths and checks shared by the tests (imported as ``tests.helpers``)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cilia.policy._yaml import Node, load_documents
from cilia.policy.errors import Problem
from cilia.policy.flows import L7Request
from cilia.policy.labels import LabelSet
from cilia.policy.model import Policy, Protocol
from cilia.policy.trace import Peer, TraceRequest, TraceResult, trace

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
STARWARS = REPO / "examples" / "starwars"


def require_bpf() -> None:
    """Skip where the BPF datapath cannot run (not root, no bcc or headers), but fail in CI:
    CI runs as root with everything installed, so a skip there would hide a broken test."""
    import pytest

    from cilia.bpf.loader import bpf_available

    why = bpf_available()
    if why is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"BPF datapath tests must run in CI: {why}")
    pytest.skip(f"BPF datapath: {why}")


CNI_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins: host-local, static, ...


def require_cni_plugins() -> Path:
    """The directory of the standard CNI plugins; skip without them, but fail in CI (where
    scripts/apt-packages.txt installs them)."""
    import pytest

    if (CNI_PLUGINS / "host-local").is_file() and (CNI_PLUGINS / "static").is_file():
        return CNI_PLUGINS
    why = f"no host-local and static in {CNI_PLUGINS} (Debian package containernetworking-plugins)"
    if os.environ.get("CI"):
        pytest.fail(f"CNI IPAM tests must run in CI: {why}")
    pytest.skip(why)


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it returns something true; fail the test naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout}s"
        time.sleep(0.05)


def cilium_examples_dir() -> Path:
    """Cilium's example policies, kept unchanged in examples/cilium (CILIA_CILIUM_EXAMPLES
    points elsewhere). Tests that need them fail, not skip, when the directory is missing."""
    default = REPO / "examples" / "cilium"
    return Path(os.environ.get("CILIA_CILIUM_EXAMPLES", default))


def parse_l7_rule(parse_rule: Callable[[Node, list[Problem]], T | None], text: str,
                  path: str) -> tuple[T | None, list[str]]:
    """Run an L7 module's ``parse_rule`` on one YAML mapping placed at ``path``
    (e.g. ``http[0]``); returns the rule and the problem strings."""
    docs, problems = load_documents(textwrap.dedent(text), "t.yaml")
    assert not problems and len(docs) == 1
    found: list[Problem] = []
    rule = parse_rule(Node(docs[0].value, path, docs[0].source), found)
    return rule, [str(p) for p in found]


def valid_l7_rule(parse_rule: Callable[[Node, list[Problem]], T | None], text: str, path: str) -> T:
    parsed, problems = parse_l7_rule(parse_rule, text, path)
    assert problems == []
    assert parsed is not None
    return parsed


def peer(spec: str) -> Peer:
    """``"10.1.1.1"`` is an outside address; anything else a label set."""
    try:
        return Peer(address=ipaddress.ip_address(spec))
    except ValueError:
        return Peer(LabelSet.parse(spec))


def run(policies: list[Policy], src: str, dst: str, protocol: Protocol = Protocol.TCP, dport: int | None = 80,
        l7: L7Request | None = None) -> TraceResult:
    """Trace one flow given as strings (labels or an address on each side)."""
    return trace(policies, TraceRequest(peer(src), peer(dst), protocol, dport, l7))


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """iproute2's ``ip``, for tests to set up and inspect namespaces independently of cilia
    (which uses pyroute2); AssertionError with its message on failure unless ``check`` is off."""
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {res.stderr.strip() or res.returncode}")
    return res


def in_netns(path: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in the network namespace at ``path`` (``nsenter --net``: only the network
    namespace is entered, so bpffs pins stay visible)."""
    res = subprocess.run(["nsenter", f"--net={path}", *cmd], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} in {path}: {res.stderr.strip() or res.returncode}")
    return res


def accept_forever(sock: socket.socket, handle: Callable[[socket.socket], None] = socket.socket.close,
                   name: str = "accept") -> None:
    """Accept on a listening socket in a thread until the socket is closed; each connection goes
    to ``handle`` (default: closed at once, a bare "port open" server)."""
    def loop() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            handle(conn)

    threading.Thread(target=loop, name=name, daemon=True).start()

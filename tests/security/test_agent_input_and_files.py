"""The agent's files and its API under hostile or unlucky input: state and flow files owner-only and
on disk before they are renamed, a corrupt identities.json refused with one line naming it,
absurd nesting and lengths answered 400, endpoint names that cannot name a path, and a burst of
API clients all answered."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.agent.agent_support import agent_in_process, run_cli

from cilia.agent import flows as flows_module
from cilia.agent.client import AgentClient
from cilia.agent.flows import Flow, FlowFile, Peer, Verdict
from cilia.agent.state import load_state
from cilia.envoy import private_file
from cilia.policy import FileAllocator


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, calls: list[str]) -> None:
    """Record calls of ``module.name`` (still done for real) in ``calls``."""
    real: Callable[..., Any] = getattr(module, name)

    def spy(*args: Any) -> Any:
        calls.append(name)
        return real(*args)

    monkeypatch.setattr(module, name, spy)


def test_state_file_is_owner_only_and_synced_before_rename(tmp_path: Path, open_umask: None,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _spy(monkeypatch, private_file.os, "fsync", calls)
    _spy(monkeypatch, private_file.os, "replace", calls)
    state = tmp_path / "state"
    with agent_in_process(state, envoy="none") as agent:
        assert calls[:2] == ["fsync", "replace"], calls  # the snapshot written at start
        assert _mode(state / "state.json") == 0o600
        calls.clear()
        assert run_cli(state, "endpoint", "add", "--name", "web", "--labels", "app=web", "--ip", "127.0.3.1").code == 0
        assert calls[:1] == ["fsync"], calls  # the change, appended to the journal, on disk before the answer
        assert _mode(state / "state.journal") == 0o600
        assert load_state(state).endpoints["web"].ips == ("127.0.3.1",)
        calls.clear()
        agent.persist.compact(agent.state)  # now and then the state is written whole again
        assert calls[:2] == ["fsync", "replace"], calls
        assert json.loads((state / "state.json").read_text())["endpoints"][0]["name"] == "web"


def _flow(n: int) -> Flow:
    return Flow(float(n), Verdict.FORWARDED, "tcp", Peer("127.0.3.1", 1000 + n), Peer("127.0.3.2", 80))


def test_flow_files_are_owner_only_and_synced_before_rotation(tmp_path: Path, open_umask: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "flows.json"
    path.write_text("")
    path.chmod(0o644)  # as an older agent left it
    calls: list[str] = []
    _spy(monkeypatch, flows_module.os, "fsync", calls)
    _spy(monkeypatch, flows_module.logging.handlers.os, "rename", calls)
    ff = FlowFile(path, max_bytes=300, backups=2)
    try:
        assert _mode(path) == 0o600
        for n in range(20):
            ff.write(n, _flow(n))
    finally:
        ff.close()
    rotated = tmp_path / "flows.json.1"
    assert rotated.exists() and _mode(rotated) == 0o600 and _mode(path) == 0o600
    assert "rename" in calls and calls[0] == "fsync", calls
    first_rename = calls.index("rename")
    assert calls[first_rename - 1] == "fsync"


def test_corrupt_identities_is_one_line_naming_the_file_and_never_reset(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    identities = state / FileAllocator.FILENAME
    for text in ('{"next": 256, "identities": [{"id": 300, "lab', '[]', '{"identities": [{"id": "x"}]}'):
        identities.write_text(text)
        res = subprocess.run([sys.executable, "-m", "cilia", "agent", "--state-dir", str(state), "--envoy", "none"],
                             capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": os.getcwd()})
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and str(identities) in lines[0] and "Traceback" not in res.stderr, res.stderr
        assert identities.read_text() == text  # not replaced by a fresh allocation


def _raw(sock_path: Path, request: bytes) -> tuple[int, dict[str, Any]]:
    """Send a raw HTTP request to the agent's API; its status and JSON body."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(sock_path))
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _post(path: str, body: bytes, length: str | None = None) -> bytes:
    length = length if length is not None else str(len(body))
    return (f"POST {path} HTTP/1.1\r\nHost: cilia\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode() + body


def test_deep_nesting_and_bad_lengths_are_400_with_a_clear_message(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_in_process(state, envoy="none"):
        api = state / "cilia.sock"
        status, body = _raw(api, _post("/v1/policies", b"[" * 10_000 + b"]" * 10_000))
        assert status == 400 and "nests too deeply" in body["error"], body
        for deep in ("[" * 10_000 + "]" * 10_000, "a:\n" + "".join("  " * i + "- \n" for i in range(1, 2000))):
            files = {"files": [{"path": "deep.yaml", "text": deep}]}
            status, body = _raw(api, _post("/v1/policies", json.dumps(files).encode()))
            assert status == 400 and any("deep.yaml" in p and "nests deeper" in p for p in body["problems"]), body
        for length in ("abc", "-5", "1e3", "٣"):
            status, body = _raw(api, _post("/v1/policies", b"{}", length))
            assert status == 400 and "Content-Length" in body["error"], (length, body)
        assert run_cli(state, "status").code == 0  # and the agent still serves


@pytest.mark.parametrize("name", ["a/b", "..", "../etc", "web\n", "web\nx", "-web", "a..b", "x" * 321, "we b"])
def test_endpoint_names_that_could_name_a_path_are_refused(tmp_path: Path, name: str) -> None:
    state = tmp_path / "state"
    with agent_in_process(state, envoy="none") as agent:
        status, body = _raw(state / "cilia.sock", _post("/v1/endpoints", json.dumps(
            {"name": name, "labels": ["app=x"], "ips": ["127.0.3.9"]}).encode()))
        assert status == 400 and "endpoint name" in body["error"], body
        res = run_cli(state, "endpoint", "add", "--name", name, "--labels", "app=x", "--ip", "127.0.3.9")
        assert res.code != 0 and "endpoint name" in res.err, res.err
        assert not agent.state.endpoints


def test_endpoint_names_pods_get_are_accepted(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_in_process(state, envoy="none"):
        for name in ("web", "coredns-5d78c9869d-x2x7q.kube-system", "web_1", "A1", "x" * 320):
            res = run_cli(state, "endpoint", "add", "--name", name, "--labels", "app=x", "--ip", "127.0.3.9")
            assert res.code == 0, res.err


def test_a_burst_of_200_api_clients_is_all_answered(tmp_path: Path) -> None:
    state = tmp_path / "state"
    clients = 200
    with agent_in_process(state, envoy="none"):
        gate = threading.Barrier(clients)
        answers: list[Any] = [None] * clients

        def ask(i: int) -> None:
            client = AgentClient(state / "cilia.sock", timeout=30)
            try:
                gate.wait()
                answers[i] = client.healthz()[0]
            except Exception as e:
                answers[i] = repr(e)
            finally:
                client.close()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        failed = [a for a in answers if a != 200]
        assert not failed, f"{len(failed)}/{clients} not answered, e.g. {failed[0]}"

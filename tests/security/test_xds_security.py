"""Issue 14 item 3: xDS trusts only who the connection proves, and local users reach no agent socket.

Runs as root with real agents and real Envoys, and as an unprivileged user the test creates and
removes: started under umask 000, every socket of the agent refuses that user; with
--socket-group the group's members get in (so the refusal is the sockets' mode, not the test).
Rogue xDS clients: a node the agent does not know gets no listeners; over TCP the agent talks
mutual TLS only, a client without a certificate or whose certificate names another node is
refused and cannot NACK for the real proxy.
"""

from __future__ import annotations

import os
import queue
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from agent_support import AgentProcess, agent_in_process, run_cli
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.discovery.v3.discovery_pb2 import DiscoveryRequest, DiscoveryResponse
from google.rpc import status_pb2
from pki import Pki

from cilia.envoy.admin import AdminClient
from cilia.envoy.bootstrap import XdsClientTls, build_bootstrap, to_json
from cilia.netutil import free_port
from cilia.envoy.supervisor import EnvoySupervisor
from cilia.xds import LISTENER, ServerTls

SOCKETS = ("cilia.sock", "xds.sock", "accesslog.sock", "l7.sock")
ENDPOINT_IP = "127.0.93.1"  # this suite's own loopback address: no other test binds it


@pytest.fixture
def stranger() -> Iterator[tuple[int, int]]:
    """A throwaway unprivileged user (uid, gid) with its own group, removed afterwards."""
    name = f"ciliae2{os.getpid() % 100000}"
    subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        out = subprocess.run(["id", "-u", name], check=True, capture_output=True, text=True).stdout
        gid = subprocess.run(["id", "-g", name], check=True, capture_output=True, text=True).stdout
        yield int(out), int(gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A state directory every user may traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="cilia-e2sec-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def connect_as(user: tuple[int, int], path: Path) -> str:
    """Connect to the UNIX socket ``path`` as ``user``: "ok" or the error's name."""
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); print('ok')\n"
            "except OSError as e:\n print(type(e).__name__)")
    res = subprocess.run(["setpriv", f"--reuid={user[0]}", f"--regid={user[1]}", "--clear-groups",
                          "/usr/bin/python3", "-c", code, str(path)], capture_output=True, text=True, timeout=30)
    return res.stdout.strip() or res.stderr.strip()


def umask_000(*args: str) -> tuple[str, ...]:
    return ("sh", "-c", 'umask 000 && exec "$@"', "sh", *args)


def test_unprivileged_user_reaches_no_agent_socket(open_dir: Path, stranger: tuple[int, int]) -> None:
    control = socket.socket(socket.AF_UNIX)
    control.bind(str(open_dir / "control.sock"))
    control.listen()
    (open_dir / "control.sock").chmod(0o666)
    state = open_dir / "state"
    agent = AgentProcess(state, "--l7-workers", "1", wrapper=umask_000())  # a worker process's socket too
    agent.start()
    try:
        deadline = time.monotonic() + 30
        while not (state / "l7-0.sock").exists():
            assert time.monotonic() < deadline, "the L7 worker did not listen"
            time.sleep(0.1)
        assert connect_as(stranger, open_dir / "control.sock") == "ok"  # the harness can tell
        assert stat.S_IMODE(state.stat().st_mode) == 0o700  # nobody else may swap a socket in it
        for name in ("cilia.sock", "xds.sock", "accesslog.sock", "l7-0.sock"):
            mode = (state / name).stat().st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, name
            assert connect_as(stranger, state / name) == "PermissionError", name
    finally:
        agent.stop()
        control.close()


def test_socket_group_lets_its_members_in(open_dir: Path, stranger: tuple[int, int]) -> None:
    state = open_dir / "state"
    agent = AgentProcess(state, "--envoy", "none", "--socket-group", str(stranger[1]), wrapper=umask_000())
    agent.start()
    try:
        for name in SOCKETS:
            st = (state / name).stat()
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, stranger[1]), name
        st = state.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o710, stranger[1])  # reach, not list or change
        member = (stranger[0], stranger[1])
        assert connect_as(member, state / "xds.sock") == "ok"
    finally:
        agent.stop()


def test_agent_refuses_a_state_dir_others_may_write(open_dir: Path, stranger: tuple[int, int]) -> None:
    state = open_dir / "theirs"
    state.mkdir()
    os.chown(state, stranger[0], stranger[1])
    state.chmod(0o777)
    res = run_cli(open_dir, "agent", "--state-dir", str(state), "--envoy", "none")
    assert res.code == 2
    assert f"{state} belongs to uid {stranger[0]} and others may write to it" in res.err


class Rogue:
    """A hand-made ADS client."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._q: queue.Queue[DiscoveryRequest | None] = queue.Queue()
        self._responses = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(
            iter(self._q.get, None), timeout=20)

    def send(self, node: str, nonce: str = "", error: str | None = None) -> None:
        req = DiscoveryRequest(type_url=LISTENER, response_nonce=nonce)
        req.node.id = node
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._q.put(req)

    def recv(self) -> DiscoveryResponse:
        response: DiscoveryResponse = next(self._responses)
        return response

    def close(self) -> None:
        self._q.put(None)


def envoy(tmp_path: Path, node: str, xds: str, tls: XdsClientTls | None = None) -> tuple[EnvoySupervisor, str]:
    admin = f"127.0.0.1:{free_port()}"
    bootstrap = tmp_path / f"{node}.json"
    bootstrap.write_text(to_json(build_bootstrap(node, xds, admin, xds_tls=tls)))
    return EnvoySupervisor(bootstrap, admin, log_path=tmp_path / f"{node}.log",
                           extra_args=["--drain-time-s", "0"]), admin


def test_unknown_node_gets_no_listeners(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with agent_in_process(state, envoy="external", node_id="edge") as agent:
        res = run_cli(state, "endpoint", "add", "--name", "web", "--labels", "app=web", "--ip", ENDPOINT_IP,
                      "--port", "8093:8094", "-o", "json")
        assert res.code == 0
        xds = f"unix:{state / 'xds.sock'}"
        with grpc.insecure_channel(xds) as channel:
            rogue = Rogue(channel)
            rogue.send("stranger")
            assert list(rogue.recv().resources) == []
            known = Rogue(channel)
            known.send("edge")
            assert len(known.recv().resources) == 1  # the same request from the agent's node gets it
            sidecar = Rogue(channel)
            sidecar.send("web")  # a sidecar: its own endpoint's listener only
            assert len(sidecar.recv().resources) == 1
            for c in (rogue, known, sidecar):
                c.close()
        proxy, admin = envoy(tmp_path, "stranger", xds)  # a real Envoy naming a node nobody knows
        with proxy:
            client = AdminClient(admin)
            deadline = time.monotonic() + 20
            while client.stats().get("listener_manager.lds.update_success", 0) < 1:  # its LDS answer came
                assert time.monotonic() < deadline, "Envoy got no LDS answer"
                time.sleep(0.05)
            assert client.listeners() == []
            assert "stranger" not in agent.proxies()  # it cannot hold up a wait either


@pytest.fixture
def mtls_agent(tmp_path: Path) -> Iterator[tuple[Path, str, Pki]]:
    pki = Pki(tmp_path / "pki")
    xds = f"127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    with agent_in_process(state, envoy="external", xds_addresses=(xds,), node_id="edge",
                          xds_tls=ServerTls(*pki.issue("agent", "agent"), pki.ca)):
        yield state, xds, pki


def test_real_envoy_over_mtls_gets_its_config_and_rogues_cannot_answer_for_it(
        mtls_agent: tuple[Path, str, Pki], tmp_path: Path) -> None:
    state, xds, pki = mtls_agent
    proxy, admin = envoy(tmp_path, "edge", xds, XdsClientTls(*pki.issue("edge", "edge"), pki.ca))
    with proxy:
        revision = run_cli(state, "endpoint", "add", "--name", "web", "--labels", "app=web", "--ip", ENDPOINT_IP,
                           "--port", "8093:8094", "-o", "json").json()["revision"]
        assert run_cli(state, "policy", "wait", str(revision), "--timeout", "20").code == 0
        assert [li.name for li in AdminClient(admin).listeners()] == ["web-ingress-8093"]

        ca = pki.ca.read_bytes()
        cert, key = pki.issue("impostor", "impostor")
        with grpc.secure_channel(xds.replace("127.0.0.1", "localhost"), grpc.ssl_channel_credentials(
                ca, key.read_bytes(), cert.read_bytes())) as channel:
            rogue = Rogue(channel)
            rogue.send("edge", error="forged rejection")
            with pytest.raises(grpc.RpcError) as err:
                rogue.recv()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with grpc.secure_channel(xds.replace("127.0.0.1", "localhost"), grpc.ssl_channel_credentials(ca)) as ch:
            anonymous = Rogue(ch)
            anonymous.send("edge")
            with pytest.raises(grpc.RpcError) as err:
                anonymous.recv()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # no certificate: no TLS session
        with grpc.insecure_channel(xds) as plain:
            cleartext = Rogue(plain)
            cleartext.send("edge")
            with pytest.raises(grpc.RpcError):
                cleartext.recv()
        status = run_cli(state, "status", "-o", "json").json()
        assert status["healthy"] is True
        assert not any(p["nack"] for p in status["xds"]["proxies"])
        assert run_cli(state, "policy", "wait", str(revision)).code == 0

"""listener_problems against a real Envoy fed over xDS: what it serves vs what it was sent.

The cases the issue found health blind to: a listener Envoy rejected because another socket holds
its port (the orphan-Envoy case), a listener never applied, and an Envoy whose listeners were
stopped by ``POST /drain_listeners`` while it still says LIVE.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy_support import static_envoy, supervised, wait_until

from cilia.envoy.admin import AdminClient
from cilia.envoy.listener_health import listener_problems
from cilia.envoy.loopback import LoopbackEnvoy
from cilia.netutil import free_port
from cilia.envoy.resources import network_filter, socket_address, static_cluster
from cilia.envoy.translate import ProxyResources
from cilia.xds import NackError

UPSTREAM = static_cluster("upstream", "127.0.0.1", 9)


def tcp_listener(name: str, port: int) -> listener_pb2.Listener:
    return listener_pb2.Listener(name=name, address=socket_address("127.0.0.1", port), filter_chains=[
        listener_components_pb2.FilterChain(filters=[network_filter(
            "envoy.filters.network.tcp_proxy", tcp_proxy_pb2.TcpProxy(stat_prefix=name, cluster="upstream"))])])


def resources(*listeners: listener_pb2.Listener) -> ProxyResources:
    return ProxyResources(listeners=listeners, clusters=(UPSTREAM,))


@pytest.fixture
def envoy() -> Iterator[tuple[LoopbackEnvoy, AdminClient, int]]:
    """An Envoy serving listener "a" on a port it yields."""
    port = free_port()
    with LoopbackEnvoy("health") as lb:
        lb.start(resources(tcp_listener("a", port)))
        assert lb.admin is not None
        yield lb, lb.admin, port


def test_no_problem_when_envoy_serves_what_was_sent(envoy: tuple[LoopbackEnvoy, AdminClient, int]) -> None:
    _lb, admin, _port = envoy
    assert listener_problems(admin, {"a"}) == []


def test_listener_whose_port_another_socket_holds(envoy: tuple[LoopbackEnvoy, AdminClient, int]) -> None:
    lb, admin, port_a = envoy
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port_b = taken.getsockname()[1]
        with pytest.raises(NackError):
            lb.publish(resources(tcp_listener("a", port_a), tcp_listener("b", port_b)))
        assert listener_problems(admin, {"a", "b"}) == [
            f"listener b was rejected by Envoy: cannot bind '127.0.0.1:{port_b}': Address already in use"]
    # reverted (as the agent does after a NACK): Envoy serves what was sent, the error is gone
    lb.publish(resources(tcp_listener("a", port_a)))
    assert listener_problems(admin, {"a"}) == []
    # once the port is free, b binds
    lb.publish(resources(tcp_listener("a", port_a), tcp_listener("b", port_b)))
    assert listener_problems(admin, {"a", "b"}) == []


def test_missing_and_unexpected_listeners(envoy: tuple[LoopbackEnvoy, AdminClient, int]) -> None:
    _lb, admin, _port = envoy
    assert listener_problems(admin, {"a", "never-applied"}) == ["listener never-applied is missing in Envoy"]
    assert listener_problems(admin, set()) == ["listener a is active in Envoy but was not sent"]


def test_drained_envoy(envoy: tuple[LoopbackEnvoy, AdminClient, int]) -> None:
    """After /drain_listeners Envoy still says LIVE and lists "a" as active, but refuses every
    connection; a listener sent afterwards is acked and never served."""
    lb, admin, port = envoy
    admin.drain_listeners()
    wait_until(lambda: _refused(port), timeout=10)  # the workers close the sockets a moment later
    assert admin.state() == "LIVE"
    problems = listener_problems(admin, {"a"})
    assert problems == ["Envoy stopped its listeners (1 stopped, e.g. by POST /drain_listeners): "
                        "it serves no proxied traffic until it is restarted"]
    lb.publish(resources(tcp_listener("a", port), tcp_listener("c", free_port())))
    assert listener_problems(admin, {"a", "c"})[0] == problems[0]
    assert len(listener_problems(admin, {"a", "c"})) == 2  # and c is not served


def _refused(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


def test_unreadable_admin_is_a_problem(tmp_path: Path) -> None:
    problems = listener_problems(AdminClient(f"unix:{tmp_path}/none.sock", timeout=1), {"a"})
    assert len(problems) == 1 and problems[0].startswith("cannot read Envoy's listeners: ")


def test_supervisor_reports_a_stopped_envoy(tmp_path: Path) -> None:
    env = static_envoy(tmp_path, unix_admin=True)
    with supervised(env) as sup:
        assert sup.listener_problems(set()) == []  # "direct" is static: not compared
    assert sup.listener_problems({"a"}) == ["Envoy is stopped"]

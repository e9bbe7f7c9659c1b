"""Delegated IPAM run against Debian's real host-local and static plugins: what they print at
each cniVersion is read into a lease, their errors keep their code and name the plugin, and a
plugin that is missing or fails without a CNI error object is reported as ERR_IPAM.
"""

from __future__ import annotations

import ipaddress
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers import require_cni_plugins

from cilia.cni.delegate import ERR_IPAM, DelegatedIPAM, IPAMPluginError
from cilia.cni.plugin import OWN_IPAM, Request
from cilia.cni.result import Lease, ResultError, parse_result


def _env(container: str, cni_path: str) -> dict[str, str]:
    return {"CNI_CONTAINERID": container, "CNI_NETNS": "/run/netns/cni-ipam-unused", "CNI_IFNAME": "eth0",
            "CNI_PATH": cni_path, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def _host_local(tmp: Path, version: str = "1.0.0", **range_: str) -> dict[str, Any]:
    return {"cniVersion": version, "name": "cni-ipam-test",
            "ipam": {"type": "host-local", "dataDir": str(tmp / "leases"),
                     "ranges": [[{"subnet": "10.213.0.0/24", "gateway": "10.213.0.1", **range_}]]}}


def _held(tmp: Path) -> list[str]:
    """The addresses host-local holds in its dataDir."""
    leases = tmp / "leases" / "cni-ipam-test"
    return sorted(p.name for p in leases.iterdir() if p.name[0].isdigit()) if leases.exists() else []


@pytest.mark.parametrize("version", ["1.0.0", "0.4.0", "0.3.1", "0.2.0"])
def test_host_local_results_of_every_version_give_the_lease(tmp_path: Path, version: str) -> None:
    cni_path = str(require_cni_plugins())
    container = uuid.uuid4().hex
    ipam = DelegatedIPAM("host-local", _env(container, cni_path), _host_local(tmp_path, version))
    lease = ipam.add()
    assert lease == Lease(ipaddress.IPv4Address("10.213.0.2"), ipaddress.IPv4Address("10.213.0.1"), {})
    assert _held(tmp_path) == ["10.213.0.2"]
    assert container in (tmp_path / "leases" / "cni-ipam-test" / "10.213.0.2").read_text()
    if version not in ("0.2.0", "0.3.1"):  # CHECK exists from 0.4.0 on
        ipam.check()
    ipam.delete()
    assert _held(tmp_path) == []
    ipam.delete()  # DEL is idempotent


def test_static_gives_gateway_from_its_default_route_and_its_dns(tmp_path: Path) -> None:
    cni_path = str(require_cni_plugins())
    config = {"cniVersion": "1.0.0", "name": "cni-ipam-test",
              "ipam": {"type": "static", "addresses": [{"address": "fd00:213::5/64"}, {"address": "10.213.1.5/24"}],
                       "routes": [{"dst": "0.0.0.0/0", "gw": "10.213.1.1"}],
                       "dns": {"nameservers": ["10.213.1.53"], "search": ["cilia.test"]}}}
    lease = DelegatedIPAM("static", _env("c1", cni_path), config).add()
    assert lease == Lease(ipaddress.IPv4Address("10.213.1.5"), ipaddress.IPv4Address("10.213.1.1"),
                          {"nameservers": ["10.213.1.53"], "search": ["cilia.test"]})


def test_ipam_plugin_errors_keep_their_code_and_name_the_plugin(tmp_path: Path) -> None:
    cni_path = str(require_cni_plugins())
    config = _host_local(tmp_path, rangeStart="10.213.0.9", rangeEnd="10.213.0.9")
    DelegatedIPAM("host-local", _env("first", cni_path), config).add()
    with pytest.raises(IPAMPluginError) as exhausted:
        DelegatedIPAM("host-local", _env("second", cni_path), config).add()
    assert exhausted.value.code == 999  # libcni's "internal" code, as host-local reports it
    assert exhausted.value.msg.startswith("ipam plugin host-local ADD: ")
    assert "no IP addresses available" in exhausted.value.msg
    assert _held(tmp_path) == ["10.213.0.9"]

    static_v6 = {"cniVersion": "1.0.0", "name": "n", "ipam": {"type": "static",
                                                                "addresses": [{"address": "fd00:213::5/64"}]}}
    with pytest.raises(IPAMPluginError) as no_v4:
        DelegatedIPAM("static", _env("c1", cni_path), static_v6).add()
    assert no_v4.value.code == ERR_IPAM and "no IPv4 address" in no_v4.value.msg and "fd00:213::5/64" in no_v4.value.msg


def test_missing_or_broken_ipam_plugins_are_err_ipam(tmp_path: Path) -> None:
    cni_path = str(require_cni_plugins())
    with pytest.raises(IPAMPluginError) as missing:
        DelegatedIPAM("cni-ipam-no-such", _env("c1", f"{tmp_path}:{cni_path}"), _host_local(tmp_path)).add()
    assert missing.value.code == ERR_IPAM and "cni-ipam-no-such" in missing.value.msg
    assert str(tmp_path) in missing.value.details and cni_path in missing.value.details

    bins = tmp_path / "bin"
    bins.mkdir()
    (bins / "cni-ipam-fails").symlink_to("/bin/false")  # a real binary that fails and prints nothing
    (bins / "cni-ipam-prints-nothing").symlink_to("/bin/true")  # succeeds without a result
    with pytest.raises(IPAMPluginError) as fails:
        DelegatedIPAM("cni-ipam-fails", _env("c1", str(bins)), _host_local(tmp_path)).add()
    assert fails.value.code == ERR_IPAM and fails.value.msg == "ipam plugin cni-ipam-fails ADD: exited with 1"
    with pytest.raises(IPAMPluginError) as silent:
        DelegatedIPAM("cni-ipam-prints-nothing", _env("c1", str(bins)), _host_local(tmp_path)).add()
    assert silent.value.code == ERR_IPAM and "not a JSON result" in silent.value.msg

    for bad in ("../host-local", "", ".."):
        with pytest.raises(IPAMPluginError, match="expected the file name"):
            DelegatedIPAM(bad, _env("c1", cni_path), {})


def test_own_allocator_is_chosen_by_type_cilia_or_no_type(tmp_path: Path) -> None:
    own = {"subnet": "10.213.2.0/24", "gateway": "10.213.2.1", "dataDir": str(tmp_path)}
    for ipam in ({**own, "type": OWN_IPAM}, own):
        assert not isinstance(Request("ADD", "c", "", "eth0", {}, {"ipam": ipam}).ipam(), DelegatedIPAM)
    chosen = Request("ADD", "c", "", "eth0", {}, {"ipam": {"type": "host-local"}}).ipam()
    assert isinstance(chosen, DelegatedIPAM) and chosen.name == "host-local"


@pytest.mark.parametrize(("result", "problem"), [
    ([], "result: expected a JSON object"),
    ({"ips": [{"gateway": "10.0.0.1"}]}, "ips[0].address: required"),
    ({"ips": [{"address": "10.0.0.5"}, {"address": "bogus"}]}, "ips[1].address 'bogus'"),
    ({"ips": [{"address": "10.0.0.5/24", "gateway": "nope"}]}, "ips[0].gateway 'nope'"),
    ({"ips": [{"address": "10.0.0.5/24", "gateway": "fd00::1"}]}, "gateway fd00::1 of 10.0.0.5/24 is not IPv4"),
    ({"ips": {}}, "result.ips: expected a list"),
    ({"ip4": {"ip": "10.0.0.5/24", "routes": "x"}}, "ip4.routes: expected a list"),
    ({"ips": [{"address": "10.0.0.5/24"}], "dns": []}, "dns: expected an object"),
    ({}, "no IPv4 address"),
])
def test_malformed_results_name_the_field(result: object, problem: str) -> None:
    with pytest.raises(ResultError) as e:
        parse_result(result)
    assert problem in str(e.value)

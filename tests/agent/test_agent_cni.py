"""`cilia-cni` invoked exactly as a container runtime invokes a CNI plugin: in the node's network
namespace, the command and container in CNI_* variables, the network configuration on stdin, the
result (or a CNI error object) on stdout. The pods it plumbs are endpoints the BPF agent enforces.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bpf_agent_support import ROUTER_IP, TIMEOUT, BpfAgentNode, bpf_agent
from helpers import ip, require_cni_plugins

from cilia.bpf.netns import run_in_netns
from cilia.cni.plugin import Request

PLUGIN = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "cilia-cni"
STARWARS = Path(__file__).resolve().parents[2] / "examples" / "starwars"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[BpfAgentNode]:
    with bpf_agent(tmp_path) as n:
        n.add_ship("deathstar")
        n.serve_deathstar()
        yield n


class Runtime:
    """What a container runtime does for a pod: a network namespace, then the plugin."""

    def __init__(self, node: BpfAgentNode, tmp: Path, cni_path: tuple[Path, ...] = ()) -> None:
        self.node = node
        self.data_dir = tmp / "ipam"
        self.cni_path = ":".join(str(d) for d in (PLUGIN.parent, *cni_path))
        self.pods: list[str] = []

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"cniVersion": "1.0.0", "name": "cilia-test", "type": "cilia-cni",
                "agentSocket": str(self.node.state_dir / "cilia.sock"),
                "ipam": {"type": "cilia", "subnet": "10.212.0.0/24", "gateway": ROUTER_IP,
                         "rangeStart": "10.212.0.100", "dataDir": str(self.data_dir)}, **extra}

    def sandbox(self, pod: str) -> str:
        name = f"cba-pod-{pod}-{self.node.suffix}"
        ip("netns", "add", name)
        self.pods.append(name)
        return name

    def plugin(self, command: str, container: str, netns: str, pod: str, config: dict[str, Any]
               ) -> tuple[int, dict[str, Any] | None]:
        env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container, "CNI_NETNS": f"/run/netns/{netns}",
               "CNI_IFNAME": "eth0", "CNI_PATH": self.cni_path,
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}",
               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
               "PYTHONPATH": str(PLUGIN.parents[2])}  # the venv's entry point runs this checkout's cilia
        res = subprocess.run([*self.node.wrapper, str(PLUGIN)], input=json.dumps(config), env=env,
                             capture_output=True, text=True, timeout=60)
        return res.returncode, json.loads(res.stdout) if res.stdout.strip() else None

    def cleanup(self) -> None:
        for name in self.pods:
            ip("netns", "del", name, check=False)


def _labels(app: str) -> dict[str, Any]:
    org, cls = app.split("/")
    return {"args": {"cni": {"labels": [{"key": "org", "value": org}, {"key": "class", "value": cls}]}}}


def test_cni_add_check_del_as_a_runtime_calls_it(node: BpfAgentNode, tmp_path: Path) -> None:
    runtime = Runtime(node, tmp_path)
    try:
        code, version = runtime.plugin("VERSION", "", "", "", {"cniVersion": "1.0.0"})
        assert code == 0 and version is not None and "1.0.0" in version["supportedVersions"]

        xwing_ns, tie_ns = runtime.sandbox("xwing"), runtime.sandbox("tie")
        xwing_id, tie_id = uuid.uuid4().hex, uuid.uuid4().hex
        code, result = runtime.plugin("ADD", xwing_id, xwing_ns, "xwing", runtime.config(**_labels("alliance/xwing")))
        assert code == 0, result
        assert result is not None and result["cniVersion"] == "1.0.0"
        xwing_ip = result["ips"][0]["address"].split("/")[0]
        assert xwing_ip == "10.212.0.100" and result["ips"][0]["gateway"] == ROUTER_IP
        host_if = result["interfaces"][0]["name"]
        assert result["interfaces"][1] == {"name": "eth0", "mac": result["interfaces"][1]["mac"],
                                           "sandbox": f"/run/netns/{xwing_ns}"}
        assert len(result["interfaces"][1]["mac"]) == 17
        code, tie = runtime.plugin("ADD", tie_id, tie_ns, "tie", runtime.config(**_labels("empire/tiefighter")))
        assert code == 0 and tie is not None and tie["ips"][0]["address"] == "10.212.0.101/32"

        endpoints = {e["name"]: e for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]}
        assert endpoints["xwing.default"]["interface"] == host_if and endpoints["xwing.default"]["ips"] == [xwing_ip]
        assert "k8s:org=alliance" in endpoints["xwing.default"]["identity_labels"]
        assert node.ok("status", "-o", "json").json()["datapath"]["attached"]["xwing.default"] == host_if

        node.import_policy(STARWARS / "sw_l3_l4_policy.yaml")
        assert _land(node, xwing_ns) == TIMEOUT  # the plugged-in pod is enforced in the kernel
        assert _land(node, tie_ns) == "200 Ship landed"

        prev = {**runtime.config(), "prevResult": result}
        assert runtime.plugin("CHECK", xwing_id, xwing_ns, "xwing", prev) == (0, None)

        assert runtime.plugin("DEL", xwing_id, xwing_ns, "xwing", runtime.config()) == (0, None)
        names = {e["name"] for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]}
        assert "xwing.default" not in names and "tie.default" in names
        assert ip("-n", node.node, "link", "show", host_if, check=False).returncode != 0
        assert not (runtime.data_dir / xwing_ip).exists()
        assert runtime.plugin("DEL", xwing_id, xwing_ns, "xwing", runtime.config()) == (0, None)  # idempotent
        code, err = runtime.plugin("CHECK", xwing_id, xwing_ns, "xwing", prev)
        assert code == 1 and err is not None and err["code"] == 101 and "missing" in err["msg"]
    finally:
        runtime.cleanup()


def test_cni_errors_are_cni_error_objects(node: BpfAgentNode, tmp_path: Path) -> None:
    runtime = Runtime(node, tmp_path)
    try:
        sandbox = runtime.sandbox("bad")
        code, err = runtime.plugin("ADD", "c1", sandbox, "bad", {**runtime.config(), "cniVersion": "9.9.9"})
        assert code == 1 and err is not None and err["code"] == 1 and "9.9.9" in err["msg"]
        code, err = runtime.plugin("ADD", "c2", "cba-no-such-netns", "bad", runtime.config())
        assert code == 1 and err is not None and err["code"] == 3
        # The agent refuses the endpoint (a label it cannot parse): nothing is left behind.
        bad = {"args": {"cni": {"labels": [{"key": "", "value": "x"}]}}}
        code, err = runtime.plugin("ADD", "c3", sandbox, "bad", runtime.config(**bad))
        assert code == 1 and err is not None and err["code"] == 100 and "refused" in err["msg"]
        assert not any(p.name.startswith("10.") for p in runtime.data_dir.iterdir())
        assert "lxc" not in ip("-n", node.node, "-o", "link", "show").stdout.replace(
            _deathstar_if(node), "")
    finally:
        runtime.cleanup()


def _deathstar_if(node: BpfAgentNode) -> str:
    return str(next(e["interface"] for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]
                    if e["name"] == "deathstar"))


def _land(node: BpfAgentNode, netns: str) -> str:
    import http.client

    def go() -> str:
        conn = http.client.HTTPConnection(node.address("deathstar"), 80, timeout=2)
        try:
            conn.request("POST", "/v1/request-landing", body=b"")
            resp = conn.getresponse()
            return f"{resp.status} {resp.read().decode().strip()}"
        except TimeoutError:
            return TIMEOUT
        finally:
            conn.close()

    return run_in_netns(netns, go)


# -- delegated IPAM: Debian's host-local and static plugins -------------------------------------

def _host_local(runtime: Runtime, **range_: str) -> dict[str, Any]:
    return {"type": "host-local", "dataDir": str(runtime.data_dir),
            "ranges": [[{"subnet": "10.212.0.0/24", "gateway": ROUTER_IP, "rangeStart": "10.212.0.120", **range_}]]}


def _leases(runtime: Runtime) -> dict[str, str]:
    """host-local's leases in its dataDir: address -> the container id that holds it."""
    leases = runtime.data_dir / "cilia-test"
    if not leases.exists():
        return {}
    return {p.name: p.read_text().split()[0] for p in leases.iterdir() if p.name[0].isdigit()}


def _host_ifs(node: BpfAgentNode) -> set[str]:
    out = ip("-n", node.node, "-o", "link", "show").stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ": lxc" in line}


def _endpoint_names(node: BpfAgentNode) -> set[str]:
    return {e["name"] for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]}


def test_cni_delegates_ipam_to_host_local(node: BpfAgentNode, tmp_path: Path) -> None:
    runtime = Runtime(node, tmp_path, (require_cni_plugins(),))
    config = runtime.config(ipam=_host_local(runtime), **_labels("alliance/xwing"))
    try:
        sandbox, container = runtime.sandbox("hl"), uuid.uuid4().hex
        code, result = runtime.plugin("ADD", container, sandbox, "xwing", config)
        assert code == 0, result
        assert result is not None and result["ips"] == [{"address": "10.212.0.120/32", "gateway": ROUTER_IP,
                                                          "interface": 1}]
        assert _leases(runtime) == {"10.212.0.120": container}
        host_if = result["interfaces"][0]["name"]
        endpoint = next(e for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]
                        if e["name"] == "xwing.default")
        assert endpoint["ips"] == ["10.212.0.120"] and endpoint["interface"] == host_if
        assert _land(node, sandbox) == "200 Ship landed"  # routed through the gateway host-local named
        node.import_policy(STARWARS / "sw_l3_l4_policy.yaml")
        assert _land(node, sandbox) == TIMEOUT  # and enforced like any other endpoint

        prev = {**config, "prevResult": result}
        assert runtime.plugin("CHECK", container, sandbox, "xwing", prev) == (0, None)
        lease = runtime.data_dir / "cilia-test" / "10.212.0.120"
        held = lease.read_bytes()
        lease.write_bytes(b"someone-else\r\neth0")  # host-local's own CHECK runs: it no longer finds the lease
        code, err = runtime.plugin("CHECK", container, sandbox, "xwing", prev)
        assert code == 1 and err is not None and err["msg"].startswith("ipam plugin host-local CHECK: "), err
        lease.write_bytes(held)

        assert runtime.plugin("DEL", container, sandbox, "xwing", prev) == (0, None)
        assert _leases(runtime) == {} and "xwing.default" not in _endpoint_names(node)
        assert host_if not in _host_ifs(node)
        assert runtime.plugin("DEL", container, sandbox, "xwing", prev) == (0, None)  # idempotent
    finally:
        runtime.cleanup()


def test_cni_delegates_ipam_to_static_once(node: BpfAgentNode, tmp_path: Path) -> None:
    runtime = Runtime(node, tmp_path, (require_cni_plugins(),))
    static = {"type": "static", "addresses": [{"address": "10.212.0.140/24", "gateway": ROUTER_IP}],
              "dns": {"nameservers": ["10.212.0.53"]}}
    config = runtime.config(ipam=static, **_labels("empire/tiefighter"))
    try:
        sandbox, container = runtime.sandbox("st"), uuid.uuid4().hex
        code, result = runtime.plugin("ADD", container, sandbox, "tie", config)
        assert code == 0 and result is not None, result
        assert result["ips"][0]["address"] == "10.212.0.140/32" and result["dns"] == {"nameservers": ["10.212.0.53"]}
        assert _land(node, sandbox) == "200 Ship landed"
        assert runtime.plugin("CHECK", container, sandbox, "tie", {**config, "prevResult": result}) == (0, None)
        assert runtime.plugin("DEL", container, sandbox, "tie", config) == (0, None)
        assert "tie.default" not in _endpoint_names(node) and _host_ifs(node) == {_deathstar_if(node)}
    finally:
        runtime.cleanup()


def test_cni_ipam_failures_are_cni_errors_and_leave_nothing(node: BpfAgentNode, tmp_path: Path) -> None:
    runtime = Runtime(node, tmp_path, (require_cni_plugins(),))
    before = _host_ifs(node), _endpoint_names(node)
    try:
        sandbox = runtime.sandbox("fail")

        # The range holds one address: the second pod gets host-local's own error, code kept.
        one = runtime.config(ipam=_host_local(runtime, rangeEnd="10.212.0.120"))
        assert runtime.plugin("ADD", "first", runtime.sandbox("first"), "first", one)[0] == 0
        code, err = runtime.plugin("ADD", "second", sandbox, "second", one)
        assert code == 1 and err is not None and err["code"] == 999, err
        assert err["msg"].startswith("ipam plugin host-local ADD: ") and "no IP addresses available" in err["msg"]
        assert _leases(runtime) == {"10.212.0.120": "first"}
        assert runtime.plugin("DEL", "first", "", "first", one) == (0, None)

        # No such plugin in CNI_PATH.
        code, err = runtime.plugin("ADD", "c2", sandbox, "second", runtime.config(ipam={"type": "cba-no-ipam"}))
        assert code == 1 and err is not None and err["code"] == 102 and "cba-no-ipam" in err["msg"], err
        assert "/usr/lib/cni" in err["details"]

        # The plugin gave an address but no gateway: released again.
        static = {"type": "static", "addresses": [{"address": "10.212.0.140/24"}]}
        code, err = runtime.plugin("ADD", "c3", sandbox, "second", runtime.config(ipam=static))
        assert code == 1 and err is not None and err["code"] == 7 and "no gateway" in err["msg"], err

        # The agent refuses the endpoint after host-local leased and the veth was wired:
        # host-local's DEL releases the lease and the veth is deleted.
        bad = {"args": {"cni": {"labels": [{"key": "", "value": "x"}]}}}
        code, err = runtime.plugin("ADD", "c4", sandbox, "second", runtime.config(ipam=_host_local(runtime), **bad))
        assert code == 1 and err is not None and err["code"] == 100 and "refused" in err["msg"], err
        assert Request("ADD", "c4", "", "eth0", {}, {}).host_if not in _host_ifs(node)

        assert _leases(runtime) == {}
        assert (_host_ifs(node), _endpoint_names(node)) == before
    finally:
        runtime.cleanup()

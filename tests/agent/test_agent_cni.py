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
from helpers import ip

from cilia.bpf.netns import run_in_netns

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

    def __init__(self, node: BpfAgentNode, tmp: Path) -> None:
        self.node = node
        self.data_dir = tmp / "ipam"
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
               "CNI_IFNAME": "eth0", "CNI_PATH": str(PLUGIN.parent),
               "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod}",
               "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
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

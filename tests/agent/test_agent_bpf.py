"""The agent with the BPF datapath, driven by the `cilia` command as an operator would: Cilium's
Star Wars guide with the ships in namespaces the agent creates, L3/L4 enforced in the kernel and
L7 through Envoy's transparent listener; connections that predate an L7 rule are reset; an
agent restart keeps enforcement in place; relabelling changes identity; cleanup removes it all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.agent.agent_support import simple
from tests.agent.bpf_agent_support import CLOSED, TIMEOUT, BpfAgentNode, bpf_agent, request
from tests.helpers import ip

from cilia.agent.client import AgentClient


STARWARS = Path(__file__).resolve().parents[2] / "examples" / "starwars"
L3L4 = STARWARS / "sw_l3_l4_policy.yaml"
L7 = STARWARS / "sw_l3_l4_l7_policy.yaml"
LAND = ("POST", "/v1/request-landing")
EXHAUST = ("PUT", "/v1/exhaust-port")


@pytest.fixture
def node(tmp_path: Path) -> Iterator[BpfAgentNode]:
    with bpf_agent(tmp_path) as n:
        for ship in ("deathstar", "tiefighter", "xwing"):
            n.add_ship(ship)
        n.serve_deathstar()
        yield n


def _entries(node: BpfAgentNode, endpoint: str) -> list[dict[str, object]]:
    entries: list[dict[str, object]] = node.ok("bpf", "policy", "get", endpoint, "-o", "json").json()["entries"]
    return entries


def test_starwars_in_the_kernel_and_envoy(node: BpfAgentNode) -> None:
    assert node.shoot("xwing", *LAND) == "200 Ship landed"  # no policy yet

    node.import_policy(L3L4)
    monitor = node.monitor("--type", "drop")
    try:
        assert node.shoot("tiefighter", *LAND) == "200 Ship landed"
        assert node.shoot("xwing", *LAND) == TIMEOUT  # dropped in the kernel: no answer at all
        drop = monitor.wait_for(lambda e: e["source"].get("endpoint") == "xwing")
    finally:
        monitor.stop()
    assert drop["type"] == "drop" and drop["reason_text"] == "Policy denied" and drop["direction"] == "ingress"
    assert drop["endpoint"] == "deathstar" and drop["destination"]["port"] == 80
    assert "k8s:org=alliance" in drop["source"]["labels"] and drop["rule"] == "no rule allows it"
    tie = node.ok("endpoint", "list", "-o", "json").json()["endpoints"]
    ids = {e["name"]: e["identity"] for e in tie}
    allow = [e for e in _entries(node, "deathstar") if e["identity"] == ids["tiefighter"]]
    assert [(e["verdict"], e["port"], e["proxy_port"]) for e in allow] == [("allow", "80/TCP", 0)]
    assert int(allow[0]["packets"]) > 0  # type: ignore[call-overload]
    assert "sw_l3_l4_policy.yaml:" in str(allow[0]["rule"])

    node.import_policy(L7)
    tracer = node.monitor("--type", "trace")
    try:
        assert node.shoot("tiefighter", *LAND) == "200 Ship landed"
        to_proxy = tracer.wait_for(lambda e: e["observation_point"] == "to-proxy")
        back = tracer.wait_for(lambda e: e["observation_point"] == "to-endpoint"
                               and e["destination"].get("endpoint") == "tiefighter")
    finally:
        tracer.stop()
    assert to_proxy["type"] == "trace" and to_proxy["source"]["endpoint"] == "tiefighter"
    assert to_proxy["endpoint"] == "tiefighter" and to_proxy["proxy_port"] >= 10000
    assert back["source"]["endpoint"] == "deathstar" and back["verdict"] == "FORWARDED"
    assert node.shoot("tiefighter", *EXHAUST) == "403 Access denied"
    assert node.shoot("xwing", *LAND) == TIMEOUT
    redirect = [e for e in _entries(node, "deathstar") if e["identity"] == ids["tiefighter"]]
    assert [(e["verdict"], e["port"]) for e in redirect] == [("redirect", "80/TCP")]
    proxy_port = redirect[0]["proxy_port"]
    status = node.ok("status", "-o", "json").json()
    assert status["healthy"] and status["datapath"]["proxy_ports"] == {"ingress/80": proxy_port}
    assert set(status["datapath"]["attached"]) == {"deathstar", "tiefighter", "xwing"}
    assert status["datapath"]["drops"]["Policy denied"] >= 2

    flows = _wait_flows(node, lambda fs: sum(f["kind"] == "http" for f in fs) >= 2)
    http = [f for f in flows if f["kind"] == "http"]
    assert {(f["l7"]["method"], f["verdict"], f["l7"]["status"]) for f in http} >= {("POST", "FORWARDED", 200),
                                                                                     ("PUT", "DROPPED", 403)}
    assert all(f["source"].get("endpoint") == "tiefighter" for f in http)
    assert any("sw_l3_l4_l7_policy.yaml:" in f["rule"] for f in http)
    kernel = [f for f in flows if f["kind"] == "l3/l4"]
    assert any(f["verdict"] == "DROPPED" and f["source"].get("endpoint") == "xwing"
               and f["drop_reason"] == "Policy denied" and f["endpoint"] == "deathstar" for f in kernel)
    assert any(f["verdict"] == "REDIRECTED" and f["proxy_port"] == proxy_port for f in kernel)
    text = node.ok("observe", "--last", "50").out
    assert "DROPPED" in text and "REDIRECTED" in text and "Access denied" not in text
    # the kernel's drops in Cilium's counters, and how full the datapath's hash and LPM maps are
    client = AgentClient(node.state_dir / "cilia.sock")
    try:
        families = {f.name: f for f in text_string_to_metric_families(client._client.get("/metrics").text)}
    finally:
        client.close()
    drops = {s.labels["reason"]: s.value for s in families["cilia_drop_count"].samples if s.name.endswith("_total")}
    assert drops["Policy denied"] >= 2 and any(s.value > 0 for s in families["cilia_drop_bytes"].samples)
    pressure = {s.labels["map_name"]: s.value for s in families["cilia_bpf_map_pressure"].samples}
    assert set(pressure) == {"ipcache", "endpoints", "conntrack", "lb_services", "lb_backends", "lb_ct", "lb_revnat",
                                 "lb_affinity"} and 0 < pressure["endpoints"] < 1
    assert "REDIRECT" in node.ok("bpf", "policy", "get", "deathstar").out.upper()


def _wait_flows(node: BpfAgentNode, enough: object, timeout: float = 10.0) -> list[dict[str, object]]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        out = node.ok("observe", "--last", "1000", "-o", "json").out
        flows = [simple(json.loads(line)) for line in out.splitlines()]
        if enough(flows) or time.monotonic() > deadline:  # type: ignore[operator]
            return flows
        time.sleep(0.3)


def test_connection_from_before_an_l7_rule_is_reset(node: BpfAgentNode) -> None:
    node.import_policy(L3L4)
    conn = node.connect("tiefighter")
    try:
        assert request(conn, *EXHAUST) == "200 Panic: deathstar exploded"  # L3/L4 cannot tell requests apart
        node.import_policy(L7)
        # The old connection bypassed Envoy; its next packet goes to the proxy, which resets it.
        assert request(conn, *EXHAUST) == CLOSED
    finally:
        conn.close()
    assert node.shoot("tiefighter", *EXHAUST) == "403 Access denied"  # the reconnect goes through Envoy
    assert node.shoot("tiefighter", *LAND) == "200 Ship landed"


def test_restart_keeps_enforcement_and_counters(node: BpfAgentNode) -> None:
    node.import_policy(L7)
    assert node.shoot("tiefighter", *LAND) == "200 Ship landed"
    before = {(e["identity"], e["port"]): e["packets"] for e in _entries(node, "deathstar")}
    node.agent.stop()
    # The kernel still enforces: xwing is dropped; tiefighter's L7 port has no proxy now, and
    # fails closed rather than reaching deathstar unchecked.
    assert node.shoot("xwing", *LAND, timeout=1.0) == TIMEOUT
    assert node.shoot("tiefighter", *EXHAUST, timeout=1.0) == TIMEOUT
    assert os.path.exists(f"{node.pin_dir}/ipcache")
    node.agent.start(timeout=60)
    assert node.shoot("tiefighter", *LAND) == "200 Ship landed"
    assert node.shoot("tiefighter", *EXHAUST) == "403 Access denied"
    assert node.shoot("xwing", *LAND) == TIMEOUT
    after = {(e["identity"], e["port"]): e["packets"] for e in _entries(node, "deathstar")}
    assert after.keys() == before.keys()  # the same entries, rewritten nowhere: counters kept counting
    assert all(int(after[k]) >= int(before[k]) for k in before)  # type: ignore[call-overload]


def test_relabel_delete_and_cleanup(node: BpfAgentNode) -> None:
    node.import_policy(L3L4)
    assert node.shoot("xwing", *LAND) == TIMEOUT
    old = {e["name"]: e["identity"] for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]}
    node.add_ship("xwing", "org=empire,class=xwing")  # defects: same namespace, new identity
    new = {e["name"]: e["identity"] for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]}
    assert new["xwing"] != old["xwing"]
    assert node.shoot("xwing", *LAND) == "200 Ship landed"

    interface = next(e["interface"] for e in node.ok("endpoint", "list", "-o", "json").json()["endpoints"]
                     if e["name"] == "tiefighter")
    node.ok("endpoint", "delete", "tiefighter")
    assert node.netns("tiefighter") not in ip("netns", "list").stdout
    assert ip("-n", node.node, "link", "show", interface, check=False).returncode != 0

    running = node.cilia("cleanup")
    assert running.code == 1 and "stop it first" in running.err
    node.agent.stop()
    import subprocess
    import sys

    res = subprocess.run([*node.wrapper, sys.executable, "-m", "cilia", "cleanup", "--state-dir",
                          str(node.state_dir)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "removed endpoint deathstar" in res.stdout and "removed endpoint xwing" in res.stdout
    assert not os.path.exists(node.pin_dir)
    names = ip("netns", "list").stdout
    assert node.netns("deathstar") not in names and node.netns("xwing") not in names
    assert "lookup 2005" not in ip("-n", node.node, "rule", "show").stdout
    assert "10.212.0.1" not in ip("-n", node.node, "addr", "show", "dev", "lo").stdout


TIEFIGHTER_EGRESS = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: tiefighter-egress
spec:
  endpointSelector:
    matchLabels:
      class: tiefighter
  egress:
  - toEndpoints:
    - matchLabels:
        class: deathstar
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: POST
          path: /v1/request-landing
"""


def test_egress_l7_goes_through_envoy_as_the_sender(node: BpfAgentNode, tmp_path: Path) -> None:
    node.import_policy(L3L4)  # deathstar admits only empire ships
    egress = tmp_path / "tiefighter-egress.yaml"
    egress.write_text(TIEFIGHTER_EGRESS, encoding="utf-8")
    node.import_policy(egress)
    # Envoy's upstream carries tiefighter's identity in its mark, so deathstar's L3/L4 ingress
    # policy admits it as tiefighter, not as the node (which it would refuse).
    assert node.shoot("tiefighter", *LAND) == "200 Ship landed"
    assert node.shoot("tiefighter", *EXHAUST) == "403 Access denied"  # tiefighter's own egress L7 rule
    assert node.shoot("xwing", *LAND) == TIMEOUT
    status = node.ok("status", "-o", "json").json()
    assert "egress/80" in status["datapath"]["proxy_ports"] and status["healthy"]
    egress_rows = [e for e in _entries(node, "tiefighter") if e["direction"] == "egress" and e["verdict"] == "redirect"]
    assert [e["port"] for e in egress_rows] == ["80/TCP"]
    flows = _wait_flows(node, lambda fs: any(f["kind"] == "http" and f["l7"]["method"] == "PUT" for f in fs))
    put = next(f for f in flows if f["kind"] == "http" and f["l7"]["method"] == "PUT")
    assert put["verdict"] == "DROPPED" and "tiefighter-egress" in put["rule"] and put["direction"] == "egress"


def test_audit_mode_in_the_kernel(node: BpfAgentNode) -> None:
    node.ok("policy", "import", "--audit", str(L3L4))
    revision = node.ok("status", "-o", "json").json()["revision"]
    node.ok("policy", "wait", str(revision))
    assert node.shoot("xwing", *LAND) == "200 Ship landed"  # would be dropped in the kernel: let through
    flows = _wait_flows(node, lambda fs: any(f["verdict"] == "AUDIT" for f in fs))
    audit = next(f for f in flows if f["verdict"] == "AUDIT")
    assert audit["kind"] == "l3/l4" and audit["source"]["endpoint"] == "xwing"
    assert audit["drop_reason"] == "Policy denied" and audit["endpoint"] == "deathstar"
    node.import_policy(L3L4)  # enforce it
    assert node.shoot("xwing", *LAND) == TIMEOUT

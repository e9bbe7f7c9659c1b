"""End to end: `cilia service update` on a real `cilia agent --datapath bpf`, traffic from endpoint
namespaces to the service address, policy judged on the backend (toServices and toEndpoints),
flows naming frontend and backend, and a deleted service no longer answering."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.agent.bpf_agent_support import CLOSED, TIMEOUT, BpfAgentNode, bpf_agent, request

from cilia.bpf.netns import run_in_netns

VIP = "10.96.0.10"
LAND = ("POST", "/v1/request-landing")

XWING_TO_SERVICE = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: xwing-to-deathstar}
spec:
  endpointSelector: {matchLabels: {class: xwing}}
  egress:
  - toServices: [{k8sService: {serviceName: deathstar}}]
"""
TIEFIGHTER_TO_XWING_ONLY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: tiefighter-to-xwing}
spec:
  endpointSelector: {matchLabels: {class: tiefighter}}
  egress:
  - toEndpoints: [{matchLabels: {class: xwing}}]
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[BpfAgentNode]:
    with bpf_agent(tmp_path) as n:
        for ship in ("deathstar", "tiefighter", "xwing"):
            n.add_ship(ship)
        n.serve_deathstar()
        yield n


def shoot_vip(node: BpfAgentNode, ship: str, timeout: float = 2.0) -> str:
    """One request from ``ship``'s namespace to the service address: "<status> <body>", TIMEOUT or CLOSED."""
    def go() -> str:
        conn = http.client.HTTPConnection(VIP, 80, timeout=timeout)
        try:
            conn.connect()
        except TimeoutError:
            return TIMEOUT
        except OSError:
            return CLOSED
        try:
            return request(conn, *LAND)
        finally:
            conn.close()

    return run_in_netns(node.netns(ship), go)


def test_a_cli_service_is_load_balanced_and_policed_on_its_backend(node: BpfAgentNode, tmp_path: Path) -> None:
    node.ok("service", "update", "--id", "1", "--frontend", f"{VIP}:80", "--backends",
            f"{node.address('deathstar')}:80", "--name", "deathstar")
    assert shoot_vip(node, "tiefighter") == "200 Ship landed"  # no policy: DNAT to the backend

    (tmp_path / "xwing.yaml").write_text(XWING_TO_SERVICE)
    (tmp_path / "tiefighter.yaml").write_text(TIEFIGHTER_TO_XWING_ONLY)
    node.import_policy(tmp_path / "xwing.yaml")
    node.import_policy(tmp_path / "tiefighter.yaml")
    assert shoot_vip(node, "xwing") == "200 Ship landed"  # toServices: the backend's identity is allowed
    assert shoot_vip(node, "tiefighter", timeout=1.0) == TIMEOUT  # judged on the backend: dropped in the kernel

    # flows name the frontend the ship used and the backend it reached
    deadline = time.monotonic() + 10
    through: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        res = node.ok("observe", "--last", "200", "-o", "json")
        flows = [json.loads(line) for line in res.out.splitlines() if line.strip()]
        through = [f for f in flows if f["cilia"].get("service_frontend") == f"{VIP}:80"]
        if any(f["flow"]["verdict"] == "DROPPED" for f in through):
            break
        time.sleep(0.3)
    dropped = next(f for f in through if f["flow"]["verdict"] == "DROPPED")
    assert dropped["flow"]["destination_service"] == {"name": "deathstar", "namespace": "default"}
    assert dropped["flow"]["IP"]["destination"] == node.address("deathstar")
    compact = node.ok("observe", "--last", "200", "--verdict", "DROPPED").out
    assert f"-> {VIP}:80 (svc default/deathstar) -> " in compact

    # a live trace to the service address explains the backend choice
    trace = node.cilia("policy", "trace", "--from-endpoint", "xwing", "--dst-cidr", VIP, "--dport", "80", "-o", "json")
    assert trace.code == 0, trace.out
    assert json.loads(trace.out)["service"]["chosen"] == f"{node.address('deathstar')}:80"

    node.ok("service", "delete", "1")
    assert shoot_vip(node, "xwing", timeout=1.0) in (TIMEOUT, CLOSED)  # nothing answers the address any more

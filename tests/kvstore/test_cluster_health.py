"""Cluster health between two real agents, each in a network namespace of its own (two simulated
nodes on a bridge, etcd on the bridge's address): each serves /hello on its node IP and probes the
other (ICMP echo and HTTP); a node whose agent dies shows HTTP failing and ICMP answering, a node
cut off shows both failing, in `cilia health status`, `cilia status` and the metrics."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cilia.agent.client import AgentClient
from tests.agent.agent_support import AgentProcess, run_cli
from tests.kvstore import etcd_support
from tests.kvstore.etcd_support import EtcdCluster
from tests.kvstore.test_agents_etcd import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

TAG = f"coh{os.getpid() % 100000}"
BRIDGE_IP = "10.213.251.1"
NODE_IPS = {"a": "10.213.251.11", "b": "10.213.251.12"}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextmanager
def two_nodes() -> Iterator[dict[str, str]]:
    """A bridge in this namespace and two node namespaces plugged into it; yields node -> netns."""
    bridge = f"{TAG}br"
    made: list[str] = []
    try:
        ip("link", "add", bridge, "type", "bridge")
        ip("addr", "add", f"{BRIDGE_IP}/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        netns = {}
        for node, address in NODE_IPS.items():
            ns, host_side = f"{TAG}-{node}", f"{TAG}{node}"
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "add", host_side, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", host_side, "master", bridge, "up")
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            ip("-n", ns, "link", "set", "lo", "up")
            netns[node] = ns
        yield netns
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


def health(state: Path) -> dict[str, Any]:
    res = run_cli(state, "health", "status", "-o", "json")
    assert res.code in (0, 1), res.err
    return res.json()  # type: ignore[no-any-return]


def peer(state: Path, name: str) -> dict[str, Any] | None:
    return next((n for n in health(state)["nodes"] if n["name"] == name), None)


def metric_lines(state: Path) -> list[str]:
    client = AgentClient(state / "cilia.sock", timeout=5)
    try:
        return [line for line in client.metrics().splitlines() if line.startswith("cilia_node_connectivity")]
    finally:
        client.close()


def test_nodes_probe_each_other_and_a_node_that_stops_answering_shows(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with two_nodes() as netns:
        monkeypatch.setattr(etcd_support, "HOST", BRIDGE_IP)  # reachable from the node namespaces
        etcd = EtcdCluster(tmp_path, members=1)
        agents: dict[str, AgentProcess] = {}
        try:
            for node, address in NODE_IPS.items():
                state = tmp_path / node
                state.mkdir()
                agents[node] = AgentProcess(
                    state, "--envoy", "none", "--node-id", f"node-{node}", "--kvstore", "etcd",
                    "--kvstore-endpoints", etcd.endpoints_arg, "--kvstore-lease-ttl", "60", "--node-ip", address,
                    wrapper=("ip", "netns", "exec", netns[node]))
                agents[node].start()
            a, b = tmp_path / "a", tmp_path / "b"

            def answered(state: Path, name: str) -> bool:
                h = peer(state, name)
                return h is not None and h["reachable"]

            wait_until("a reaches b", lambda: answered(a, "node-b"))
            wait_until("b reaches a", lambda: answered(b, "node-a"))
            seen = peer(a, "node-b")
            assert seen is not None and seen["address"] == NODE_IPS["b"]
            assert seen["icmp"]["latency_seconds"] > 0 and seen["http"]["latency_seconds"] > 0
            report = health(a)
            assert report["serving"] == f"{NODE_IPS['a']}:4240" and [n["name"] for n in report["nodes"]] == ["node-b"]
            labels = f'source_node="node-a",target_address="{NODE_IPS["b"]}",target_node="node-b"'
            assert f'cilia_node_connectivity_status{{{labels},type="icmp"}} 1.0' in metric_lines(a)
            assert any(line.startswith(f'cilia_node_connectivity_latency_seconds{{{labels},type="http"}}')
                       for line in metric_lines(a))
            text = run_cli(a, "health", "status")
            assert text.code == 0 and "node-b" in text.out and "yes" in text.out
            both = run_cli(a, "status", "--cluster")
            assert both.code == 0 and "Cluster health: 1/1 other node(s) reachable" in both.out
            assert "node-b" in both.out and f"{NODE_IPS['b']}" in both.out
            assert run_cli(a, "status", "--cluster", "-o", "json").json()["cluster_health"]["nodes"][0]["reachable"]

            proc = agents["b"].proc  # b's agent dies: its node still answers ICMP, not HTTP
            assert proc is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()

            def http_down(state: Path) -> bool:
                h = peer(state, "node-b")
                return h is not None and not h["http"]["ok"] and h["icmp"]["ok"]

            wait_until("a sees b's agent gone", lambda: http_down(a), timeout=15)
            assert f'cilia_node_connectivity_status{{{labels},type="http"}} 0.0' in metric_lines(a)
            failed = run_cli(a, "health", "status")
            assert failed.code == 1 and "NO" in failed.out
            status = run_cli(a, "status", "-o", "json").json()
            assert status["kvstore"]["health"]["unreachable"] == ["node-b"]

            ip("link", "set", f"{TAG}b", "down")  # b cut off the wire: no echo either

            def all_down(state: Path) -> bool:
                h = peer(state, "node-b")
                return h is not None and not h["http"]["ok"] and not h["icmp"]["ok"]

            wait_until("a sees b cut off", lambda: all_down(a), timeout=15)
            assert "no ICMP echo reply" in (peer(a, "node-b") or {})["icmp"]["error"]
        finally:
            for agent in agents.values():
                agent.stop()
            etcd.close()
        for node in NODE_IPS:
            assert "Traceback" not in (tmp_path / f"{node}-agent.log").read_text()

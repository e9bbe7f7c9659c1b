"""Star Wars across three simulated nodes (real etcd, real agents with the BPF datapath and their
Envoys), in direct-routing and VXLAN modes: policy between pods of different nodes is judged by
identity, in the receiving node's kernel at L3/L4 and its Envoy at L7; other nodes are
remote-node; an outside host reaches L7 ports through the proxy; a lost etcd member changes
nothing and a killed agent's pods vanish from the others after its lease.

One cluster per mode is shared by the module's tests (in order: each test leaves the cluster as
the next expects it; the faults come last)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cilia.bpf.crossnode import ROUTE_PROTO, VXLAN_DEVICE
from cilia.bpf.loader import EGRESS_PARENT, INGRESS_PARENT
from cilia.bpf.netns import netlink, run_in_netns
from cilia.cluster import keys
from tests.cluster.cluster_support import (
    BLOCKED,
    OUTSIDE_IP,
    SHIPS,
    STARWARS,
    SimCluster,
    add_local_address,
    tcp_open,
    wait_until,
)
from tests.helpers import require_bpf

LAND = ("POST", "/v1/request-landing")
EXHAUST = ("PUT", "/v1/exhaust-port")
PLAIN_PORT = 8080  # deathstar's port without L7 rules
UNKNOWN_SOURCE = "10.224.1.99"  # in node 1's pod prefix, no endpoint's: routed back to node 1


@pytest.fixture(scope="module", params=["disabled", "vxlan"], ids=["direct", "vxlan"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimCluster]:
    require_bpf()
    c = SimCluster(tmp_path_factory.mktemp(f"cdp-{request.param}"), tunnel=request.param).start()
    try:
        c.ids = {name: c.add_ship(name) for name in SHIPS}  # type: ignore[attr-defined]
        c.import_policy(STARWARS / "sw_l3_l4_l7_policy.yaml")
        yield c
    finally:
        c.close()


def ids(c: SimCluster) -> dict[str, int]:
    return c.ids  # type: ignore[attr-defined,no-any-return]


def drops(c: SimCluster, i: int) -> list[dict[str, Any]]:
    """Node i's recent drop events (`cilia monitor`), flattened: source/destination address and identity."""
    out = c.node(i).cilia("monitor", "--type", "drop", "--last", "100", "--no-follow", "-o", "json").out
    events = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [{**e, "source": e["source"]["address"], "source_identity": e["source"]["identity"],
             "destination_port": e["destination"]["port"], "source_labels": e["source"].get("labels")}
            for e in events]


def test_starwars_across_nodes(cluster: SimCluster) -> None:
    c = cluster
    # tiefighter (node 2) lands on deathstar (node 3) once node 3 knows its identity from etcd
    wait_until("tiefighter lands", lambda: c.shoot("tiefighter", *LAND) == "200 Ship landed", timeout=60)
    assert c.node(2).cilia("node", "list", "-o", "json").json()["nodes"][2]["pod_cidr"] == "10.224.3.0/24"
    routing = c.node(1).cilia("status", "-o", "json").json()["kvstore"]["routing"]
    assert routing["mode"] == ("vxlan" if c.tunnel == "vxlan" else "direct") and routing["error"] is None
    assert routing["routes"] == {"10.224.2.0/24": "10.223.0.2", "10.224.3.0/24": "10.223.0.3"}
    # the exhaust port is refused by node 3's Envoy
    assert c.shoot("tiefighter", *EXHAUST) == "403 Access denied"
    # xwing (node 1) is dropped in node 3's kernel (the sender's egress policy allows it)
    assert c.shoot("xwing", *LAND, timeout=1.0) == BLOCKED
    xwing_ip = SHIPS["xwing"][1]
    seen = wait_until("node 3's monitor shows xwing's drop", lambda: [
        e for e in drops(c, 3) if e.get("source") == xwing_ip and e.get("reason_text") == "Policy denied"])
    assert seen[-1]["source_identity"] == ids(c)["xwing"]
    assert not [e for e in drops(c, 1) if e.get("source") == xwing_ip]  # not on the sender's node
    # node 3's observe names tiefighter by its labels, with Envoy's 403
    flows = wait_until("node 3 observed tiefighter's requests", lambda: [
        f for f in c.node(3).cilia("observe", "--last", "50", "-o", "json").out.splitlines()
        if "class=tiefighter" in f and "403" in f])
    assert "exhaust-port" in flows[-1]


def test_outside_host_reaches_an_l7_port_through_the_proxy(cluster: SimCluster, tmp_path: Path) -> None:
    c = cluster
    assert c.shoot_from(c.outside, *LAND, timeout=1.0) == BLOCKED  # world is not allowed yet
    policy = tmp_path / "world.yaml"
    policy.write_text(WORLD_POLICY)
    c.import_policy(policy, nodes=(3,))
    try:
        # redirected to node 3's Envoy at the underlay device and judged there by the HTTP rules
        assert c.shoot_from(c.outside, *LAND) == "200 Ship landed"
        assert c.shoot_from(c.outside, "GET", "/v1/") == "403 Access denied"
        # Envoy's access log names the outside host as world (it flushes about once a second)
        wait_until("node 3 observed the outside host's request", lambda: [
            f for f in c.node(3).cilia("observe", "--last", "20", "--ip", OUTSIDE_IP, "-o", "json").out.splitlines()
            if "reserved:world" in f and "request-landing" in f])
    finally:
        c.node(3).cilia("policy", "delete", "world-landing")


def test_cluster_entity_takes_in_other_nodes_pods_not_the_world(cluster: SimCluster, tmp_path: Path) -> None:
    c = cluster
    policy = tmp_path / "cluster.yaml"
    policy.write_text(WORLD_POLICY.replace("world-landing", "cluster-landing").replace("[world]", "[cluster]"))
    c.import_policy(policy, nodes=(3,))
    try:
        assert c.shoot("xwing", *LAND) == "200 Ship landed"  # a pod of node 1 is in the cluster
        assert c.shoot("xwing", *EXHAUST) == "403 Access denied"
        assert c.shoot_from(c.outside, *LAND, timeout=1.0) == BLOCKED  # an outside host is not
    finally:
        c.node(3).cilia("policy", "delete", "cluster-landing")
    assert c.shoot("xwing", *LAND, timeout=1.0) == BLOCKED


def test_other_nodes_are_remote_node(cluster: SimCluster, tmp_path: Path) -> None:
    c = cluster
    node1 = c.node(1).netns
    assert c.shoot_from(node1, *LAND, timeout=1.0) == BLOCKED
    seen = wait_until("node 3 drops node 1's own request as remote-node", lambda: [
        e for e in drops(c, 3) if e.get("source_identity") == 6 and e.get("destination_port") == 80])
    assert seen[-1]["reason_text"] == "Policy denied"
    c.listen("deathstar", PLAIN_PORT)
    policy = tmp_path / "remote-node.yaml"
    policy.write_text(REMOTE_NODE_POLICY)
    c.import_policy(policy, nodes=(3,))
    try:
        assert c.shoot_from(node1, *LAND) == "200 Ship landed"
        assert c.shoot_from(node1, *EXHAUST) == "403 Access denied"
        # An L3/L4 port, from an address of node 1 that node 3's ipcache does not know: by direct
        # routing the address decides (world: dropped); through the tunnel the identity in the
        # packet does (node 1's host, remote-node on arrival: admitted).
        deathstar = SHIPS["deathstar"][1]
        assert tcp_open(node1, deathstar, PLAIN_PORT)
        add_local_address(node1, UNKNOWN_SOURCE)
        assert tcp_open(node1, deathstar, PLAIN_PORT, source=UNKNOWN_SOURCE) is (c.tunnel == "vxlan")
    finally:
        c.node(3).cilia("policy", "delete", "remote-node-landing")


def test_the_node_itself_reaches_an_l7_port_through_the_proxy(cluster: SimCluster, tmp_path: Path) -> None:
    """--allow-localhost policy (the default without Kubernetes): node 3's own request to its pod
    is judged as host; allowed with L7 rules, it is bounced to Envoy (no "No proxy" drop)."""
    c = cluster
    node3 = c.node(3).netns
    assert c.shoot_from(node3, *LAND, timeout=1.0) == BLOCKED
    seen = wait_until("node 3 drops its own request as host", lambda: [
        e for e in drops(c, 3) if e.get("source_identity") == 1 and e.get("destination_port") == 80])
    assert seen[-1]["reason_text"] == "Policy denied"
    policy = tmp_path / "host.yaml"
    policy.write_text(WORLD_POLICY.replace("world-landing", "host-landing").replace("[world]", "[host]"))
    c.import_policy(policy, nodes=(3,))
    try:
        assert c.shoot_from(node3, *LAND) == "200 Ship landed"
        assert c.shoot_from(node3, *EXHAUST) == "403 Access denied"
    finally:
        c.node(3).cilia("policy", "delete", "host-landing")


def test_allow_localhost_always_lets_the_node_in_whatever_the_policy(cluster: SimCluster) -> None:
    c = cluster
    node3 = c.node(3)
    node3.agent.stop()  # the kernel keeps enforcing meanwhile; the restarted agent takes over
    node3.agent.args = (*node3.agent.args, "--allow-localhost", "always")
    node3.agent.start(timeout=90)
    # allowed at L3, so L7 is allow-all for the host, as in Cilium (kubelet probes reach any path)
    assert c.shoot_from(node3.netns, *EXHAUST) == "200 Panic: deathstar exploded"
    # and nothing else changed: other nodes' pods are judged as before
    assert c.shoot("tiefighter", *EXHAUST) == "403 Access denied"
    assert c.shoot("xwing", *LAND, timeout=1.0) == BLOCKED


def test_a_lost_etcd_member_changes_nothing(cluster: SimCluster) -> None:
    c = cluster
    assert c.etcd is not None
    c.etcd.stop_member(0)
    try:
        assert c.shoot("tiefighter", *LAND) == "200 Ship landed"
        assert c.shoot("xwing", *LAND, timeout=1.0) == BLOCKED
        assert all(n.cilia("status", "-o", "json").json()["kvstore"]["connected"] for n in c.nodes)
    finally:
        c.etcd.start_member(0)
        c.etcd.wait_healthy()


def test_a_killed_agent_leaves_enforcement_and_its_pods_vanish_after_the_lease(cluster: SimCluster) -> None:
    c = cluster
    node2 = c.node(2)
    assert node2.agent.proc is not None
    node2.agent.proc.kill()  # kill -9: no lease revoked, nothing cleaned up
    node2.agent.proc.wait()
    node2.agent.proc = None
    # node 3 keeps enforcing: node 2's programs stay attached, its pod still lands for a while ...
    assert c.shoot("xwing", *LAND, timeout=1.0) == BLOCKED
    tie_ip = SHIPS["tiefighter"][1]
    # ... and once node 2's lease expires, node 3 forgets tiefighter's address: it is world now
    wait_until("tiefighter's entry vanishes on node 3", lambda: not c.node(3).cilia(
        "kvstore", "get", keys.ip_key(tie_ip), "-o", "json").json()["entries"], timeout=30)
    wait_until("tiefighter is refused", lambda: c.shoot("tiefighter", *LAND, timeout=1.0) == BLOCKED, timeout=30)
    assert c.shoot("xwing", *LAND, timeout=1.0) == BLOCKED


WORLD_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: world-landing
spec:
  endpointSelector:
    matchLabels: {class: deathstar}
  ingress:
  - fromEntities: [world]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules:
        http: [{method: POST, path: /v1/request-landing}]
"""

REMOTE_NODE_POLICY = WORLD_POLICY.replace("world-landing", "remote-node-landing").replace(
    "[world]", "[remote-node]") + """\
  - fromEntities: [remote-node]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
"""


def test_cleanup_removes_routes_tunnel_and_the_underlay_program(cluster: SimCluster) -> None:
    """After the previous test node 2's agent is dead: `cilia cleanup` there removes what the
    cross-node datapath put on the node."""
    c = cluster
    node2 = c.node(2)
    assert node2.agent.proc is None
    assert underlay_state(node2.netns) != (0, False, 0)  # routes (and the tunnel) are there before
    done = subprocess.run(["nsenter", f"--net=/run/netns/{node2.netns}", sys.executable, "-m", "cilia", "cleanup",
                           "--state-dir", str(node2.state_dir)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "route(s) to other nodes' pods" in done.stdout
    assert underlay_state(node2.netns) == (0, False, 0)


def underlay_state(netns: str) -> tuple[int, bool, int]:
    """(routes of ours, tunnel device present, tc filters on eth0) in ``netns``."""
    def go() -> tuple[int, bool, int]:
        with netlink("cross-node state") as ipr:
            routes = [r for r in ipr.get_routes(family=socket.AF_INET, table=254) if r.get("proto") == ROUTE_PROTO]
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            filters = [m for parent in (INGRESS_PARENT, EGRESS_PARENT)
                       for m in ipr.get_filters(index=eth0, parent=parent) if m.get_attr("TCA_OPTIONS") is not None]
            return len(routes), bool(ipr.link_lookup(ifname=VXLAN_DEVICE)), len(filters)

    return run_in_netns(netns, go)

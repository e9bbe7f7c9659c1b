"""LoadBalancer against real pinned maps: only what changed is written, bad input is refused
before anything is, an agent restart (program loaded again over the pinned maps) rewrites
nothing and keeps connections, the bpf-lb sink realizes ``Desired.services``, and the kernel's
Maglev choice is the one the flow hash predicts."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator

import pytest
from tests.bpf.lb_support import BACKEND_PORT, SERVICES_MAX, TABLE_SIZE, VIP, VIP_PORT, LbNode, echo, lb_node

from cilia.bpf.lb import LbError, LbSyncResult, LoadBalancer
from cilia.bpf.loader import Loader
from cilia.bpf.netns import run_in_netns
from cilia.realizer.desired import Desired
from cilia.realizer.services import ServiceSink
from cilia.services.maglev import flow_hash, maglev_table
from cilia.services.model import Backend, Frontend

BACKENDS = ["b1", "b2", "b3"]


@pytest.fixture
def node() -> Iterator[LbNode]:
    with lb_node() as n:
        n.add_endpoint("client", "10.211.0.10", "app=client")
        for i, name in enumerate(BACKENDS):
            n.add_endpoint(name, f"10.211.0.{21 + i}", "app=backend")
            n.serve_name(name)
        n.sync()
        yield n


def test_sync_writes_only_what_changed(node: LbNode) -> None:
    lb = node.lb
    assert lb is not None
    a = node.service(BACKENDS, sid=1)
    b = node.service(BACKENDS[:2], sid=2, frontend=Frontend(VIP, 81))
    assert lb.sync([a, b]) == LbSyncResult(2, 0, 5, 0, 2)
    assert lb.sync([a, b]) == LbSyncResult()
    assert lb.sync([a, dataclasses.replace(b)]) == LbSyncResult()  # equal, not the same object
    # one backend leaves service 2: its row and that backend (the entry, 251 slots, is the same)
    assert lb.sync([a, node.service(BACKENDS[:1], sid=2, frontend=Frontend(VIP, 81))]) == LbSyncResult(0, 0, 0, 1, 1)
    assert lb.sync([a]) == LbSyncResult(0, 1, 0, 1, 0)
    assert [r["id"] for r in lb.rows()] == [1]
    assert {x["address"] for x in lb.rows()[0]["backends"]} == {f"{node.endpoints[n].address}:8080" for n in BACKENDS}


BAD_INPUT = [
    (lambda s: dataclasses.replace(s, id=0), "service 0: id must be"),
    (lambda s: dataclasses.replace(s, id=SERVICES_MAX), f"id must be 1..{SERVICES_MAX - 1}"),
    (lambda s: dataclasses.replace(s, frontend=Frontend(VIP, 0)), "frontend.port 0 out of range"),
    (lambda s: dataclasses.replace(s, frontend=Frontend("10.96.0.300", 80)), "frontend.address '10.96.0.300'"),
    (lambda s: dataclasses.replace(s, backends=(Backend("10.0.0.1", 80, 0),)), r"backends\[0\].weight 0 is not"),
    (lambda s: dataclasses.replace(s, backends=(Backend("10.0.0.1", 70000),)), r"backends\[0\].port 70000"),
    (lambda s: dataclasses.replace(s, backends=tuple(Backend(f"10.0.{i // 250}.{i % 250 + 1}", 80)
                                                     for i in range(TABLE_SIZE // 4 + 1))), "exceed the 62"),
    (lambda s: dataclasses.replace(s, algorithm="weighted-rr", backends=(Backend("10.0.0.1", 80, 250),
                                                                         Backend("10.0.0.2", 80, 3))),
     "add up to 253, more than the 251"),
]


def test_bad_input_is_refused_and_nothing_written(node: LbNode) -> None:
    """Each bad service beside a good one: refused with the field named, the maps as before (one
    node for all cases: loading the datapath is most of a case's time)."""
    lb = node.lb
    assert lb is not None
    good = node.service(BACKENDS, sid=2, frontend=Frontend(VIP, 81))
    for change, message in BAD_INPUT:
        lb.sync([good])
        bad = change(node.service(BACKENDS))  # type: ignore[operator]
        with pytest.raises(LbError, match=message):
            lb.sync([good, bad])
        assert [r["id"] for r in lb.rows()] == [2], message


def test_clashing_frontends_are_refused(node: LbNode) -> None:
    assert node.lb is not None
    with pytest.raises(LbError, match="frontend 10.96.0.10:80/TCP is already service 1's"):
        node.lb.sync([node.service(BACKENDS, sid=1), node.service(BACKENDS, sid=2)])
    assert node.lb.rows() == []


def test_agent_restart_rewrites_nothing_and_connections_carry_on(node: LbNode) -> None:
    assert node.lb is not None
    svc = node.service(BACKENDS, algorithm="random")
    node.lb.sync([svc])
    held = [node.open_to("client") for _ in range(6)]
    # the agent goes away: handles closed, programs stay attached, maps stay pinned
    node.datapath.stop_events()
    node.lb.close()
    node.loader.close()
    node.loader = Loader(pin_dir=node.loader.pin_dir, netns=node.node, lb_services_max=SERVICES_MAX,
                         lb_table_size=TABLE_SIZE)
    node.datapath.loader = node.loader
    node.loader.load()
    for ep in node.endpoints.values():  # the new program replaces the old in place
        node.datapath.upsert_endpoint(ep.ep_id, ep.address, ep.ns.host_if, node.engine.identity_of(ep.name).id)
    node.datapath.start_events()
    node.lb = LoadBalancer(node.loader)
    assert node.lb.sync([svc]) == LbSyncResult()
    for c, name in held:
        assert echo(c) == b"still here\n", name
        c.close()
    assert node.ask_tcp("client", 30)[""] == 0
    assert node.lb.rows()[0]["connections"] == 36


def test_sink_realizes_desired_services(node: LbNode) -> None:
    class Started:  # the NodeDatapath surface the sink uses: its load balancer once started
        lb = node.lb

    sink = ServiceSink(Started())  # type: ignore[arg-type]
    desired = Desired(1, {}, (), {}, services=(node.service(BACKENDS),))
    sink.realize(desired)
    assert sink.last is not None and sink.last.services_written == 1
    assert set(node.ask_tcp("client", 30)) <= set(BACKENDS)
    sink.realize(dataclasses.replace(desired, revision=2, services=()))
    assert sink.last.services_removed == 1 and node.lb is not None and node.lb.rows() == []


def test_kernel_maglev_choice_is_the_flow_hash_prediction(node: LbNode) -> None:
    assert node.lb is not None
    svc = node.service(BACKENDS)
    node.lb.sync([svc])
    active = sorted(svc.backends, key=lambda b: (b.address, b.port))  # the order LoadBalancer fills in
    table = maglev_table([(str(b), b.weight) for b in active], TABLE_SIZE)
    names = {node.endpoints[n].address: n for n in BACKENDS}
    client = node.endpoints["client"].address

    def connect_from(port: int) -> str:
        with socket.socket() as c:
            c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            c.bind((client, port))
            c.settimeout(2.0)
            c.connect((VIP, VIP_PORT))
            return c.recv(64).decode().strip()

    for port in range(41000, 41040):
        want = names[active[table[flow_hash(client, VIP, port, VIP_PORT, 6) % TABLE_SIZE]].address]
        assert run_in_netns(node.endpoints["client"].ns.name, lambda p=port: connect_from(p)) == want, port
    assert BACKEND_PORT == 8080


def test_a_frontend_passes_from_one_service_to_another(node: LbNode) -> None:
    assert node.lb is not None
    a = node.service(["b1"], sid=1)
    b = node.service(["b2"], sid=2, frontend=Frontend(VIP, 81))
    node.lb.sync([a, b])
    # in one sync: service 2 takes service 1's frontend, service 1 moves to port 82
    node.lb.sync([dataclasses.replace(b, frontend=a.frontend), dataclasses.replace(a, frontend=Frontend(VIP, 82))])
    assert {r["id"]: r["frontend"] for r in node.lb.rows()} == {1: f"{VIP}:82", 2: f"{VIP}:{VIP_PORT}"}
    assert node.ask_tcp("client", 3) == {"b2": 3}
    assert node.ask_tcp("client", 3, port=82) == {"b1": 3}


def test_per_service_metrics_from_the_kernel_counters(node: LbNode) -> None:
    from cilia.agent.agent_metrics import AgentStateCollector

    lb = node.lb
    assert lb is not None
    lb.sync([node.service(BACKENDS, states={"b3": "terminating"})])
    assert node.ask_tcp("client", 10)[""] == 0

    class AgentView:  # what the collector reads of an agent with the BPF datapath: its rows
        class node:  # noqa: N801 (the agent's attribute)
            started = True

        def bpf_lb(self) -> dict[str, object]:
            return {"services": lb.rows()}

    AgentView.node.lb = lb  # type: ignore[attr-defined]
    families = {f.name: f for f in AgentStateCollector(AgentView())._services()}
    labels = {"service_id": "1", "frontend": f"{VIP}:{VIP_PORT}/TCP", "name": ""}
    (conns,) = families["cilia_lb_service_connections"].samples
    assert conns.labels == labels and conns.value == 10
    assert families["cilia_lb_service_packets"].samples[0].value >= 30  # SYN, ACK, FIN at least
    by_state = {s.labels["state"]: s.value for s in families["cilia_lb_service_backends"].samples}
    assert by_state == {"active": 2, "terminating": 1}

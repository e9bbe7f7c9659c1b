"""Flows through a service name its frontend and the backend: Hubble's destination_service, our
``cilia.service_frontend``, and `cilia observe`'s ``FRONTEND (svc NS/NAME) -> BACKEND``.

The BPF load balancer's events carry the frontend (svc-dp's ``DatapathEvent.service_frontend``);
these flows are built as ``from_datapath`` builds them from such an event."""

from __future__ import annotations

import time

from tests.agent.hubble_fields import EXPORT_LINE, check

from cilia.agent.hubble import export_line
from cilia.agent.flows import Flow, Verdict, Who, names_of_services
from cilia.cli.observe_cmds import compact
from cilia.policy.labels import LabelSet
from cilia.services.model import Backend, Frontend, Service

SERVICES = (Service(1, Frontend("10.96.0.10", 80), (Backend("10.0.0.10", 8080),), name="deathstar"),
            Service(2, Frontend("0.0.0.0", 30080), (Backend("10.0.0.10", 8080),), type="NodePort", name="deathstar",
                    namespace="empire"),
            Service(3, Frontend("10.96.0.30", 53, "UDP"), (Backend("10.0.0.30", 53),)))
WHO = Who({"tiefighter": (("10.0.0.11",), 300), "deathstar": (("10.0.0.10",), 301)},
          {300: LabelSet.parse(["k8s:org=empire"]), 301: LabelSet.parse(["k8s:class=deathstar"])}, (),
          service_names=names_of_services(SERVICES))


def through(frontend: str) -> Flow:
    return Flow(time.time(), Verdict.FORWARDED, "l3/l4", WHO.peer("10.0.0.11", 40000), WHO.peer("10.0.0.10", 8080),
                "TCP", "egress", service_frontend=frontend, service=WHO.service(frontend))


def test_who_names_services_by_frontend() -> None:
    assert WHO.service("10.96.0.10:80") == ("default", "deathstar")
    assert WHO.service("192.168.1.5:30080") == ("empire", "deathstar")  # NodePort on every node address
    assert WHO.service("10.96.0.30:53") == ("", "")  # no name: nothing to show but the frontend
    assert WHO.service("10.96.0.10:81") == ("", "")


def test_a_flow_through_a_service_shows_frontend_and_backend() -> None:
    line = export_line(through("10.96.0.10:80"), 1)
    assert check(line, EXPORT_LINE) == []
    assert line["flow"]["destination_service"] == {"name": "deathstar", "namespace": "default"}
    assert line["flow"]["IP"]["destination"] == "10.0.0.10"
    assert line["cilia"]["service_frontend"] == "10.96.0.10:80"
    assert "-> 10.96.0.10:80 (svc default/deathstar) -> deathstar:8080 (ID:301) policy-verdict" in compact(line)
    unnamed = export_line(through("10.96.0.30:53"), 2)
    assert "destination_service" not in unnamed["flow"]
    assert "-> 10.96.0.30:53 -> deathstar:8080 (ID:301)" in compact(unnamed)
    direct = Flow(time.time(), Verdict.FORWARDED, "l3/l4", WHO.peer("10.0.0.11", 40000), WHO.peer("10.0.0.10", 8080))
    assert "service_frontend" not in export_line(direct, 3)["cilia"]
    assert "destination_service" not in export_line(direct, 3)["flow"]

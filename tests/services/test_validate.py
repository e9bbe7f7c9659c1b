"""Service checks: every bad field is refused with its name, the JSON form round-trips."""

from __future__ import annotations

from typing import Any

import pytest

from cilia.services.model import Backend, Frontend, Service
from cilia.services.validate import (
    MAX_BACKENDS,
    ServiceError,
    check_services,
    parse_backends,
    parse_frontend,
    service_from_json,
    service_to_json,
)


def body(**over: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": 1, "frontend": {"address": "10.96.0.10", "port": 80},
                           "backends": [{"address": "10.0.0.10", "port": 8080},
                                        {"address": "10.0.0.11", "port": 8080, "weight": 3}]}
    out.update(over)
    return out


def test_a_service_round_trips_through_its_json_form() -> None:
    s = service_from_json(body(algorithm="weighted-rr", affinity_seconds=30, name="web", namespace="prod",
                               labels={"app": "web"}))
    assert s == Service(1, Frontend("10.96.0.10", 80, "TCP"),
                        (Backend("10.0.0.10", 8080), Backend("10.0.0.11", 8080, 3)), "weighted-rr", 30,
                        "ClusterIP", "web", "prod", (("app", "web"),))
    assert service_from_json(service_to_json(s)) == s


@pytest.mark.parametrize(("over", "field", "says"), [
    ({"id": 0}, "id", "outside 1-16383"),
    ({"id": "7"}, "id", "expected a service id"),
    ({"frontend": {"address": "10.96.0.10", "port": 0}}, "frontend.port", "outside 1-65535"),
    ({"frontend": {"address": "10.96.0.10", "port": 65536}}, "frontend.port", "outside 1-65535"),
    ({"frontend": {"address": "10.96.0.300", "port": 80}}, "frontend.address", "not an IP address"),
    ({"frontend": {"address": "fd00::1", "port": 80}}, "frontend.address", "IPv4 only"),
    ({"frontend": {"address": "10.96.0.10", "port": 80, "protocol": "SCTP"}}, "frontend.protocol", "TCP, UDP"),
    ({"frontend": {"address": "0.0.0.0", "port": 80}}, "frontend.address", "NodePort only"),
    ({"frontend": {"address": "10.96.0.10"}}, "frontend.port", "required"),
    ({"backends": [{"address": "10.0.0.1", "port": 80, "weight": 0}]}, "backends[0].weight", "outside 1-65535"),
    ({"backends": [{"address": "10.0.0.1", "port": 80, "weight": 1.5}]}, "backends[0].weight", "positive weight"),
    ({"backends": [{"address": "10.0.0.1", "port": 80, "weight": True}]}, "backends[0].weight", "positive"),
    ({"backends": [{"address": "10.0.0.1", "port": 80}, {"address": "10.0.0.1", "port": 80}]},
     "backends[1]", "already backends[0]"),
    ({"backends": [{"address": "10.0.0.1", "port": 80, "state": "gone"}]}, "backends[0].state", "active"),
    ({"backends": [{"address": "0.0.0.0", "port": 80}]}, "backends[0].address", "not an address"),
    ({"backends": [{"address": "10.0.0.1", "port": 80, "colour": "red"}]}, "backends[0].colour", "unknown field"),
    ({"algorithm": "round-robin"}, "algorithm", "maglev, random, weighted-rr"),
    ({"affinity_seconds": -1}, "affinity_seconds", "outside 0-86400"),
    ({"affinity_seconds": 86401}, "affinity_seconds", "outside 0-86400"),
    ({"type": "LoadBalancer"}, "type", "ClusterIP, NodePort"),
    ({"labels": {"app": 3}}, "labels.app", "label value"),
    ({"namespace": "prod"}, "namespace", "without a name"),
    ({"colour": "red"}, "colour", "unknown field"),
])
def test_bad_fields_are_refused_by_name(over: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(ServiceError) as e:
        service_from_json(body(**over))
    assert e.value.field == field
    assert says in str(e.value)


def test_more_backends_than_the_map_holds_are_refused() -> None:
    many = [{"address": f"10.1.{i // 250}.{i % 250 + 1}", "port": 80} for i in range(MAX_BACKENDS + 1)]
    with pytest.raises(ServiceError, match=f"backends: {MAX_BACKENDS + 1} backends; a service holds at most"):
        service_from_json(body(backends=many))
    assert len(service_from_json(body(backends=many[:MAX_BACKENDS])).backends) == MAX_BACKENDS


def test_nodeport_may_take_every_node_address() -> None:
    s = service_from_json(body(type="NodePort", frontend={"address": "0.0.0.0", "port": 30080}))
    assert s.frontend.address == "0.0.0.0"


def test_frontends_clash_with_endpoints_and_other_services() -> None:
    s = service_from_json(body())
    other = service_from_json(body(id=2))
    with pytest.raises(ServiceError, match="frontend: 10.96.0.10:80/TCP is already service 2's frontend"):
        check_services(s, [other], {})
    with pytest.raises(ServiceError, match="frontend.address: 10.96.0.10 is endpoint db's address"):
        check_services(s, [], {"10.96.0.10": "db"})
    udp = service_from_json(body(id=2, frontend={"address": "10.96.0.10", "port": 80, "protocol": "UDP"}))
    check_services(s, [udp, s], {})  # another protocol, and itself (being replaced), are no clash
    node_port = service_from_json(body(id=3, type="NodePort", frontend={"address": "0.0.0.0", "port": 80}))
    with pytest.raises(ServiceError, match="already service 3's frontend"):
        check_services(s, [node_port], {})


def test_the_cli_text_forms() -> None:
    assert parse_frontend("10.96.0.10:53/udp") == {"address": "10.96.0.10", "port": 53, "protocol": "UDP"}
    assert parse_backends("10.0.0.1:80, 10.0.0.2:81", "1,4") == [
        {"address": "10.0.0.1", "port": 80, "weight": 1}, {"address": "10.0.0.2", "port": 81, "weight": 4}]
    with pytest.raises(ServiceError, match="frontend: 'web:80': expected IP:PORT"):
        parse_frontend("web:80")
    with pytest.raises(ServiceError, match="weights: 1 weights for 2 backends"):
        parse_backends("10.0.0.1:80,10.0.0.2:81", "1")
    with pytest.raises(ServiceError, match=r"backends\[1\].weight: '-2' is not a positive integer"):
        parse_backends("10.0.0.1:80,10.0.0.2:81", "1,-2")
    with pytest.raises(ServiceError, match=r"backends\[0\]: '10.0.0.1': expected IP:PORT"):
        parse_backends("10.0.0.1")


def test_the_limits_are_the_bpf_maps() -> None:
    """What validation lets through, the load balancer's maps hold (cilia/bpf/loader.py, lb.py)."""
    from cilia.bpf import loader
    from cilia.services import validate

    assert validate.MAX_SERVICE_ID == loader.LB_SERVICES_MAX - 1
    assert validate.MAX_BACKENDS == min(256, loader.LB_TABLE_SIZE // 4)
    assert validate.MAX_BACKENDS_TOTAL == loader.LB_BACKENDS_MAX


def test_backends_in_all_services_are_limited() -> None:
    s = service_from_json(body())
    check_services(s, [], {}, backends_elsewhere=65534)
    with pytest.raises(ServiceError, match="backends: 2 more backends than the 65536 all services may have "
                                           r"\(65535 are taken\)"):
        check_services(s, [], {}, backends_elsewhere=65535)

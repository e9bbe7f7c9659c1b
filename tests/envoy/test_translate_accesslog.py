"""Access logs name the deciding rule: Star Wars L7 policy through a real Envoy → gRPC access log.

Envoy listens on 127.0.0.10 (deathstar) and forwards to a deathstar HTTP server on 127.0.0.1;
tiefighter connects from 127.0.0.11. Envoy streams each request to a cilia AccessLogReceiver over
gRPC; the record's ``rule`` is the RBAC action that decided, named by cilia.envoy.translate.
"""

from __future__ import annotations

import http.client
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.envoy.envoy_support import deathstar_backend, envoy_serving, wait_records

from cilia.envoy.accesslog import Verdict, serve
from cilia.netutil import free_port
from cilia.envoy.translate import AccessLogTarget, PortMapping, ProxyResources, prefixes_by_identity, translate_ingress
from cilia.policy import Endpoint, LabelSet, PolicyEngine, load_files

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "examples" / "starwars" / "sw_l3_l4_l7_policy.yaml"
DEATHSTAR, TIEFIGHTER = "127.0.0.10", "127.0.0.11"
HTTP_RULE = f"default/rule1 ingress[0].toPorts[0] ({POLICY}:21)"  # line of `- method: "POST"`
DEFAULT_DENY = f"default deny: default/rule1 ingress[0].toPorts[0] ({POLICY}:16)"


def starwars(listen_port: int, backend_port: int, access_log: AccessLogTarget | None) -> ProxyResources:
    engine = PolicyEngine()
    for name, labels, ip in (("deathstar", "org=empire,class=deathstar", DEATHSTAR),
                             ("tiefighter", "org=empire,class=tiefighter", TIEFIGHTER)):
        engine.upsert_endpoint(Endpoint(name, LabelSet.parse(labels), (ipaddress.ip_address(ip),)))
    engine.apply(load_files([POLICY]))
    return translate_ingress("deathstar", engine.endpoint_policy("deathstar").map_state.ingress,
                             [PortMapping(80, listen_port, backend_port)], DEATHSTAR, "127.0.0.1",
                             prefixes_by_identity(engine.ipcache.items()), access_log)


def serialized(res: ProxyResources) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in (*res.listeners, *res.clusters)]


def test_access_log_cluster_and_named_rules_are_deterministic() -> None:
    target = AccessLogTarget("cilia-accesslog", "unix:/run/cilia/accesslog.sock")
    res = starwars(80, 8080, target)
    assert serialized(res) == serialized(starwars(80, 8080, target))
    assert [c.name for c in res.clusters] == ["deathstar-ingress-80", "cilia-accesslog"]
    assert res.clusters[1].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.pipe.path \
        == "/run/cilia/accesslog.sock"
    text = b"".join(serialized(res))
    assert HTTP_RULE.encode() in text and DEFAULT_DENY.encode() in text
    assert b"envoy.access_loggers.http_grpc" not in b"".join(serialized(starwars(80, 8080, None)))


@pytest.fixture
def backend_port() -> Iterator[int]:
    with deathstar_backend() as port:
        yield port


def request(port: int, method: str, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(DEATHSTAR, port, timeout=5, source_address=(TIEFIGHTER, 0))
    try:
        conn.request(method, path, body=b"", headers={"Host": "deathstar.default.svc.cluster.local"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def test_records_name_the_rule_that_forwarded_or_denied(tmp_path: Path, backend_port: int) -> None:
    server, _ = serve(f"unix:{tmp_path}/als.sock")
    try:
        listen_port = free_port(DEATHSTAR)
        target = AccessLogTarget("cilia-accesslog", f"unix:{tmp_path}/als.sock")
        with envoy_serving(starwars(listen_port, backend_port, target)):
            assert request(listen_port, "POST", "/v1/request-landing") == (200, "Ship landed\n")
            assert request(listen_port, "PUT", "/v1/exhaust-port") == (403, "Access denied\r\n")
            records = wait_records(server.receiver, 2)
    finally:
        server.stop(0)
    landed, exhaust = sorted(records, key=lambda r: r.method)
    assert (landed.method, landed.path, landed.status, landed.verdict) == \
        ("POST", "/v1/request-landing", 200, Verdict.FORWARDED)
    assert landed.rule == HTTP_RULE
    assert (exhaust.method, exhaust.path, exhaust.status, exhaust.verdict) == \
        ("PUT", "/v1/exhaust-port", 403, Verdict.DENIED)
    assert exhaust.rule == DEFAULT_DENY
    assert {landed.log_name, exhaust.log_name} == {"deathstar-ingress-80"}
    assert (landed.source_address, landed.destination_address) == (TIEFIGHTER, DEATHSTAR)

"""The Star Wars demo through a real Envoy: policy → cilia.envoy.translate → cilia.xds → Envoy.

Envoy listens on 127.0.0.10 (deathstar's address) and forwards to a deathstar HTTP server on
127.0.0.1; tiefighter (127.0.0.11) and xwing (127.0.0.12) connect from their own loopback
addresses, so Envoy tells them apart by source IP exactly as the translation expects.
"""

from __future__ import annotations

import http.client
import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.envoy.envoy_support import deathstar_backend, envoy_serving

from cilia.envoy.loopback import LoopbackEnvoy
from cilia.netutil import free_port
from cilia.envoy.translate import PortMapping, ProxyResources, prefixes_by_identity, translate_ingress
from cilia.policy import Endpoint, LabelSet, PolicyEngine, load_files

REPO = Path(__file__).resolve().parents[2]
STARWARS = REPO / "examples" / "starwars"
DEATHSTAR, TIEFIGHTER, XWING = "127.0.0.10", "127.0.0.11", "127.0.0.12"


@dataclass
class Demo:
    engine: PolicyEngine
    proxy: LoopbackEnvoy | None
    backend_port: int
    listen_port: int

    def resources(self) -> ProxyResources:
        """deathstar's ingress policy, its port 80 served by Envoy on ``listen_port``."""
        ep = self.engine.endpoint_policy("deathstar")
        res = translate_ingress(
            "deathstar", ep.map_state.ingress, [PortMapping(80, self.listen_port, self.backend_port)],
            DEATHSTAR, "127.0.0.1", prefixes_by_identity(self.engine.ipcache.items()))
        assert res.notes == ()
        return res

    def request(self, source: str, method: str, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection(DEATHSTAR, self.listen_port, timeout=5, source_address=(source, 0))
        try:
            conn.request(method, path, body=b"", headers={"Host": "deathstar.default.svc.cluster.local"})
            resp = conn.getresponse()
            return resp.status, resp.read().decode()
        finally:
            conn.close()


@pytest.fixture
def demo() -> Iterator[Demo]:
    with deathstar_backend() as backend_port:
        engine = PolicyEngine()
        for name, labels, ip in (("deathstar", "org=empire,class=deathstar", DEATHSTAR),
                                 ("tiefighter", "org=empire,class=tiefighter", TIEFIGHTER),
                                 ("xwing", "org=alliance,class=xwing", XWING)):
            engine.upsert_endpoint(Endpoint(name, LabelSet.parse(labels), (ipaddress.ip_address(ip),)))
        engine.apply(load_files([STARWARS / "sw_l3_l4_l7_policy.yaml"]))
        demo = Demo(engine, None, backend_port, free_port(DEATHSTAR))
        with envoy_serving(demo.resources()) as proxy:
            demo.proxy = proxy
            yield demo


def test_starwars_l7_policy_then_l3_l4_policy_on_a_real_envoy(demo: Demo) -> None:
    assert demo.request(TIEFIGHTER, "POST", "/v1/request-landing") == (200, "Ship landed\n")
    assert demo.request(TIEFIGHTER, "PUT", "/v1/exhaust-port") == (403, "Access denied\r\n")
    # Full matches: a longer path or a query string is not the allowed path.
    assert demo.request(TIEFIGHTER, "POST", "/v1/request-landing/x")[0] == 403
    assert demo.request(TIEFIGHTER, "POST", "/v1/request-landing?x=1")[0] == 403
    assert demo.request(TIEFIGHTER, "GET", "/v1/request-landing")[0] == 403
    with pytest.raises(ConnectionError):  # network RBAC closes before any HTTP response
        demo.request(XWING, "POST", "/v1/request-landing")

    demo.engine.apply(load_files([STARWARS / "sw_l3_l4_policy.yaml"]))  # replaces rule1: L3/L4 only
    assert demo.proxy is not None
    demo.proxy.publish(demo.resources())
    assert demo.request(TIEFIGHTER, "PUT", "/v1/exhaust-port") == (200, "Panic: deathstar exploded\n")
    assert demo.request(TIEFIGHTER, "POST", "/v1/request-landing") == (200, "Ship landed\n")
    with pytest.raises(ConnectionError):
        demo.request(XWING, "PUT", "/v1/exhaust-port")

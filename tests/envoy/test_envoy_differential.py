"""Differential check: for a corpus of policies and requests, what Envoy does is what ``trace`` says.

One real Envoy (fed over xDS by ``translate_ingress``) fronts a backend that answers 200 to any
request, on 127.0.0.10 for the ``web`` endpoint. Three labelled clients connect from
127.0.0.11-13 and an unlabelled one from 127.0.0.20, which the ipcache maps to ``world``. Each
policy is published once; every request of the corpus is then sent from every client, and its
outcome compared with ``trace`` for the same flow:

* 200 ⇔ trace allows;
* ``403 Access denied`` ⇔ trace denies at L7 (the ingress L7 verdict is a denial);
* a connection closed before any response ⇔ trace denies at L3/L4.

All mismatches are collected, so one run shows every one of them.
"""

from __future__ import annotations

import http.client
import ipaddress
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.envoy.envoy_support import envoy_serving

from cilia.envoy.loopback import LoopbackEnvoy
from cilia.netutil import free_port
from cilia.envoy.translate import (
    ACCESS_DENIED_BODY,
    PortMapping,
    ProxyResources,
    prefixes_by_identity,
    relevant_prefixes,
    translate_ingress,
)
from cilia.policy import (
    Endpoint,
    HTTPRequest,
    LabelSet,
    Peer,
    Policy,
    PolicyEngine,
    Protocol,
    TraceRequest,
    parse_text,
    trace,
)

WEB = "127.0.0.10"
WEB_LABELS = LabelSet.parse(["app=web"])
CLIENTS: dict[str, tuple[str, LabelSet | None]] = {
    "frontend": ("127.0.0.11", LabelSet.parse(["app=frontend"])),
    "admin": ("127.0.0.12", LabelSet.parse(["app=admin", "team=ops"])),
    "batch": ("127.0.0.13", LabelSet.parse(["app=batch"])),
    "world": ("127.0.0.20", None),  # no endpoint: the ipcache says world-ipv4
}
HOST = "api.example.com"

ALLOWED, L7_DENIED, CLOSED = "200", "403", "closed"


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    host: str = HOST
    headers: tuple[tuple[str, str], ...] = ()

    def __str__(self) -> str:
        extra = "".join(f" {k}: {v}" for k, v in self.headers)
        return f"{self.method} {self.host}{self.path}{extra}"


REQUESTS = (
    Req("GET", "/a"),
    Req("GET", "/a/b"),
    Req("GET", "/ab"),
    Req("POST", "/a"),
    Req("PUT", "/b"),
    Req("GET", "/a", host="db.internal"),
    Req("GET", "/a", host="api.example.com.evil"),
    Req("GET", "/a", headers=(("X-Token", "s3cret"),)),
    Req("GET", "/a", headers=(("X-Token", "wrong"),)),
    Req("GET", "/a", headers=(("X-Trace", "1"),)),
)


def _cnp(name: str, spec: str) -> str:
    head = f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n"
    body = "  endpointSelector: {matchLabels: {app: web}}\n" + spec
    return head + body


FE = "{matchLabels: {app: frontend}}"
ADM = "{matchLabels: {app: admin}}"
BATCH = "{matchLabels: {app: batch}}"
PORT80 = '[{port: "80", protocol: TCP}]'

POLICIES: dict[str, str] = {
    # Enough rules (>= rbac.TREE_MIN_RULES) that the translation puts a :path prefix map in front
    # of them: overlapping prefixes, a quantified last character, a rule with no literal prefix.
    "many-paths": _cnp("many-paths", f"""
  ingress:
  - fromEndpoints: [{FE}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: PUT, path: '/a/b.*'}}
        - {{method: GET, path: '/a/c'}}
        - {{method: GET, path: '/ab+'}}
        - {{method: POST, path: /a}}
        - {{method: DELETE, path: '/a.*'}}
        - {{method: GET, path: '/x/.*'}}
        - {{method: GET, path: '/y'}}
        - {{method: PUT, path: '/[ab]'}}
        - {{method: GET, path: '.*/b'}}
        - {{method: GET, path: '/aX?'}}
"""),
    "l3-only": _cnp("l3-only", f"""
  ingress:
  - fromEndpoints: [{FE}]
"""),
    "l3-l4": _cnp("l3-l4", f"""
  ingress:
  - fromEndpoints: [{FE}]
    toPorts: [{{ports: {PORT80}}}]
  - fromEndpoints: [{ADM}]
    toPorts: [{{ports: [{{port: "8080", protocol: TCP}}]}}]
"""),
    "method-path": _cnp("method-path", f"""
  ingress:
  - fromEndpoints: [{FE}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: GET, path: '/a.*'}}
        - {{method: POST, path: /a}}
  - fromEndpoints: [{ADM}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: 'P.*', path: '/[ab]'}}
"""),
    "host": _cnp("host", rf"""
  ingress:
  - fromEndpoints: [{FE}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - host: 'api\.example\.com'
  - fromEndpoints: [{ADM}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{host: '.*\.internal', method: GET}}
"""),
    "headers": _cnp("headers", f"""
  ingress:
  - fromEndpoints: [{FE}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - headers: ["X-Token: s3cret"]
  - fromEndpoints: [{ADM}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{path: /a, headers: [X-Trace]}}
"""),
    "ored-rules": _cnp("ored-rules", f"""
  ingress:
  - fromEndpoints: [{FE}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: GET, path: /a}}
  - fromEndpoints: [{{matchExpressions: [{{key: app, operator: In, values: [frontend, admin]}}]}}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: POST, path: '/a.*'}}
"""),
    "l4-opens-l7": _cnp("l4-opens-l7", f"""
  ingress:
  - fromEndpoints: [{FE}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: GET, path: /a}}
  - toPorts: [{{ports: {PORT80}}}]
"""),
    "l3-peer-on-l7-port": _cnp("l3-peer-on-l7-port", f"""
  ingress:
  - fromEndpoints: [{FE}]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: GET, path: '/a.*'}}
  - fromEndpoints: [{ADM}]
"""),
    "deny-one-peer": _cnp("deny-one-peer", f"""
  ingress:
  - fromEntities: [all]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: GET}}
  ingressDeny:
  - fromEndpoints: [{BATCH}]
"""),
    "world-entity": _cnp("world-entity", f"""
  ingress:
  - fromEntities: [world]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: GET, path: '/a/.*'}}
  - fromEndpoints: [{ADM}]
    toPorts: [{{ports: {PORT80}}}]
"""),
    "cluster-entity": _cnp("cluster-entity", f"""
  ingress:
  - fromEntities: [cluster]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: GET, path: /a}}
"""),
    "cidr": _cnp("cidr", f"""
  ingress:
  - fromCIDR: [127.0.0.0/24]
    toPorts:
    - ports: {PORT80}
      rules:
        http:
        - {{method: GET, path: '/a.*'}}
"""),
}

# Known, reported mismatches: (policy, client, str(request)) excluded from the assertion.
KNOWN_MISMATCHES: frozenset[tuple[str, str, str]] = frozenset()


class AnyRequest(BaseHTTPRequestHandler):
    """The backend: 200 to any method and path."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        data = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_POST = do_GET  # noqa: N815
    do_PUT = do_GET  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's signature)
        pass


def _parse(name: str) -> list[Policy]:
    result = parse_text(POLICIES[name], f"{name}.yaml")
    assert result.ok and len(result.policies) == 1, (name, [str(p) for p in result.problems])
    return result.policies


def _resources(engine: PolicyEngine, listen_port: int, backend_port: int) -> ProxyResources:
    # the prefixes the agent's proxy sink hands it: only those that can change a verdict of this policy
    ingress = engine.endpoint_policy("web").map_state.ingress
    return translate_ingress("web", ingress, [PortMapping(80, listen_port, backend_port)], WEB, WEB,
                             relevant_prefixes(ingress, prefixes_by_identity(engine.ipcache.items())))


def _send(source: str, port: int, req: Req) -> str:
    """Envoy's outcome: "200", "403", "closed", or anything else verbatim (always a mismatch)."""
    conn = http.client.HTTPConnection(WEB, port, timeout=5, source_address=(source, 0))
    try:
        conn.request(req.method, req.path, body=b"", headers={"Host": req.host, **dict(req.headers)})
        resp = conn.getresponse()
        body = resp.read().decode()
        if resp.status == 403 and body == ACCESS_DENIED_BODY:
            return L7_DENIED
        return ALLOWED if resp.status == 200 else f"{resp.status} {body!r}"
    except ConnectionError:  # reset, or closed before any response (RemoteDisconnected)
        return CLOSED
    except TimeoutError:
        return "timeout"
    finally:
        conn.close()


def _traced(policies: list[Policy], client: str, req: Req) -> str:
    """What ``trace`` predicts Envoy does for this flow."""
    address, labels = CLIENTS[client]
    src = Peer(labels) if labels is not None else Peer(address=ipaddress.ip_address(address))
    result = trace(policies, TraceRequest(src, Peer(WEB_LABELS), Protocol.TCP, 80,
                                          HTTPRequest(req.method, req.path, req.host, req.headers)))
    if result.allowed:
        return ALLOWED
    ingress_l7 = result.ingress.l7
    if result.egress.allowed and ingress_l7 is not None and not ingress_l7.allowed:
        return L7_DENIED
    return CLOSED


@pytest.fixture(scope="module")
def web() -> Iterator[tuple[PolicyEngine, LoopbackEnvoy, int, int]]:
    """(engine, Envoy, listen port, backend port) for ``web``, with every client an endpoint."""
    backend = ThreadingHTTPServer((WEB, 0), AnyRequest)
    backend.daemon_threads = True
    threading.Thread(target=backend.serve_forever, name="web-backend", daemon=True).start()
    try:
        engine = PolicyEngine()
        engine.upsert_endpoint(Endpoint("web", WEB_LABELS, (ipaddress.ip_address(WEB),)))
        for name, (address, labels) in CLIENTS.items():
            if labels is not None:
                engine.upsert_endpoint(Endpoint(name, labels, (ipaddress.ip_address(address),)))
        backend_port = backend.server_address[1]
        listen_port = free_port(WEB)
        with envoy_serving(_resources(engine, listen_port, backend_port), "web-differential") as envoy:
            yield engine, envoy, listen_port, backend_port
    finally:
        backend.shutdown()
        backend.server_close()


def test_world_client_has_the_identity_trace_gives_it(web: tuple[PolicyEngine, LoopbackEnvoy, int, int]) -> None:
    engine = web[0]
    world_addr = ipaddress.ip_address(CLIENTS["world"][0])
    _, ident = engine.ipcache.lookup(world_addr)
    result = trace([], TraceRequest(Peer(address=world_addr), Peer(WEB_LABELS), Protocol.TCP, 80))
    assert result.src_identity.id == ident
    assert result.src_identity.is_world()


def test_envoy_does_what_trace_says(web: tuple[PolicyEngine, LoopbackEnvoy, int, int]) -> None:
    engine, envoy, listen_port, backend_port = web
    mismatches: list[str] = []
    seen: dict[str, set[str]] = {}
    total = 0
    for name in POLICIES:
        policies = _parse(name)
        engine.apply(policies)
        res = _resources(engine, listen_port, backend_port)
        assert res.notes == (), res.notes
        envoy.publish(res)
        for client, (address, _labels) in CLIENTS.items():
            for req in REQUESTS:
                total += 1
                expected = _traced(policies, client, req)
                got = _send(address, listen_port, req)
                seen.setdefault(name, set()).add(got)
                if got != expected and (name, client, str(req)) not in KNOWN_MISMATCHES:
                    mismatches.append(f"{name}: {client} {req}: trace says {expected}, Envoy gave {got}")
        engine.delete(engine.find_policies(name))
    assert total == len(POLICIES) * len(CLIENTS) * len(REQUESTS)
    assert mismatches == [], "\n".join(mismatches)
    # The corpus exercises all three outcomes (else it proves little).
    assert set().union(*seen.values()) == {ALLOWED, L7_DENIED, CLOSED}

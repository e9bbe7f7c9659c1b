"""toServices: k8sService and k8sServiceSelector stand for the selected services' backends, kept
up to date as services and backend endpoints change."""

from __future__ import annotations

from cilia.policy import PolicyEngine, Protocol, Verdict
from cilia.policy.compile import compile_policy
from cilia.services.model import Backend, Frontend, Service
from tests.policy.test_engine import cnp, ep

TCP = Protocol.TCP

TO_DB_SERVICE = """
endpointSelector: {matchLabels: {app: web}}
egress:
- toServices:
  - k8sService: {serviceName: db}
  toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"""
TO_LABELLED = """
endpointSelector: {matchLabels: {app: web}}
egress:
- toServices:
  - k8sServiceSelector: {selector: {matchLabels: {tier: data}}}
"""


def db_service(*addresses: str, name: str = "db", namespace: str = "", labels: tuple[tuple[str, str], ...] = (),
               service_id: int = 1) -> Service:
    return Service(service_id, Frontend(f"10.96.0.{service_id}", 5432),
                   tuple(Backend(a, 5432) for a in addresses), name=name, namespace=namespace, labels=labels)


def verdict(engine: PolicyEngine, name: str, address: str, port: int = 5432) -> Verdict | None:
    _, identity = engine.ipcache.lookup(address)
    hit = engine.endpoint_policy(name).map_state.egress.lookup(identity, TCP, port)
    return hit[2].verdict if hit is not None else None


def populated() -> PolicyEngine:
    engine = PolicyEngine()
    engine.upsert_endpoint(ep("web", "app=web", "10.0.0.1"))
    engine.upsert_endpoint(ep("db", "app=db", "10.0.0.10"))
    engine.upsert_endpoint(ep("other", "app=other", "10.0.0.20"))
    return engine


def test_without_services_to_services_allows_nothing_and_says_so() -> None:
    (policy,) = cnp(TO_DB_SERVICE, "p")
    notes = [str(n) for r in compile_policy(policy) for n in r.notes]
    assert any("toServices is resolved against the agent's services" in n for n in notes)
    engine = populated()
    engine.set_services([])
    engine.apply([policy])
    assert verdict(engine, "web", "10.0.0.10") is None
    assert not [n for r in compile_policy(policy, engine.service_view) for n in r.notes]


def test_k8s_service_allows_its_backends_identity_and_only_that() -> None:
    engine = populated()
    engine.apply(cnp(TO_DB_SERVICE, "p"))
    assert verdict(engine, "web", "10.0.0.10") is None  # no service yet: fail closed
    change = engine.set_services([db_service("10.0.0.10")])
    assert "web" in change.endpoints
    assert verdict(engine, "web", "10.0.0.10") is Verdict.ALLOW
    assert verdict(engine, "web", "10.0.0.10", 80) is None  # toPorts still applies
    assert verdict(engine, "web", "10.0.0.20") is None  # not a backend
    engine.set_services([])
    assert verdict(engine, "web", "10.0.0.10") is None


def test_another_namespace_is_not_selected_unless_named() -> None:
    engine = populated()
    engine.set_services([db_service("10.0.0.10", namespace="prod")])
    engine.apply(cnp(TO_DB_SERVICE, "p"))
    assert verdict(engine, "web", "10.0.0.10") is None
    engine.apply(cnp(TO_DB_SERVICE.replace("serviceName: db", "serviceName: db, namespace: prod"), "p"))
    assert verdict(engine, "web", "10.0.0.10") is Verdict.ALLOW


def test_selector_matches_service_labels() -> None:
    engine = populated()
    engine.set_services([db_service("10.0.0.10", name="db", labels=(("tier", "data"),)),
                         db_service("10.0.0.20", name="other", labels=(("tier", "web"),), service_id=2)])
    engine.apply(cnp(TO_LABELLED, "p"))
    assert verdict(engine, "web", "10.0.0.10") is Verdict.ALLOW
    assert verdict(engine, "web", "10.0.0.20") is None


def test_outside_backends_become_cidr_identities() -> None:
    engine = populated()
    engine.set_services([db_service("192.0.2.7")])
    engine.apply(cnp(TO_DB_SERVICE, "p"))
    prefix, identity = engine.ipcache.lookup("192.0.2.7")
    assert str(prefix) == "192.0.2.7/32" and identity & (1 << 24)
    assert verdict(engine, "web", "192.0.2.7") is Verdict.ALLOW
    assert verdict(engine, "web", "192.0.2.8") is None
    engine.set_services([])  # the /32 identity goes with the last rule naming it
    assert str(engine.ipcache.lookup("192.0.2.7")[0]) != "192.0.2.7/32"


def test_backend_endpoints_coming_and_going_are_followed() -> None:
    engine = populated()
    engine.set_services([db_service("10.0.0.30")])
    engine.apply(cnp(TO_DB_SERVICE, "p"))
    assert verdict(engine, "web", "10.0.0.30") is Verdict.ALLOW  # a /32 while no endpoint holds it
    change = engine.upsert_endpoint(ep("db2", "app=db2", "10.0.0.30"))
    assert "web" in change.endpoints
    assert verdict(engine, "web", "10.0.0.30") is Verdict.ALLOW  # now db2's identity
    assert engine.ipcache.lookup("10.0.0.30")[1] == engine.identity_of("db2").id
    engine.upsert_endpoint(ep("db2", "app=relabelled", "10.0.0.30"))
    assert verdict(engine, "web", "10.0.0.30") is Verdict.ALLOW  # follows the new identity
    assert engine.remove_endpoint("db2").endpoints >= {"web"}
    assert verdict(engine, "web", "10.0.0.30") is Verdict.ALLOW  # back to its /32


def test_deny_to_services_denies_the_backends() -> None:
    engine = populated()
    engine.set_services([db_service("10.0.0.10")])
    engine.apply(cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toEntities: [cluster]
        egressDeny:
        - toServices:
          - k8sService: {serviceName: db}
    """, "p"))
    assert verdict(engine, "web", "10.0.0.10") is Verdict.DENY
    assert verdict(engine, "web", "10.0.0.20") is Verdict.ALLOW

"""PolicyEngine: incremental resolution, atomic changes, identities, ipcache and
the map state it hands to Envoy and BPF."""

from __future__ import annotations

import ipaddress
import textwrap

import pytest

from cilia.policy import (
    ANY_IDENTITY,
    Endpoint,
    L4Key,
    L7ConflictError,
    LabelSet,
    MapState,
    Policy,
    PolicyEngine,
    PolicyError,
    Protocol,
    Verdict,
    parse_text,
)
from cilia.policy.model import HTTPRule
from tests.helpers import cilium_examples_dir

TCP = Protocol.TCP


def cnp(spec: str, name: str, filename: str = "test.yaml") -> list[Policy]:
    text = (f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}}}\nspec:\n"
            + textwrap.indent(textwrap.dedent(spec).strip() + "\n", "  "))
    result = parse_text(text, filename)
    assert result.ok, [str(p) for p in result.problems]
    return result.policies


def example(name: str) -> list[Policy]:
    result = parse_text((cilium_examples_dir() / name).read_text(encoding="utf-8"), name)
    assert result.ok, [str(p) for p in result.problems]
    return result.policies


def ep(name: str, labels: str, *ips: str) -> Endpoint:
    return Endpoint(name, LabelSet.parse(labels), tuple(ipaddress.ip_address(ip) for ip in ips))


def entries(engine: PolicyEngine, name: str) -> set[tuple[str, int, str, str]]:
    """Every map-state entry of an endpoint as (direction, identity, key, verdict)."""
    ms = engine.endpoint_policy(name).map_state
    return {(str(d.direction), ident, str(key), value.verdict.value)
            for d in (ms.ingress, ms.egress) for ident, key, value in d.entries()}


def map_states(engine: PolicyEngine) -> dict[str, MapState]:
    return {e.name: engine.endpoint_policy(e.name).map_state for e in engine.endpoints()}


DB_FROM_WEB = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEndpoints: [{matchLabels: {app: web}}]
  toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"""
WEB_TO_WORLD = """
endpointSelector: {matchLabels: {app: web}}
egress:
- toEntities: [world]
"""


# --- incremental endpoints --------------------------------------------------------------


def test_adding_an_endpoint_reports_it_and_the_endpoints_whose_selectors_select_it() -> None:
    engine = PolicyEngine()
    engine.apply(cnp(DB_FROM_WEB, "db"))
    assert engine.upsert_endpoint(ep("db", "app=db")).endpoints == {"db"}
    assert engine.upsert_endpoint(ep("other", "app=other")).endpoints == {"other"}
    assert engine.upsert_endpoint(ep("web", "app=web")).endpoints == {"web", "db"}
    # a second endpoint with the same labels brings no new identity: nothing else changes
    assert engine.upsert_endpoint(ep("web2", "app=web")).endpoints == {"web2"}
    assert engine.upsert_endpoint(ep("db2", "app=db")).endpoints == {"db2"}
    # upserting an unchanged endpoint changes nothing
    assert engine.upsert_endpoint(ep("web", "app=web")).endpoints == set()


def test_an_added_endpoint_appears_in_the_selecting_endpoints_map_state() -> None:
    engine = PolicyEngine()
    engine.apply(cnp(DB_FROM_WEB, "db"))
    engine.upsert_endpoint(ep("db", "app=db"))
    assert entries(engine, "db") == {("egress", ANY_IDENTITY, "ANY", "allow")}  # ingress: nothing yet
    engine.upsert_endpoint(ep("web", "app=web"))
    web = engine.identity_of("web").id
    assert entries(engine, "db") == {("ingress", web, "5432/TCP", "allow"),
                                     ("egress", ANY_IDENTITY, "ANY", "allow")}


def test_removing_an_endpoint_reports_the_endpoints_that_selected_it() -> None:
    engine = PolicyEngine()
    engine.apply(cnp(DB_FROM_WEB, "db"))
    for e in (ep("db", "app=db"), ep("web", "app=web"), ep("web2", "app=web"), ep("x", "app=x")):
        engine.upsert_endpoint(e)
    web = engine.identity_of("web").id
    assert engine.remove_endpoint("web2").endpoints == {"web2"}  # web still holds the identity
    assert ("ingress", web, "5432/TCP", "allow") in entries(engine, "db")
    assert engine.remove_endpoint("web").endpoints == {"web", "db"}
    assert ("ingress", web, "5432/TCP", "allow") not in entries(engine, "db")
    assert engine.remove_endpoint("x").endpoints == {"x"}
    assert [e.name for e in engine.endpoints()] == ["db"]
    with pytest.raises(PolicyError, match="no such endpoint: x"):
        engine.remove_endpoint("x")


def test_endpoints_with_the_same_labels_share_identity_and_policy() -> None:
    engine = PolicyEngine()
    engine.apply(cnp(DB_FROM_WEB, "db"))
    engine.upsert_endpoint(ep("web", "app=web"))
    engine.upsert_endpoint(ep("db1", "app=db"))
    engine.upsert_endpoint(ep("db2", "k8s:app=db"))
    engine.upsert_endpoint(ep("db3", "app=db,version=2"))
    assert engine.identity_of("db1") == engine.identity_of("db2")
    assert engine.identity_of("db3") != engine.identity_of("db1")
    assert engine.endpoint_policy("db1").map_state is engine.endpoint_policy("db2").map_state
    assert entries(engine, "db1") == entries(engine, "db3")


def test_a_label_change_moves_an_endpoint_between_selections() -> None:
    engine = PolicyEngine()
    engine.apply(cnp(DB_FROM_WEB, "db") + cnp(WEB_TO_WORLD, "web"))
    engine.upsert_endpoint(ep("db", "app=db"))
    engine.upsert_endpoint(ep("pod", "app=other"))
    old = engine.identity_of("pod")
    assert not engine.endpoint_policy("pod").map_state.egress.enforced

    change = engine.upsert_endpoint(ep("pod", "app=web"))
    new = engine.identity_of("pod")
    assert new != old
    assert change.endpoints == {"pod", "db"}
    assert ("ingress", new.id, "5432/TCP", "allow") in entries(engine, "db")
    assert engine.endpoint_policy("pod").map_state.egress.enforced  # now selected by the web policy
    assert engine.allocator.get(old.id) is None  # nobody uses the old identity any more

    change = engine.upsert_endpoint(ep("pod", "app=other"))
    assert change.endpoints == {"pod", "db"}
    assert not any(ident == new.id for _, ident, _, _ in entries(engine, "db"))
    assert not engine.endpoint_policy("pod").map_state.egress.enforced


# --- incremental policies ---------------------------------------------------------------


def populated() -> PolicyEngine:
    engine = PolicyEngine()
    for e in (ep("db", "app=db"), ep("db2", "app=db"), ep("web", "app=web"), ep("cache", "app=cache"),
              ep("other", "app=other")):
        engine.upsert_endpoint(e)
    return engine


def test_adding_a_rule_recomputes_only_the_endpoints_it_selects() -> None:
    engine = populated()
    before = map_states(engine)
    change = engine.apply(cnp(DB_FROM_WEB, "db"))
    assert change.endpoints == {"db", "db2"}
    after = map_states(engine)
    for name in ("web", "cache", "other"):
        assert after[name] is before[name], name
    assert after["db"] != before["db"]
    assert change.revision == engine.revision

    change = engine.apply(cnp("""
        endpointSelector: {matchLabels: {app: cache}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: web}}]
    """, "cache"))
    assert change.endpoints == {"cache"}
    assert map_states(engine)["db"] is after["db"]


def test_replacing_a_policy_recomputes_what_the_old_and_new_versions_select() -> None:
    engine = populated()
    engine.apply(cnp(DB_FROM_WEB, "p"))
    change = engine.apply(cnp(DB_FROM_WEB.replace("app: db}", "app: cache}"), "p"))
    assert change.endpoints == {"db", "db2", "cache"}
    assert not engine.endpoint_policy("db").map_state.ingress.enforced
    assert engine.endpoint_policy("cache").map_state.ingress.enforced
    assert [p.name for p in engine.policies()] == ["p"]


def test_a_new_cidr_identity_reaches_the_endpoints_that_select_it() -> None:
    engine = populated()
    engine.apply(cnp(WEB_TO_WORLD, "web"))
    change = engine.apply(cnp("""
        endpointSelector: {matchLabels: {app: cache}}
        egress:
        - toCIDR: [10.1.0.0/16]
    """, "cache"))
    _, cidr_id = engine.ipcache.lookup("10.1.2.3")
    assert cidr_id & (1 << 24)
    # the web's map state now has an entry for the new identity (it is world) ...
    assert ("egress", cidr_id, "ANY", "allow") in entries(engine, "web")
    # ... so the change must report the web too, or its datapath would drop 10.1.0.0/16
    assert change.endpoints == {"cache", "web"}


def test_deleting_policies_restores_default_allow() -> None:
    engine = populated()
    fresh = {name: entries(engine, name) for name in ("db", "web")}
    engine.apply(cnp(DB_FROM_WEB, "db") + cnp(WEB_TO_WORLD, "web"))
    assert entries(engine, "db") != fresh["db"]
    change = engine.delete([p.key for p in engine.policies()])
    assert change.endpoints == {"db", "db2", "web"}
    assert engine.policies() == []
    for name in ("db", "web"):
        assert entries(engine, name) == fresh[name] == {("ingress", ANY_IDENTITY, "ANY", "allow"),
                                                        ("egress", ANY_IDENTITY, "ANY", "allow")}
        ms = engine.endpoint_policy(name).map_state
        assert not ms.ingress.enforced and not ms.egress.enforced
    with pytest.raises(PolicyError, match="no such policy"):
        engine.delete([("CiliumNetworkPolicy", "default", "db")])


def test_deleting_a_cidr_policy_releases_its_identities() -> None:
    engine = populated()
    engine.apply(cnp("""
        endpointSelector: {matchLabels: {app: web}}
        egress:
        - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}]
    """, "cidr"))
    cidr_ids = {ident for _, ident in engine.ipcache.items() if ident & (1 << 24)}
    assert len(cidr_ids) == 2
    engine.delete([p.key for p in engine.policies()])
    assert engine.ipcache.lookup("10.1.1.1")[1] == 9
    assert all(engine.allocator.get(i) is None for i in cidr_ids)


L7_HTTP = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEndpoints: [{matchLabels: {app: web}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {http: [{method: GET}]}}]
"""
L7_KAFKA = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEndpoints: [{matchLabels: {app: cache}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}], rules: {kafka: [{role: consume}]}}]
"""


def test_a_failing_policy_change_leaves_every_endpoint_unchanged() -> None:
    engine = populated()
    engine.apply(cnp(L7_HTTP, "http", "http.yaml"))
    before = map_states(engine)
    policies, revision = engine.policies(), engine.revision
    unrelated = cnp("""
        endpointSelector: {matchLabels: {app: other}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: web}}]
    """, "unrelated")
    with pytest.raises(L7ConflictError, match="http.yaml:.*kafka.yaml:|kafka.yaml:.*http.yaml:"):
        engine.apply(unrelated + cnp(L7_KAFKA, "kafka", "kafka.yaml"))
    assert map_states(engine) == before
    assert engine.policies() == policies
    assert engine.revision == revision
    # the engine still works afterwards
    assert engine.apply(unrelated).endpoints == {"other"}


def test_an_endpoint_that_cannot_be_resolved_is_not_added() -> None:
    engine = populated()
    engine.apply(cnp(L7_HTTP, "http") + cnp(L7_KAFKA.replace("app: db}", "tier: x}"), "kafka"))
    before = map_states(engine)
    with pytest.raises(L7ConflictError):
        engine.upsert_endpoint(ep("both", "app=db,tier=x"))
    assert "both" not in [e.name for e in engine.endpoints()]
    assert map_states(engine) == before
    assert engine.allocator.lookup(LabelSet.parse("app=db,tier=x,k8s:io.kubernetes.pod.namespace=default")) is None


# --- batch ------------------------------------------------------------------------------


def build(batched: bool) -> PolicyEngine:
    engine = PolicyEngine()
    policies = (cnp(DB_FROM_WEB, "db") + cnp(WEB_TO_WORLD, "web") + example("sw_l3_l4_l7_policy.yaml")
                + example("cidr.yaml"))
    endpoints = [ep(f"ep{i}", labels) for i, labels in enumerate([
        "app=db", "app=web", "app=web,v=2", "org=empire,class=deathstar", "org=empire,class=tiefighter",
        "org=alliance", "app=myService", "app=db",
    ])]
    if batched:
        with engine.batch():
            for e in endpoints:
                engine.upsert_endpoint(e)
            engine.apply(policies)
    else:
        engine.apply(policies)
        for e in endpoints:
            engine.upsert_endpoint(e)
    return engine


def test_batch_gives_the_same_map_states_as_one_by_one() -> None:
    one_by_one, batched = build(False), build(True)
    names = [e.name for e in one_by_one.endpoints()]
    assert names == [e.name for e in batched.endpoints()]
    for name in names:
        assert one_by_one.identity_of(name) == batched.identity_of(name)
        assert entries(batched, name) == entries(one_by_one, name), name
    assert len({one_by_one.identity_of(n).id for n in names}) == 7


# --- ipcache ----------------------------------------------------------------------------


def test_the_ipcache_maps_endpoint_addresses_and_policy_prefixes() -> None:
    engine = PolicyEngine()
    engine.apply(example("cidr.yaml"))
    engine.upsert_endpoint(ep("web", "app=web", "10.96.0.5", "fd00::5"))
    engine.upsert_endpoint(ep("web2", "app=web", "10.96.0.6"))
    web = engine.identity_of("web").id
    prefixes = {str(prefix): ident for prefix, ident in engine.ipcache.items()}
    assert prefixes["10.96.0.5/32"] == web
    assert prefixes["10.96.0.6/32"] == web
    assert prefixes["fd00::5/128"] == web
    assert prefixes["0.0.0.0/0"] == 9 and prefixes["::/0"] == 10
    for prefix in ("20.1.1.1/32", "10.0.0.0/8", "10.96.0.0/12"):
        assert prefixes[prefix] & (1 << 24), prefix

    def lookup(address: str) -> tuple[str, int]:
        prefix, ident = engine.ipcache.lookup(address)
        return str(prefix), ident

    # the longest prefix wins
    assert lookup("10.96.0.5") == ("10.96.0.5/32", web)
    assert lookup("10.96.0.7") == ("10.96.0.0/12", prefixes["10.96.0.0/12"])
    assert lookup("10.1.2.3") == ("10.0.0.0/8", prefixes["10.0.0.0/8"])
    assert lookup("20.1.1.1") == ("20.1.1.1/32", prefixes["20.1.1.1/32"])
    assert lookup("20.1.1.2") == ("0.0.0.0/0", 9)
    assert lookup("fd00::5") == ("fd00::5/128", web)

    engine.remove_endpoint("web")
    assert lookup("10.96.0.5") == ("10.96.0.0/12", prefixes["10.96.0.0/12"])
    assert lookup("10.96.0.6") == ("10.96.0.6/32", web)  # web2 still has the identity
    assert lookup("fd00::5") == ("::/0", 10)
    assert lookup("::1") == ("::/0", 10)


# --- the Star Wars map state ------------------------------------------------------------


def test_star_wars_map_state() -> None:
    engine = PolicyEngine()
    engine.apply(example("sw_l3_l4_l7_policy.yaml"))
    engine.upsert_endpoint(ep("deathstar", "org=empire,class=deathstar"))
    engine.upsert_endpoint(ep("tiefighter", "org=empire,class=tiefighter"))
    engine.upsert_endpoint(ep("xwing", "org=alliance,class=xwing"))
    deathstar, tiefighter = engine.identity_of("deathstar").id, engine.identity_of("tiefighter").id

    ms = engine.endpoint_policy("deathstar").map_state
    assert ms.ingress.enforced and not ms.egress.enforced
    ingress = {ident: (key, value) for ident, key, value in ms.ingress.entries()}
    assert set(ingress) == {deathstar, tiefighter}  # the empire; no xwing, no ANY entry
    for key, value in ingress.values():
        assert key == L4Key(TCP, 80, 80)
        assert value.verdict is Verdict.REDIRECT
        assert value.l7 is not None and value.l7.protocol == "http" and not value.l7.allow_all
        ((rule, origin),) = value.l7.rules
        assert isinstance(rule, HTTPRule)
        assert (origin.policy, origin.source.file, origin.source.line) == (  # type: ignore[union-attr]
            "default/rule1", "sw_l3_l4_l7_policy.yaml", 16)
        assert (rule.source.file, rule.source.line) == ("sw_l3_l4_l7_policy.yaml", 21)
        assert [(o.path, str(o.source)) for o in value.origins] == [
            ("ingress[0].toPorts[0]", "sw_l3_l4_l7_policy.yaml:16")]
    assert [(ident, str(key), value.verdict) for ident, key, value in ms.egress.entries()] == [
        (ANY_IDENTITY, "ANY", Verdict.ALLOW)]

    # the datapath lookups this map state answers
    assert ms.ingress.lookup(tiefighter, TCP, 80) is not None
    assert ms.ingress.lookup(tiefighter, TCP, 81) is None
    assert ms.ingress.lookup(engine.identity_of("xwing").id, TCP, 80) is None
    # the other ships are not selected: default allow both ways
    assert entries(engine, "xwing") == {("ingress", ANY_IDENTITY, "ANY", "allow"),
                                        ("egress", ANY_IDENTITY, "ANY", "allow")}

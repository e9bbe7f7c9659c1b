"""The realizer seam: sinks get each Desired, only what a change names is translated again, and
the incremental result is byte-identical to translating everything anew (and flows are named as a
snapshot made anew would name them)."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cilia.agent.daemon import Agent, AgentConfig
from cilia.agent.flows import Who
from cilia.agent.metrics import Metrics
from cilia.agent.observe import FlowNames, Observer
from cilia.envoy.translate import AccessLogTarget, GrpcTarget, ProxyResources
from cilia.realizer import Desired, Realizer
from cilia.realizer.proxy import InconsistentResources, ProxySink
from cilia.specs import EndpointSpec, PortSpec
from cilia.xds import CLUSTER, LISTENER, Cache

REPO = Path(__file__).resolve().parents[2]
POLICIES = [REPO / "examples" / "cilium" / n for n in
            ("sw_l3_l4_l7_policy.yaml", "kafka-sw-security-policy.yaml", "memcd-sw-security-policy.yaml",
             "cidr.yaml", "http.yaml", "l4_port_range.yaml", "sw_deny_policy.yaml", "l7_multi.yaml")]
LABELS = [("org=empire", "class=deathstar"), ("org=empire", "class=tiefighter"), ("org=alliance", "class=xwing"),
          ("app=kafka",), ("app=empire-hq",), ("app=memcd-server",), ("app=a-wing",), ("app=web", "role=frontend")]
PORTS = tuple(PortSpec.parse(p) for p in ("80:8080", "9092:19092", "11211:21211", "8000:18000"))


def serialized(snapshot: dict[str, dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    return {t: {n: m.SerializeToString(deterministic=True) for n, m in ms.items()} for t, ms in snapshot.items()}


def retranslated(agent: Agent) -> dict[str, dict[str, bytes]]:
    """What a fresh proxy sink publishes for the agent's last Desired, everything translated."""
    assert agent._desired is not None
    cache = Cache()
    sink = ProxySink(cache, agent.proxy.mode, agent.proxy.node_id, agent.proxy.access_log, agent.proxy.l7_service)
    sink.realize(replace(agent._desired, changed=None))
    return serialized(cache.snapshot())


def whole_who(agent: Agent) -> Who:
    """What names flows, made anew from the agent's last Desired (the flow-names sink patches the
    last one with each change)."""
    observer = Observer("node", Metrics(), 16, None)
    FlowNames(observer).realize(replace(agent._desired, changed=None))  # type: ignore[arg-type]
    return observer.who


def names_flows(who: Who, agent: Agent) -> list[Any]:
    """How ``who`` names every address, endpoint and identity the agent has had (and one nobody has)."""
    assert agent._desired is not None
    addresses = [f"10.7.0.{i}" for i in range(10, 23)] + ["192.0.2.1"]
    return ([who.peer(a).to_json() for a in addresses]
            + [who.endpoint_peer(f"ep{i}", 80).to_json() for i in range(12)]
            + [(who.endpoint_identity(f"ep{i}"), who.endpoint_with_identity(ep.identity))
               for i in range(12) if (ep := agent._desired.endpoints.get(f"ep{i}")) is not None]
            + [sorted(who.endpoint_ids.items())])


@pytest.mark.parametrize("datapath", ["none", "bpf"])
def test_incremental_realization_equals_a_full_translation(tmp_path: Path, datapath: str) -> None:
    """Random mutations; after each, the cache holds exactly what translating every endpoint
    anew gives (the bpf case only translates: the datapath is not started)."""
    rng = random.Random(7)
    agent = Agent(AgentConfig(tmp_path, envoy="external", datapath=datapath))  # type: ignore[arg-type]
    names: list[str] = []
    for step in range(40):
        op = rng.random()
        if op < 0.4 or not names:
            name = f"ep{rng.randrange(12)}"
            labels = rng.choice(LABELS)
            agent.add_endpoint(EndpointSpec(name, labels, (f"10.7.0.{10 + int(name[2:])}",), PORTS))
            if name not in names:
                names.append(name)
        elif op < 0.75:
            path = rng.choice(POLICIES)
            agent.import_policies([(str(path.relative_to(REPO)), path.read_text())])
        elif op < 0.85 and agent.engine.policies():
            agent.delete_policy_keys([rng.choice(agent.engine.policies()).key])
        else:
            agent.remove_endpoint(names.pop(rng.randrange(len(names))))
        assert serialized(agent.cache.snapshot()) == retranslated(agent), f"step {step}"
        assert names_flows(agent.observer.who, agent) == names_flows(whole_who(agent), agent), f"step {step}"


def test_only_the_endpoints_a_change_names_are_translated_again(tmp_path: Path) -> None:
    agent = Agent(AgentConfig(tmp_path, envoy="external"))
    for i in range(20):
        agent.add_endpoint(EndpointSpec(f"bystander{i}", ("app=bystander",), (f"10.8.0.{i + 10}",), PORTS))
    agent.add_endpoint(EndpointSpec("deathstar", ("org=empire", "class=deathstar"), ("10.8.1.10",), PORTS))
    before = agent.proxy.translations
    path = POLICIES[0]
    agent.import_policies([(path.name, path.read_text())])  # selects only the deathstar
    assert agent.proxy.translations - before == 1
    before = agent.proxy.translations
    moved = (PortSpec.parse("80:9090"), *PORTS[1:])  # the app moved: only its own listeners change
    agent.add_endpoint(EndpointSpec("bystander3", ("app=bystander",), ("10.8.0.13",), moved))
    assert agent.proxy.translations - before == 1
    # An address leaving changes the prefixes of its identity: the listeners whose peer tables can
    # hold it are translated again (the other 19 bystanders: no policy, so every identity may reach
    # them), not the deathstar's, whose policy names other identities only.
    deathstar = {n: li for n, li in agent.cache.snapshot()[LISTENER].items() if n.startswith("deathstar-")}
    before = agent.proxy.translations
    agent.remove_endpoint("bystander3")
    assert agent.proxy.translations - before == 19
    after = agent.cache.snapshot()[LISTENER]
    assert deathstar and all(after[n] is li for n, li in deathstar.items())
    assert not any(n.startswith("bystander3-") for n in agent.cache.snapshot()[LISTENER])


class _Recorder:
    def __init__(self, name: str, fail: bool = False) -> None:
        self.name = name
        self.fail = fail
        self.seen: list[int] = []

    def realize(self, desired: Desired) -> None:
        self.seen.append(desired.revision)
        if self.fail:
            raise RuntimeError("kernel said no")


def test_a_failing_sink_does_not_keep_the_others_stale() -> None:
    bad, good = _Recorder("bad", fail=True), _Recorder("good")
    realizer = Realizer([bad, good])
    realizer.realize(Desired(1, {}, (), {}))
    assert good.seen == [1] and realizer.errors == {"bad": "RuntimeError: kernel said no"}
    bad.fail = False
    realizer.realize(Desired(2, {}, (), {}))
    assert good.seen == [1, 2] and realizer.errors == {}
    late = _Recorder("late")
    realizer.add(late)  # a sink plugged in later gets the last Desired, whole
    assert late.seen == [2]


def test_inconsistent_resources_are_not_published(tmp_path: Path) -> None:
    agent = Agent(AgentConfig(tmp_path, envoy="external"))
    agent.add_endpoint(EndpointSpec("deathstar", ("org=empire", "class=deathstar"), ("10.9.0.10",), PORTS))
    assert agent._desired is not None
    published = serialized(agent.cache.snapshot())

    class Dangling(ProxySink):
        def _translate_sidecar(self, *args: Any) -> Any:
            done = super()._translate_sidecar(*args)
            # listeners whose tcp_proxy names clusters not there
            return replace(done, resources=ProxyResources(done.resources.listeners, ())) if done else None

    sink = Dangling(agent.cache, "sidecar", "cilia-node", AccessLogTarget("cilia-accesslog", "unix:/x"),
                    GrpcTarget("cilia-l7", "unix:/y"))
    with pytest.raises(InconsistentResources, match="deathstar-ingress-80"):
        sink.realize(replace(agent._desired, revision=99, changed=None))
    assert serialized(agent.cache.snapshot()) == published and sink.version_for(99) is None
    assert agent.cache.snapshot()[CLUSTER]


SHIPS_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: ships}
spec:
  endpointSelector: {matchLabels: {fleet: ships}}
  ingress: [{fromEndpoints: [{matchLabels: {class: hangar}}]}]
"""


def test_an_add_publishes_only_its_own_resources(tmp_path: Path) -> None:
    """The cache is handed the new endpoint's listeners and clusters, never a whole type replaced
    (which costs a serialization of every listener at every add); a delete hands it the names."""
    agent = Agent(AgentConfig(tmp_path, envoy="external"))
    # the ships take ingress from the hangar only (a listener with no policy lists every prefix)
    agent.import_policies([("ships.yaml", SHIPS_POLICY)])
    for i in range(5):
        agent.add_endpoint(EndpointSpec(f"ship{i}", ("fleet=ships", f"class=ship{i}"), (f"10.9.1.{i + 1}",),
                                        PORTS[:1]))
    handed: list[dict[str, Any]] = []
    update_many = agent.cache.update_many

    def spy(changes: Any) -> Any:  # the real cache, its arguments kept
        handed.append(dict(changes))
        return update_many(changes)

    agent.cache.update_many = spy  # type: ignore[method-assign]
    agent.add_endpoint(EndpointSpec("probe", ("fleet=ships", "class=probe"), ("10.9.1.99",), PORTS[:1]))
    proxy = [c for c in handed if LISTENER in c]
    assert len(proxy) == 1
    assert not proxy[0][LISTENER].replace and set(proxy[0][LISTENER].upserts) == {"probe-ingress-80"}
    assert not proxy[0][CLUSTER].replace and set(proxy[0][CLUSTER].upserts) <= {"probe-ingress-80", "cilia-accesslog",
                                                                                "cilia-l7"}
    handed.clear()
    agent.remove_endpoint("probe")
    proxy = [c for c in handed if LISTENER in c]
    assert proxy[0][LISTENER].delete == ("probe-ingress-80",) and not proxy[0][LISTENER].upserts
    assert "probe-ingress-80" in proxy[0][CLUSTER].delete
    assert serialized(agent.cache.snapshot()) == retranslated(agent)


def test_after_a_failed_publish_the_next_one_is_whole(tmp_path: Path) -> None:
    """A publish that failed leaves the cache behind what was translated: the next change, however
    small, publishes everything, so the cache ends as a fresh translation would make it."""
    agent = Agent(AgentConfig(tmp_path, envoy="external"))
    agent.add_endpoint(EndpointSpec("deathstar", ("org=empire", "class=deathstar"), ("10.9.0.10",), PORTS))
    update_many = agent.cache.update_many
    failing = [True]

    def flaky(changes: Any) -> Any:
        if failing[0] and LISTENER in changes:
            raise RuntimeError("the cache refused")
        return update_many(changes)

    agent.cache.update_many = flaky  # type: ignore[method-assign]
    agent.add_endpoint(EndpointSpec("xwing", ("org=alliance", "class=xwing"), ("10.9.0.11",), PORTS))
    assert "proxy" in agent.realizer.errors
    failing[0] = False
    agent.add_endpoint(EndpointSpec("tiefighter", ("org=empire", "class=tiefighter"), ("10.9.0.12",), PORTS))
    assert "proxy" not in agent.realizer.errors
    assert "xwing-ingress-80" in agent.cache.snapshot()[LISTENER]
    assert serialized(agent.cache.snapshot()) == retranslated(agent)


def test_a_port_no_policy_restricts_does_not_change_as_endpoints_come(tmp_path: Path) -> None:
    """An endpoint no policy selects lets every address in (the world's 0.0.0.0/0 and ::/0 hold
    them all): its listener lists those two ranges, not every endpoint's address, so adding or
    removing another endpoint does not push it a new listener."""
    agent = Agent(AgentConfig(tmp_path, envoy="external"))
    agent.add_endpoint(EndpointSpec("open", ("app=open",), ("10.9.2.1",), PORTS[:1]))
    before = agent.cache.get(LISTENER, "open-ingress-80")
    for i in range(3):
        agent.add_endpoint(EndpointSpec(f"ship{i}", (f"class=ship{i}",), (f"10.9.2.{i + 10}",), PORTS[:1]))
    agent.remove_endpoint("ship1")
    assert agent.cache.get(LISTENER, "open-ingress-80") == before
    assert "10.9.2.10" not in str(before) and "0.0.0.0" in str(before)

"""The realizer seam: sinks get each Desired, only what a change names is translated again, and
the incremental result is byte-identical to translating everything anew."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cilia.agent.daemon import Agent, AgentConfig
from cilia.envoy.translate import AccessLogTarget, GrpcTarget
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
        def _translate_sidecars(self, desired: Desired, prefixes: Any) -> Any:
            listeners, _clusters, notes = super()._translate_sidecars(desired, prefixes)
            return listeners, {}, notes  # listeners whose tcp_proxy names clusters not there

    sink = Dangling(agent.cache, "sidecar", "cilia-node", AccessLogTarget("cilia-accesslog", "unix:/x"),
                    GrpcTarget("cilia-l7", "unix:/y"))
    with pytest.raises(InconsistentResources, match="deathstar-ingress-80"):
        sink.realize(replace(agent._desired, revision=99, changed=None))
    assert serialized(agent.cache.snapshot()) == published and sink.version_for(99) is None
    assert agent.cache.snapshot()[CLUSTER]

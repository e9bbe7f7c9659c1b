"""Where translation puts an L7 port's parser: with an ``InprocTarget``, the ``cilia_l7`` dynamic
module after the two naming RBAC filters (its ``filter_config`` naming the listener, direction,
port, protocol and the agent's channel) and no ext_proc cluster; a plugin that asks to stay out
of Envoy's process (``isolation = "process"``) keeps network ext_proc, and its cluster."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from cilia_r2d2 import R2D2
from envoy.config.listener.v3 import listener_components_pb2
from google.protobuf import wrappers_pb2

from cilia.envoy import dynamic_modules_proto, metadata
from cilia.envoy.inproc.channel import isolated_protocols
from cilia.envoy.resources import GrpcTarget, InprocTarget
from cilia.envoy.translate import PortMapping, ProxyResources, prefixes_by_identity, translate_ingress
from cilia.policy import Endpoint, LabelSet, PolicyEngine, parse_text
from cilia.policy.l7.registry import L7Registry

REPO = Path(__file__).resolve().parents[2]
EXTPROC = GrpcTarget("cilia-l7", "unix:/run/l7.sock")


def _translate(policy: Path, server: str, client: str, port: int, target: InprocTarget) -> ProxyResources:
    engine = PolicyEngine()
    engine.upsert_endpoint(Endpoint("server", LabelSet.parse([server]), (ipaddress.ip_address("10.1.0.2"),)))
    engine.upsert_endpoint(Endpoint("client", LabelSet.parse([client]), (ipaddress.ip_address("10.1.0.1"),)))
    loaded = parse_text(policy.read_text(), str(policy))
    assert loaded.ok
    engine.apply(loaded.policies)
    return translate_ingress("server", engine.endpoint_policy("server").map_state.ingress, [PortMapping.same(port)],
                             "10.1.0.2", "10.1.0.2", prefixes_by_identity(engine.ipcache.items()), l7_service=target)


def _filters(res: ProxyResources) -> list[listener_components_pb2.Filter]:
    return list(res.listeners[0].filter_chains[0].filters)


def test_the_module_takes_ext_procs_place() -> None:
    res = _translate(REPO / "examples" / "cilium" / "memcd-sw-security-policy.yaml", "app=memcd-server",
                     "app=a-wing", 11211, InprocTarget("cilia_l7", "unix:/run/l7-inproc.sock", EXTPROC))
    names = [f.name for f in _filters(res)]
    assert names == [metadata.NETWORK_RBAC, metadata.NETWORK_RBAC, metadata.NETWORK_RBAC,
                     "envoy.filters.network.dynamic_modules", "envoy.filters.network.tcp_proxy"]
    module = dynamic_modules_proto.DynamicModuleNetworkFilter()
    assert _filters(res)[3].typed_config.Unpack(module)
    assert module.dynamic_module_config.name == "cilia_l7" and module.dynamic_module_config.do_not_close
    config = wrappers_pb2.StringValue()
    assert module.filter_config.Unpack(config)
    assert json.loads(config.value) == {"listener": "server-ingress-11211", "direction": "ingress", "port": 11211,
                                        "protocol": "memcache", "agent": "unix:/run/l7-inproc.sock"}
    assert [c.name for c in res.clusters] == ["server-ingress-11211"]  # no ext_proc service needed


class _Isolated(R2D2):
    """The r2d2 plugin, asking for its parser to stay out of Envoy's process."""

    isolation = "process"


def test_a_plugin_asking_for_process_isolation_stays_on_ext_proc() -> None:
    assert isolated_protocols(L7Registry([R2D2()])) == frozenset()  # in Envoy unless it asks
    isolated = isolated_protocols(L7Registry([_Isolated()]))
    assert isolated == {"r2d2"}
    res = _translate(REPO / "examples" / "r2d2" / "droid.yaml", "app=r2d2", "app=c3po", 4242,
                     InprocTarget("cilia_l7", "unix:/run/l7-inproc.sock", EXTPROC, isolated))
    assert [f.name for f in _filters(res)][3] == "envoy.filters.network.ext_proc"
    assert "cilia-l7" in [c.name for c in res.clusters]

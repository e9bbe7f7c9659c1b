"""A real Envoy running cilia's L7 parsers in-process (the ``cilia_l7`` dynamic module).

The listener is what the translator makes for a sidecar ingress port with ``InprocTarget``
(network RBAC, the two naming RBAC filters, the dynamic module, tcp_proxy to the backend), put
into a static bootstrap; policy comes from a real ``PolicyEngine`` through a real
``InprocChannel``, as the agent sends it. Clients take their identity from their source address
(127.0.0.x), so tests bind their sockets to it.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envoy.config.bootstrap.v3 import bootstrap_pb2
from google.protobuf import json_format

from cilia.envoy.bootstrap import parse_address
from cilia.envoy.inproc.build import MODULE_NAME
from cilia.envoy.inproc.channel import InprocChannel
from cilia.envoy.resources import InprocTarget
from cilia.envoy.supervisor import Backoff, EnvoySupervisor
from cilia.envoy.translate import PortMapping, prefixes_by_identity, translate_ingress
from cilia.l7parsers.base import Record
from cilia.envoy.l7service import ConnectionInfo
from cilia.envoy.l7views import PolicyViews
from cilia.policy import Endpoint, LabelSet, PolicyEngine, parse_text

SERVER = "memcd-server"
SERVER_IP = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class InprocEnvoy:
    engine: PolicyEngine
    channel: InprocChannel
    listen_port: int
    envoy: EnvoySupervisor
    log_path: Path
    records: list[tuple[ConnectionInfo, Record]] = field(default_factory=list)
    revision: int = 1
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_record(self, _when: float, info: ConnectionInfo, record: Record) -> None:
        with self.lock:
            self.records.append((info, record))

    def publish(self) -> None:
        self.revision += 1
        self.channel.publish(PolicyViews(self.revision, {SERVER: self.engine.endpoint_policy(SERVER).map_state}, {}))

    def apply(self, text: str, path: str) -> None:
        loaded = parse_text(text, path)
        assert loaded.ok, [str(p) for p in loaded.problems]
        self.engine.apply(loaded.policies)
        self.publish()

    def connect(self, source: str) -> socket.socket:
        s = socket.socket()
        s.bind((source, 0))
        s.settimeout(10)
        s.connect((SERVER_IP, self.listen_port))
        return s


def bootstrap_json(admin_port: int, res: Any) -> str:
    boot = bootstrap_pb2.Bootstrap(
        admin=bootstrap_pb2.Admin(address=parse_address(f"127.0.0.1:{admin_port}")),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(listeners=res.listeners, clusters=res.clusters))
    text: str = json_format.MessageToJson(boot)
    return text


@contextmanager
def inproc_envoy(tmp_path: Path, module_dir: Path, policy: tuple[str, str], backend_port: int,
                 clients: dict[str, tuple[str, str]], server_labels: str = "app=memcd-server",
                 policy_port: int = 11211, protocol_module: str = MODULE_NAME) -> Iterator[InprocEnvoy]:
    """Envoy with the module from ``module_dir`` in front of ``backend_port``; ``clients``: name
    -> (labels, source address); ``policy``: (YAML text, its path)."""
    engine = PolicyEngine()
    engine.upsert_endpoint(Endpoint(SERVER, LabelSet.parse(server_labels.split(",")),
                                    (ipaddress.ip_address(SERVER_IP),)))
    for name, (labels, ip) in clients.items():
        engine.upsert_endpoint(Endpoint(name, LabelSet.parse(labels.split(",")), (ipaddress.ip_address(ip),)))
    loaded = parse_text(policy[0], policy[1])
    assert loaded.ok, [str(p) for p in loaded.problems]
    engine.apply(loaded.policies)
    sock = tmp_path / "l7-inproc.sock"
    listen_port, admin_port = free_port(), free_port()
    res = translate_ingress(SERVER, engine.endpoint_policy(SERVER).map_state.ingress,
                            [PortMapping(policy_port, listen_port, backend_port)], SERVER_IP, SERVER_IP,
                            prefixes_by_identity(engine.ipcache.items()),
                            l7_service=InprocTarget(protocol_module, f"unix:{sock}"))
    boot = tmp_path / "envoy.json"
    boot.write_text(bootstrap_json(admin_port, res), encoding="utf-8")
    log = tmp_path / "envoy.log"
    envoy = EnvoySupervisor(boot, f"127.0.0.1:{admin_port}", log_path=log, extra_args=("--drain-time-s", "0"),
                            backoff=Backoff(initial=60), env={"ENVOY_DYNAMIC_MODULES_SEARCH_PATH": str(module_dir)})
    node = InprocEnvoy(engine, InprocChannel(sock, lambda *a: None), listen_port, envoy, log)
    node.channel.on_record = node.on_record
    node.channel.start()
    node.revision = 0
    node.publish()
    try:
        envoy.start()
        yield node
    finally:
        envoy.stop()
        node.channel.stop()

"""Nodes announced through the kvstore: name, node IP, pod CIDR and health address, under the
node's lease (a dead node's record vanishes with it). ``NodeRegistry`` publishes this node's record
(again after a new lease) and mirrors everyone's for ``cilia node list``; a record that does not
parse is logged and skipped."""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

from ..kvstore.base import KVStore, KVStoreError
from ..kvstore.mirror import PrefixMirror
from . import keys
from .session import Session

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    ip: str | None = None
    pod_cidr: str | None = None
    health_ip: str | None = None
    router_ip: str | None = None  # the gateway of its pods (an address other nodes see as remote-node)

    def encode(self) -> bytes:
        return json.dumps({"name": self.name, "ip": self.ip, "podCIDR": self.pod_cidr,
                           "healthIP": self.health_ip, "routerIP": self.router_ip}, sort_keys=True).encode()

    @classmethod
    def decode(cls, key: str, value: bytes) -> NodeRecord:
        name = keys.name_of(key, keys.NODES)
        try:
            data = json.loads(value)
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{key}: value is not JSON") from None
        if not isinstance(data, dict) or data.get("name") != name:
            raise ValueError(f"{key}: field name does not match the key")
        ip, cidr, health = data.get("ip"), data.get("podCIDR"), data.get("healthIP")
        router = data.get("routerIP")
        try:
            for text in (ip, health, router):
                if text is not None:
                    ipaddress.ip_address(text)
            if cidr is not None:
                ipaddress.ip_network(cidr)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key}: {e}") from None
        return cls(name, ip, cidr, health, router)

    def to_json(self) -> dict[str, str | None]:
        return asdict(self)


class NodeRegistry:
    def __init__(self, store: KVStore, session: Session, record: NodeRecord) -> None:
        self.store = store
        self.session = session
        self.record = record
        self.nodes: dict[str, NodeRecord] = {}
        self.malformed = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self.mirror = PrefixMirror(store, keys.NODES, self._on_change)
        # called with every node's record after each change (cross-node routes, node identities)
        self.on_change: list[Callable[[list[NodeRecord]], None]] = []
        session.on_renew.append(lambda lease: self.publish())

    def start(self) -> None:
        self.publish()
        self.mirror.start()

    def stop(self) -> None:
        self.mirror.stop()

    def publish(self) -> None:
        try:
            self.store.put(keys.node_key(self.record.name), self.record.encode(), lease=self.session.lease)
            self.last_error = None
        except KVStoreError as e:  # the lease keeper retries: a new lease publishes again
            self.last_error = str(e)
            _log.warning("publishing node %s: %s", self.record.name, e)

    def list(self) -> list[NodeRecord]:
        with self._lock:
            return [self.nodes[n] for n in sorted(self.nodes)]

    def _on_change(self, upserts: Mapping[str, bytes], deletes: Sequence[str]) -> None:
        with self._lock:
            for key in deletes:
                self.nodes.pop(keys.name_of(key, keys.NODES), None)
            for key, value in upserts.items():
                try:
                    record = NodeRecord.decode(key, value)
                except ValueError as e:
                    self.malformed += 1
                    _log.warning("kvstore: skipping %s", e)
                    continue
                self.nodes[record.name] = record
        for listener in list(self.on_change):
            listener(self.list())

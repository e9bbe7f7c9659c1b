"""Endpoint addresses shared through the kvstore: this node's published, other nodes' received.

``IPCachePublisher`` is a realizer sink: each ``Desired`` names this node's endpoints and their
identities; a thread of its own writes the difference to the store under the node's lease (a sink
must not wait for anything outside the process), retrying with backoff while the store is
unreachable. A restarted agent publishes everything first and only then deletes the keys its
previous run left that are no longer wanted (compare-and-delete, only keys naming this node), so
a live endpoint's address is never missing from the store. A new lease republishes everything.

``RemoteIPCache`` mirrors every node's entries and hands the other nodes' ones, parsed and checked,
to a consumer (the agent feeds them to ``PolicyEngine.update_remote``). An entry that does not parse
or claims an identity outside 256-65535 (a reserved identity such as ``host`` would widen access)
is logged, counted and skipped: the consumer keeps what it had for that address.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..background import SyncLoop
from ..kvstore.base import KVStore, KVStoreError
from ..kvstore.mirror import PrefixMirror
from ..policy.identity import MAX_ALLOCATED, MIN_ALLOCATED
from ..policy.model import IPNetwork
from ..realizer.desired import Desired
from . import keys
from .session import Session

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class IPEntry:
    """One endpoint address as stored: ``cilia/state/ip/v1/default/<ip>`` → this, as JSON."""

    ip: str
    identity: int
    node: str

    def encode(self) -> bytes:
        return json.dumps({"ip": self.ip, "identity": self.identity, "node": self.node}, sort_keys=True).encode()

    @classmethod
    def decode(cls, key: str, value: bytes) -> IPEntry:
        """Raises ValueError naming what is wrong."""
        address = key[len(keys.IPCACHE):]
        try:
            data = json.loads(value)
        except (UnicodeDecodeError, ValueError):
            raise ValueError(f"{key}: value is not JSON") from None
        if not isinstance(data, dict):
            raise ValueError(f"{key}: value is not an object")
        ip, identity, node = data.get("ip"), data.get("identity"), data.get("node")
        if not isinstance(ip, str) or ip != address:
            raise ValueError(f"{key}: field ip {ip!r} does not match the key")
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"{key}: field ip {ip!r} is not an address") from None
        if not isinstance(identity, int) or isinstance(identity, bool) \
                or not MIN_ALLOCATED <= identity <= MAX_ALLOCATED:
            raise ValueError(f"{key}: field identity {identity!r} is not an endpoint identity (256-65535)")
        if not isinstance(node, str) or not node:
            raise ValueError(f"{key}: field node {node!r} is not a node name")
        return cls(ip, identity, node)

    @property
    def prefix(self) -> IPNetwork:
        return ipaddress.ip_network(self.ip)


class IPCachePublisher(SyncLoop):
    name = "kvstore-ipcache"

    def __init__(self, store: KVStore, session: Session, backoff: tuple[float, float] = (0.2, 5.0)) -> None:
        super().__init__("kvstore-ipcache-publisher", backoff)
        self.store = store
        self.session = session
        self.node = session.node
        self._lock = threading.Lock()
        self._wanted: dict[str, IPEntry] = {}
        self._published: dict[str, IPEntry] = {}
        self._swept = False  # the previous run's stale keys have been deleted
        self._republish = False
        self.synced = threading.Event()  # the store holds what was last wanted
        session.on_renew.append(self._renewed)

    # ------------------------------------------------------------------ the sink

    def realize(self, desired: Desired) -> None:
        wanted: dict[str, IPEntry] = {}
        for ep in desired.endpoints.values():
            for ip in ep.ips:
                wanted[ip] = IPEntry(ip, ep.identity, self.node)
        with self._lock:
            if wanted == self._wanted:
                return
            self._wanted = wanted
            self.synced.clear()
        self._wake.set()

    # ------------------------------------------------------------------ the writer

    def _renewed(self, lease: int) -> None:
        with self._lock:
            self._republish = True
            self.synced.clear()
        self._wake.set()

    what = "publishing endpoint addresses"

    def _failures(self) -> tuple[type[BaseException], ...]:
        return (KVStoreError,)

    def _sync(self) -> None:
        with self._lock:
            wanted = dict(self._wanted)
            if self._republish:
                self._published.clear()
                self._republish = False
        lease = self.session.lease
        for ip, entry in wanted.items():
            if self._published.get(ip) != entry:
                self.store.put(keys.ip_key(ip), entry.encode(), lease=lease)
                self._published[ip] = entry
        for ip in [ip for ip in self._published if ip not in wanted]:
            self._delete_own(keys.ip_key(ip))
            del self._published[ip]
        if not self._swept:  # only after everything wanted is in the store
            items, _ = self.store.get_prefix(keys.IPCACHE)
            for kv in items:
                ip = kv.key[len(keys.IPCACHE):]
                if ip not in wanted and _node_of(kv.value) == self.node:
                    self.store.delete(kv.key, mod_revision=kv.mod_revision)
            self._swept = True
        with self._lock:
            if wanted == self._wanted and not self._republish:
                self.synced.set()

    def _delete_own(self, key: str) -> None:
        kv = self.store.get(key)
        if kv is not None and _node_of(kv.value) == self.node:  # another node may have the address now
            self.store.delete(key, mod_revision=kv.mod_revision)


def _node_of(value: bytes) -> str | None:
    try:
        data = json.loads(value)
    except (UnicodeDecodeError, ValueError):
        return None
    node = data.get("node") if isinstance(data, dict) else None
    return node if isinstance(node, str) else None


#: (upserts: prefix -> identity, deletes: prefixes) of other nodes' endpoints
RemoteCallback = Callable[[Mapping[IPNetwork, int], Sequence[IPNetwork]], None]


class RemoteIPCache:
    def __init__(self, store: KVStore, node: str, on_change: RemoteCallback) -> None:
        self.node = node
        self.on_change = on_change
        self.entries: dict[str, IPEntry] = {}  # key -> the other nodes' valid entries
        self.malformed = 0
        self.mirror = PrefixMirror(store, keys.IPCACHE, self._on_change)

    def start(self) -> None:
        self.mirror.start()

    def stop(self) -> None:
        self.mirror.stop()

    def _on_change(self, upserts: Mapping[str, bytes], deletes: Sequence[str]) -> None:
        add: dict[IPNetwork, int] = {}
        gone: list[IPNetwork] = []
        for key in deletes:
            old = self.entries.pop(key, None)
            if old is not None:
                gone.append(old.prefix)
        for key, value in upserts.items():
            try:
                entry = IPEntry.decode(key, value)
            except ValueError as e:
                self.malformed += 1
                _log.warning("kvstore: skipping %s", e)
                continue
            old = self.entries.pop(key, None)
            if entry.node == self.node:  # ours: the engine knows its own endpoints
                if old is not None:
                    gone.append(old.prefix)
                continue
            self.entries[key] = entry
            add[entry.prefix] = entry.identity
        gone = [p for p in gone if p not in add]
        if add or gone:
            self.on_change(add, gone)

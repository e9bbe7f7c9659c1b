"""``CiliumEndpoint`` objects: this node's endpoints published, other nodes' received (CRD mode).

``CiliumEndpointPublisher`` is a realizer sink: each ``Desired`` names this node's endpoints and
identities; a thread of its own writes the difference to the API server (create, or read and
replace; delete), retrying with backoff while it cannot, so the realizer never waits for the
network. A pod's endpoint (``POD.NAMESPACE``) is published as the pod's namespace and name, as
Cilium does; another endpoint under its namespace label (``default`` without one) and its own name.
An object another node owns is never overwritten. After the first complete write, objects this
node owns that it no longer has (from before a restart) are deleted.

``RemoteCiliumEndpoints`` is the watch handler of every namespace's CiliumEndpoints: the other
nodes' addresses with their identity go to ``on_change`` (upserts, deletes), as the kvstore's
remote ipcache does. An object that does not parse, names an identity outside 256-65535 or an
address that is not one is logged, counted and skipped.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..background import SyncLoop
from ..policy.identity import MAX_ALLOCATED, MIN_ALLOCATED
from ..policy.errors import LabelError
from ..policy.labels import LabelSet
from ..policy.model import IPNetwork
from ..realizer.desired import Desired, EndpointState

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

_log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "cilium.io", "v2", "ciliumendpoints"
NODE_LABEL = "cilia.io/node"  # which node owns the object
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_NOT_FOUND, _CONFLICT = 404, 409


@dataclass(frozen=True, slots=True)
class Published:
    namespace: str
    name: str
    identity: int
    ips: tuple[str, ...]
    labels: tuple[str, ...]


def object_name(ep: EndpointState, labels: Sequence[str]) -> tuple[str, str] | None:
    """(namespace, name) of the endpoint's CiliumEndpoint; None if it cannot have one."""
    try:
        namespace = LabelSet.parse(list(labels)).namespace() or "default"
    except LabelError:
        namespace = "default"
    name = ep.name[:-len(namespace) - 1] if ep.name.endswith(f".{namespace}") else ep.name
    return (namespace, name) if _NAME.match(name) and _NAME.match(namespace) else None


def endpoint_object(p: Published, node: str) -> dict[str, Any]:
    addressing = [{"ipv6" if ipaddress.ip_address(ip).version == 6 else "ipv4": ip} for ip in p.ips]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "CiliumEndpoint",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": {NODE_LABEL: node}},
            "status": {"identity": {"id": p.identity, "labels": list(p.labels)},
                       "networking": {"addressing": addressing, "node": node}}}


def _owner(obj: Mapping[str, Any]) -> str | None:
    status = obj.get("status")
    networking = status.get("networking") if isinstance(status, Mapping) else None
    node = networking.get("node") if isinstance(networking, Mapping) else None
    return node if isinstance(node, str) and node else None


class CiliumEndpointPublisher(SyncLoop):
    name = "k8s-ciliumendpoints"

    def __init__(self, api: ApiClient, node: str, backoff: tuple[float, float] = (0.2, 5.0),
                 timeout: float = 10.0) -> None:
        from kubernetes import client

        super().__init__("k8s-ciliumendpoint-publisher", backoff)
        self._custom = client.CustomObjectsApi(api)
        self.node = node
        self.timeout = timeout
        self._lock = threading.Lock()
        self._wanted: dict[tuple[str, str], Published] = {}
        self._published: dict[tuple[str, str], Published] = {}
        self._swept = False
        self.skipped: set[str] = set()  # endpoints that cannot be published (name, or owned elsewhere)
        self.synced = threading.Event()

    def realize(self, desired: Desired) -> None:
        wanted: dict[tuple[str, str], Published] = {}
        for ep in desired.endpoints.values():
            known = desired.labels.get(ep.identity)
            labels = tuple(sorted(known.to_list())) if known is not None else ()
            where = object_name(ep, labels)
            if where is None:
                if ep.name not in self.skipped:
                    _log.warning("k8s: endpoint %s has no valid CiliumEndpoint name; not published", ep.name)
                    self.skipped.add(ep.name)
                continue
            if ep.ips:
                wanted[where] = Published(*where, ep.identity, tuple(ep.ips), labels)
        with self._lock:
            if wanted == self._wanted:
                return
            self._wanted = wanted
            self.synced.clear()
        self._wake.set()

    what = "k8s: publishing CiliumEndpoints"

    def _failures(self) -> tuple[type[BaseException], ...]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        return (ApiException, HTTPError, OSError)

    def _describe(self, error: BaseException) -> str:
        from kubernetes.client.exceptions import ApiException

        return f"{error.status} {error.reason}" if isinstance(error, ApiException) else str(error)

    def _sync(self) -> None:
        with self._lock:
            wanted = dict(self._wanted)
        for key, p in wanted.items():
            if self._published.get(key) != p:
                self._write(p)
                self._published[key] = p
        for key in [k for k in self._published if k not in wanted]:
            self._delete(*key)
            del self._published[key]
        if not self._swept:  # only after everything wanted is written
            listed = _as_dict(self._custom.list_cluster_custom_object(GROUP, VERSION, PLURAL,
                                                                      label_selector=f"{NODE_LABEL}={self.node}",
                                                                      _request_timeout=self.timeout))
            for obj in listed.get("items") or ():
                meta = obj.get("metadata") or {}
                key = (str(meta.get("namespace")), str(meta.get("name")))
                if key not in wanted and _owner(obj) == self.node:
                    self._delete(*key)
            self._swept = True
        with self._lock:
            if wanted == self._wanted:
                self.synced.set()

    def _write(self, p: Published) -> None:
        from kubernetes.client.exceptions import ApiException

        body = endpoint_object(p, self.node)
        try:
            self._custom.create_namespaced_custom_object(GROUP, VERSION, p.namespace, PLURAL, body,
                                                         _request_timeout=self.timeout)
            return
        except ApiException as e:
            if e.status != _CONFLICT:
                raise
        current = _as_dict(self._custom.get_namespaced_custom_object(GROUP, VERSION, p.namespace, PLURAL, p.name,
                                                                     _request_timeout=self.timeout))
        owner = _owner(current)
        if owner is not None and owner != self.node:
            _log.warning("k8s: CiliumEndpoint %s/%s belongs to node %s; not overwritten", p.namespace, p.name, owner)
            return
        body["metadata"]["resourceVersion"] = (current.get("metadata") or {}).get("resourceVersion")
        self._custom.replace_namespaced_custom_object(GROUP, VERSION, p.namespace, PLURAL, p.name, body,
                                                      _request_timeout=self.timeout)

    def _delete(self, namespace: str, name: str) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            current = _as_dict(self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                                         _request_timeout=self.timeout))
            if _owner(current) != self.node:
                return  # another node's now
            self._custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                         _request_timeout=self.timeout)
        except ApiException as e:
            if e.status != _NOT_FOUND:
                raise


#: (upserts: prefix -> identity, deletes: prefixes) of other nodes' endpoints
RemoteCallback = Callable[[Mapping[IPNetwork, int], Sequence[IPNetwork]], None]


def parse_endpoint(obj: Mapping[str, Any]) -> tuple[str, int, tuple[IPNetwork, ...]]:
    """(node, identity, addresses) of a CiliumEndpoint; ValueError naming what is wrong."""
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    where = f"CiliumEndpoint {meta.get('namespace')}/{meta.get('name')}"
    status = obj.get("status")
    if not isinstance(status, Mapping):
        raise ValueError(f"{where}: no status")
    node = _owner(obj)
    if node is None:
        raise ValueError(f"{where}: status.networking.node is not a node name")
    identity = status.get("identity")
    number = identity.get("id") if isinstance(identity, Mapping) else None
    if not isinstance(number, int) or isinstance(number, bool) or not MIN_ALLOCATED <= number <= MAX_ALLOCATED:
        raise ValueError(f"{where}: status.identity.id {number!r} is not an endpoint identity (256-65535)")
    addressing = status["networking"].get("addressing")
    if not isinstance(addressing, list):
        raise ValueError(f"{where}: status.networking.addressing is not a list")
    prefixes = []
    for pair in addressing:
        for family in ("ipv4", "ipv6"):
            text = pair.get(family) if isinstance(pair, Mapping) else None
            if text is None:
                continue
            try:
                prefixes.append(ipaddress.ip_network(ipaddress.ip_address(text)))
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {family} {text!r} is not an address") from None
    return node, number, tuple(prefixes)


class RemoteCiliumEndpoints:
    def __init__(self, node: str, on_change: RemoteCallback) -> None:
        self.node = node
        self.on_change = on_change
        self.entries: dict[tuple[str, str], tuple[int, tuple[IPNetwork, ...]]] = {}
        self.malformed = 0

    def count(self) -> int:
        return len(self.entries)

    def sync(self, items: Sequence[Mapping[str, Any]]) -> None:
        fresh: dict[tuple[str, str], tuple[int, tuple[IPNetwork, ...]]] = {}
        for obj in items:
            parsed = self._parse(obj)
            if parsed is not None:
                fresh[parsed[0]] = parsed[1]
        self._replace(fresh)

    def upsert(self, obj: Mapping[str, Any]) -> None:
        fresh = dict(self.entries)
        parsed = self._parse(obj)
        key = _key(obj)
        fresh.pop(key, None)
        if parsed is not None:
            fresh[key] = parsed[1]
        self._replace(fresh)

    def remove(self, obj: Mapping[str, Any]) -> None:
        fresh = dict(self.entries)
        fresh.pop(_key(obj), None)
        self._replace(fresh)

    def _parse(self, obj: Mapping[str, Any]) -> tuple[tuple[str, str], tuple[int, tuple[IPNetwork, ...]]] | None:
        try:
            node, identity, prefixes = parse_endpoint(obj)
        except ValueError as e:
            self.malformed += 1
            _log.warning("k8s: skipping %s", e)
            return None
        if node == self.node:
            return None  # ours: the engine knows its own endpoints
        return _key(obj), (identity, prefixes)

    def _replace(self, fresh: dict[tuple[str, str], tuple[int, tuple[IPNetwork, ...]]]) -> None:
        before = {p: ident for ident, prefixes in self.entries.values() for p in prefixes}
        after = {p: ident for ident, prefixes in fresh.values() for p in prefixes}
        self.entries = fresh
        upserts = {p: i for p, i in after.items() if before.get(p) != i}
        deletes = [p for p in before if p not in after]
        if upserts or deletes:
            self.on_change(upserts, deletes)


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or "default"), str(meta.get("name")))


def _as_dict(obj: object) -> dict[str, Any]:
    """The client's JSON answer (typed ``object``) as the mapping it is (empty if it is not)."""
    return obj if isinstance(obj, dict) else {}

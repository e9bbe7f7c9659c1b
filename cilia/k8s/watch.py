"""The Kubernetes watcher: Pods (with their namespace's labels), CiliumNetworkPolicy,
CiliumClusterwideNetworkPolicy, NetworkPolicy, and Services with their EndpointSlices, fed to
the agent incrementally.

One thread per resource does what a client-go informer does, with the official client's
``ApiClient``: list (in pages), then watch from the list's resourceVersion; a watch that ends is
resumed from the last resourceVersion seen (events and bookmarks move it), a dropped or failed one
is retried with capped exponential backoff, and 410 Gone (an ERROR event or the HTTP status: the
version was compacted away) relists. A relist is applied as a difference: unchanged objects cost
nothing, objects gone meanwhile are removed, and what the agent kept from before a restart (its
state persists) is reconciled against the list.

Everything the watcher does to the agent goes through ``Sink`` (the agent's own methods), under
one lock, so handlers never race each other. Objects the agent refuses (an invalid
CiliumNetworkPolicy, an endpoint it rejects) change nothing; they are logged and listed in
``status()["rejected"]`` until they are fixed or deleted.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..policy.netpol import CNP, NETWORK_POLICY, derived_policy_name, network_policy_text
from ..specs import EndpointSpec, PolicyKey, StateError
from .services import k8s_services, slice_service
from .convert import (
    CCNP,
    ConvertError,
    endpoint_name,
    is_pod_endpoint,
    merge_endpoint,
    object_key,
    object_labels,
    parse_policy_path,
    pod_endpoint,
    policy_path,
    policy_text,
    resource_version,
)

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

_log = logging.getLogger(__name__)

PODS = "pods"
NAMESPACES = "namespaces"
NETWORK_POLICIES = "networkpolicies"
CNPS = "ciliumnetworkpolicies"
CCNPS = "ciliumclusterwidenetworkpolicies"
SERVICES = "services"
ENDPOINTSLICES = "endpointslices"
RESOURCES = (NAMESPACES, PODS, NETWORK_POLICIES, CNPS, CCNPS, SERVICES, ENDPOINTSLICES)
SERVICE_RESOURCES = (SERVICES, ENDPOINTSLICES)  # watched when the sink takes services
# CRD mode (cilia.k8s.crdmode) adds these, with their handlers
CILIUM_IDENTITIES = "ciliumidentities"
CILIUM_ENDPOINTS = "ciliumendpoints"
_GONE = 410
_UNAVAILABLE = 503  # the agent cannot take it now (a relabelled pod's new identity): try again later


class Sink(Protocol):
    """The agent operations the watcher calls (``cilia.agent.daemon.Agent`` has them all).
    Refusals are exceptions; their ``problems`` (``file:line: field: message``) and ``status``
    (404: already gone) are read when present."""

    def add_endpoint(self, spec: EndpointSpec) -> dict[str, Any]: ...
    def remove_endpoint(self, name: str) -> dict[str, Any]: ...
    def endpoints(self) -> dict[str, Any]: ...
    def import_policies(self, files: Sequence[tuple[str, str]]) -> dict[str, Any]: ...
    def delete_policies(self, name: str | None, namespace: str | None = None) -> dict[str, Any]: ...
    def policies(self) -> dict[str, Any]: ...


@runtime_checkable
class ExactDeleteSink(Sink, Protocol):
    """A sink that deletes policies by their exact (kind, namespace, name) key. Without it a
    CiliumClusterwideNetworkPolicy is deleted with ``delete_policies(name, None)``, which also
    deletes CiliumNetworkPolicies of that name; the watcher then re-imports those it made."""

    def delete_policy_keys(self, keys: Sequence[PolicyKey]) -> dict[str, Any]: ...


@runtime_checkable
class ServiceSink(Sink, Protocol):
    """A sink that takes Kubernetes Services (``cilia.agent.api.InProcess``): one Service's cilia
    services replace the ones it had (None: nothing changed)."""

    def replace_named_services(self, namespace: str, name: str, services: Sequence[Any]) -> dict[str, Any] | None: ...
    def services(self) -> dict[str, Any]: ...


class WatchError(Exception):
    """The watcher cannot be set up (configuration), or the API server answered an error."""


class _Gone(Exception):
    """410 Gone: the resourceVersion was compacted away; list again."""


@dataclass(frozen=True)
class WatchConfig:
    """How the watcher runs (the defaults suit a real cluster; tests shorten the delays)."""

    node_name: str | None = None  # only pods scheduled here (spec.nodeName); None: every pod
    resources: tuple[str, ...] = RESOURCES
    watch_timeout: int = 300  # seconds the server keeps one watch request open
    request_timeout: float = 30.0  # connecting, and reading a list page
    list_limit: int = 500  # objects per list page
    backoff: float = 0.5  # first retry delay after an error; doubles up to max_backoff
    max_backoff: float = 30.0
    namespace_wait: float = 10.0  # how long pods wait for the first namespace list (their labels)
    # Give endpoints the pods' named container ports (what `port: NAME` resolves to). An agent in
    # sidecar mode (no BPF) would put Envoy on them, so it runs without.
    pod_ports: bool = True


@dataclass
class _ResourceStatus:
    connected: bool = False
    synced: bool = False  # listed and applied at least once
    resource_version: str = ""
    events: int = 0
    lists: int = 0
    relists: int = 0  # lists after 410 Gone
    reconnects: int = 0  # watches resumed from a resourceVersion without listing
    errors: int = 0
    last_error: str = ""
    objects: int = 0


def _problems(e: BaseException) -> list[str]:
    return [str(p) for p in getattr(e, "problems", ())]


def _lines(resp: Any) -> Iterator[str]:
    """The lines of a streamed response (a watch sends one JSON event per line)."""
    buffer = b""
    for chunk in resp.stream(amt=None, decode_content=True):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if buffer.strip():
        yield buffer.decode("utf-8", errors="replace")


def _interrupt(resp: Any) -> None:
    """Unblock a thread reading ``resp`` (a urllib3 response) from another thread."""
    try:
        resp.shutdown()
        return
    except Exception:
        pass
    try:
        resp.connection.sock.shutdown(socket.SHUT_RDWR)
    except Exception:
        pass


class Watcher:
    """Watches the API server through ``api`` and keeps ``sink`` (the agent) in step with it."""

    def __init__(self, api: ApiClient, sink: Sink, config: WatchConfig | None = None,
                 extra: Mapping[str, _Handler] | None = None) -> None:
        """``extra``: handlers of more resources (CRD mode's), each also named in ``config.resources``."""
        self.config = config or WatchConfig()
        unknown = set(self.config.resources) - set(RESOURCES) - set(extra or {})
        if unknown:
            raise WatchError(f"unknown resources {sorted(unknown)} (known: {', '.join(RESOURCES)})")
        resources = self.config.resources
        if not isinstance(sink, ServiceSink):  # a sink without services: Services are not watched
            resources = tuple(r for r in resources if r not in SERVICE_RESOURCES)
        self.resources = resources
        self._api = api
        self.sink = sink
        self._apply_lock = threading.RLock()  # held while handlers change caches and call the sink
        self._status_lock = threading.Lock()  # never held while calling the sink: status() never waits
        self._status = {r: _ResourceStatus() for r in self.resources}
        self._rejected: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._synced = {r: threading.Event() for r in self.resources}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: dict[str, Any] = {}
        self.namespaces = _Namespaces(self)
        self.pods = _Pods(self)
        self.cnps = _CiliumPolicies(self, CNP)
        self.ccnps = _CiliumPolicies(self, CCNP)
        self.netpols = _NetworkPolicies(self)
        self.services = _Services(self)
        self._handlers: dict[str, _Handler] = {NAMESPACES: self.namespaces, PODS: self.pods, CNPS: self.cnps,
                                               CCNPS: self.ccnps, NETWORK_POLICIES: self.netpols,
                                               SERVICES: self.services, ENDPOINTSLICES: _EndpointSlices(self.services),
                                               **(extra or {})}
        self._calls = self._list_functions()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        for resource in self.resources:
            t = threading.Thread(target=self._run, args=(resource,), name=f"k8s-watch-{resource}", daemon=True)
            self._threads.append(t)
            t.start()
        if PODS in self.config.resources:
            t = threading.Thread(target=self._retry_pods, name="k8s-retry-pods", daemon=True)
            self._threads.append(t)
            t.start()

    def _retry_pods(self) -> None:
        """Pods the agent could not take for a reason that passes are applied again until they are
        taken or gone, not only at their next event. A new pod is accepted while the kvstore is
        unreachable (it waits for its identity in the agent); what is still refused with 503 is a
        ready pod's relabelling, which keeps its old identity until a new one can be had."""
        interval = min(self.config.max_backoff, max(1.0, self.config.backoff * 4))
        while not self._stop.wait(interval):
            with self._apply_lock:
                if self.pods.retry:
                    self.pods.retry_now()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every thread (open watches are cut); what the agent was given stays."""
        self._stop.set()
        with self._status_lock:
            responses = list(self._responses.values())
        for resp in responses:
            _interrupt(resp)
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]

    def wait_synced(self, timeout: float) -> bool:
        """True once every resource was listed and applied (the agent reflects the cluster)."""
        deadline = time.monotonic() + timeout
        return all(e.wait(max(0.0, deadline - time.monotonic())) for e in self._synced.values())

    def status(self) -> dict[str, Any]:
        """For ``cilia status``: per resource the last resourceVersion, events, lists, errors and
        whether its watch is connected; and the objects the agent refused."""
        with self._status_lock:
            resources = {r: asdict(s) for r, s in self._status.items()}
            rejected = [dict(v) for _, v in sorted(self._rejected.items())]
        return {"connected": all(s["connected"] for s in resources.values()),
                "synced": all(s["synced"] for s in resources.values()),
                "node": self.config.node_name, "resources": resources, "rejected": rejected}

    # ------------------------------------------------------------------ list and watch

    def _list_functions(self) -> dict[str, Callable[..., Any]]:
        from kubernetes import client

        core, net = client.CoreV1Api(self._api), client.NetworkingV1Api(self._api)
        discovery = client.DiscoveryV1Api(self._api)
        custom = client.CustomObjectsApi(self._api)
        pods: dict[str, Any] = {"field_selector": f"spec.nodeName={self.config.node_name}"} \
            if self.config.node_name else {}
        return {
            PODS: functools.partial(core.list_pod_for_all_namespaces, **pods),
            NAMESPACES: core.list_namespace,
            NETWORK_POLICIES: net.list_network_policy_for_all_namespaces,
            CNPS: functools.partial(custom.list_cluster_custom_object, "cilium.io", "v2", CNPS),
            CCNPS: functools.partial(custom.list_cluster_custom_object, "cilium.io", "v2", CCNPS),
            SERVICES: core.list_service_for_all_namespaces,
            ENDPOINTSLICES: discovery.list_endpoint_slice_for_all_namespaces,
            CILIUM_IDENTITIES: functools.partial(custom.list_cluster_custom_object, "cilium.io", "v2",
                                                 CILIUM_IDENTITIES),
            CILIUM_ENDPOINTS: functools.partial(custom.list_cluster_custom_object, "cilium.io", "v2",
                                                CILIUM_ENDPOINTS),
        }

    def _call(self, resource: str, **kwargs: Any) -> Any:
        """One request (list or watch) with the raw response: objects stay the API's JSON."""
        from kubernetes.client.exceptions import ApiException

        try:
            return self._calls[resource](_preload_content=False, **kwargs)
        except ApiException as e:
            if e.status == _GONE:
                raise _Gone(str(e.reason)) from None
            body = e.body.decode(errors="replace") if isinstance(e.body, bytes) else str(e.body or "")
            raise WatchError(f"{e.status} {e.reason}: {body[:300]}".strip(" :")) from None

    def _run(self, resource: str) -> None:
        handler = self._handlers[resource]
        rv: str | None = None
        delay = self.config.backoff
        # Pods get their namespace's labels from their first endpoint, not one relabel later; services
        # get their backends with their first revision.
        first = {PODS: NAMESPACES, SERVICES: ENDPOINTSLICES}.get(resource)
        if first is not None and first in self._synced:
            deadline = time.monotonic() + self.config.namespace_wait
            while not self._synced[first].wait(0.1) and not self._stop.is_set() and time.monotonic() < deadline:
                pass
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._list(resource, handler)
                else:
                    self._set(resource, reconnects=self._get(resource).reconnects + 1)
                rv = self._watch(resource, handler, rv)
                delay = self.config.backoff  # the server ended the request: all is well
            except _Gone as e:
                _log.info("k8s %s: resourceVersion %s is gone (%s): listing again", resource, rv, e)
                self._set(resource, relists=self._get(resource).relists + 1)
                if rv is None:  # the list itself (its continue token) expired: not at full speed
                    self._stop.wait(delay)
                    delay = min(delay * 2, self.config.max_backoff)
                rv = None
            except Exception as e:
                if self._stop.is_set():
                    break
                st = self._get(resource)
                message = str(e) or type(e).__name__
                self._set(resource, connected=False, errors=st.errors + 1, last_error=message)
                _log.warning("k8s %s: %s (retrying in %.1fs)", resource, message, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, self.config.max_backoff)
        self._set(resource, connected=False)

    def _list(self, resource: str, handler: _Handler) -> str:
        items: list[Mapping[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.config.list_limit,
                                      "_request_timeout": (self.config.request_timeout, self.config.request_timeout)}
            if token:
                kwargs["_continue"] = token
            resp = self._call(resource, **kwargs)
            try:
                body = json.loads(resp.data)
            finally:
                resp.release_conn()
            items += [i for i in body.get("items") or () if isinstance(i, Mapping)]
            meta = body.get("metadata") or {}
            token = meta.get("continue") or None
            if token is None:
                rv = str(meta.get("resourceVersion") or "")
                break
        with self._apply_lock:
            handler.sync(items)
            count = handler.count()
        st = self._get(resource)
        self._set(resource, connected=True, synced=True, lists=st.lists + 1, resource_version=rv, objects=count)
        self._synced[resource].set()
        return rv

    def _watch(self, resource: str, handler: _Handler, rv: str) -> str:
        """Follow one watch request from ``rv``; returns the last resourceVersion seen when the
        server ends the request (a broken stream raises)."""
        timeout = self.config.watch_timeout
        resp = self._call(resource, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                          timeout_seconds=timeout,
                          _request_timeout=(self.config.request_timeout, timeout + self.config.request_timeout))
        with self._status_lock:
            self._responses[resource] = resp
        try:
            if self._stop.is_set():
                return rv
            self._set(resource, connected=True)
            for line in _lines(resp):
                if not line.strip():
                    continue
                rv = self._event(resource, handler, json.loads(line), rv)
                if self._stop.is_set():
                    break
            return rv
        finally:
            with self._status_lock:
                self._responses.pop(resource, None)
            try:
                resp.release_conn()
            except Exception:
                pass

    def _event(self, resource: str, handler: _Handler, event: Mapping[str, Any], rv: str) -> str:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, Mapping):
            raise WatchError(f"watch event {kind!r} without an object")
        if kind == "ERROR":
            if obj.get("code") == _GONE:
                raise _Gone(str(obj.get("message") or "410 Gone"))
            raise WatchError(f"watch error {obj.get('code')} {obj.get('reason')}: {obj.get('message')}")
        new_rv = resource_version(obj) or rv
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            try:
                with self._apply_lock:
                    if kind == "DELETED":
                        handler.remove(obj)
                    else:
                        handler.upsert(obj)
            except Exception as e:
                # Move on: retrying the same event would stop this resource for good.
                _log.exception("k8s %s: %s event not applied", resource, kind)
                st = self._get(resource)
                self._set(resource, errors=st.errors + 1, last_error=f"{kind} not applied: {e}")
        elif kind != "BOOKMARK":  # bookmarks only move the resourceVersion
            _log.warning("k8s %s: ignoring watch event of type %r", resource, kind)
        st = self._get(resource)
        self._set(resource, events=st.events + 1, resource_version=new_rv, objects=handler.count())
        return new_rv

    def _get(self, resource: str) -> _ResourceStatus:
        with self._status_lock:
            return _ResourceStatus(**asdict(self._status[resource]))

    def _set(self, resource: str, **changes: Any) -> None:
        with self._status_lock:
            st = self._status[resource]
            for k, v in changes.items():
                setattr(st, k, v)

    # ------------------------------------------------------------------ shared by the handlers

    def reject(self, kind: str, namespace: str, name: str, error: str, problems: Sequence[str] = ()) -> None:
        where = f"{namespace}/{name}" if namespace else name
        _log.warning("k8s: %s %s refused: %s%s", kind, where, error, "".join(f"\n  {p}" for p in problems))
        with self._status_lock:
            self._rejected[(kind, namespace, name)] = {"kind": kind, "namespace": namespace, "name": name,
                                                       "error": error, "problems": list(problems),
                                                       "time": time.time()}

    def accept(self, kind: str, namespace: str, name: str) -> None:
        with self._status_lock:
            self._rejected.pop((kind, namespace, name), None)

    def agent_policies(self) -> list[dict[str, Any]]:
        return [p for p in self.sink.policies().get("policies", []) if isinstance(p, dict)]

    def delete_policy(self, key: PolicyKey) -> None:
        """Delete exactly the agent's policy ``key`` (gone already is fine)."""
        kind, namespace, name = key
        try:
            if isinstance(self.sink, ExactDeleteSink):
                self.sink.delete_policy_keys([key])
            elif kind == CNP:
                self.sink.delete_policies(name, namespace)  # with a namespace, only that CNP matches
            else:
                self._delete_clusterwide(name)
        except Exception as e:
            if getattr(e, "status", None) == 404:
                return
            _log.warning("k8s: deleting policy %s: %s", "/".join(x for x in key if x), e)

    def _delete_clusterwide(self, name: str) -> None:
        # delete_policies(name, None) also deletes every CiliumNetworkPolicy of that name: put back
        # the ones the watcher made. (An ExactDeleteSink does not need this.)
        others = [(CNP, str(p.get("namespace") or ""), name) for p in self.agent_policies()
                  if p.get("name") == name and p.get("kind") == CNP]
        self.sink.delete_policies(name, None)
        restore: list[tuple[str, str]] = []
        for key in others:
            applied = self.cnps.applied_by_key(key) or self.netpols.applied_by_key(key)
            if applied is not None and applied.text:
                restore.append((applied.path, applied.text))
            else:
                _log.error("k8s: deleting CiliumClusterwideNetworkPolicy %s also deleted CiliumNetworkPolicy %s/%s "
                           "(the agent deletes policies by name); import it again", name, key[1], name)
        if restore:
            self.sink.import_policies(restore)


def format_status(s: Mapping[str, Any]) -> str:
    """``Watcher.status()`` as lines for ``cilia status``."""
    state = ("connected" if s["connected"] else "NOT connected") + (", synced" if s["synced"] else ", not synced")
    lines = [f"Kubernetes:  {state}" + (f", pods of node {s['node']}" if s.get("node") else "")]
    for name, r in s["resources"].items():
        lines.append(f"  {name:<34} {'up' if r['connected'] else 'DOWN':<5} rv {r['resource_version'] or '-':<10} "
                     f"objects {r['objects']:<5} events {r['events']:<6} lists {r['lists']} (410: {r['relists']}) "
                     f"reconnects {r['reconnects']} errors {r['errors']}"
                     + (f", last: {r['last_error']}" if r["last_error"] else ""))
    for x in s["rejected"]:
        where = f"{x['namespace']}/{x['name']}" if x["namespace"] else x["name"]
        lines.append(f"  refused {x['kind']} {where}: {x['error']}")
        lines += [f"    {p}" for p in x["problems"]]
    return "\n".join(lines)


def connect(kubeconfig: str | None, in_cluster: bool) -> ApiClient:
    """An ``ApiClient`` from the pod's service account (``in_cluster``) or a kubeconfig file
    (None: ``$KUBECONFIG`` or ``~/.kube/config``)."""
    from kubernetes import client, config

    try:
        if in_cluster:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            return client.ApiClient(configuration)
        api: ApiClient = config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, persist_config=False)
        return api
    except (config.ConfigException, OSError) as e:
        where = "in-cluster" if in_cluster else (kubeconfig or "the default kubeconfig")
        raise WatchError(f"Kubernetes configuration ({where}): {e}") from None


# ---------------------------------------------------------------------- handlers (called under the apply lock)

class _Handler(Protocol):
    def sync(self, items: Sequence[Mapping[str, Any]]) -> None: ...
    def upsert(self, obj: Mapping[str, Any]) -> None: ...
    def remove(self, obj: Mapping[str, Any]) -> None: ...
    def count(self) -> int: ...


def _keyed(items: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    out = {}
    for obj in items:
        try:
            out[object_key(obj)] = obj
        except ConvertError:
            _log.warning("k8s: ignoring an object without metadata.name")
    return out


class _Namespaces:
    def __init__(self, w: Watcher) -> None:
        self.w = w
        self.labels: dict[str, dict[str, str]] = {}

    def count(self) -> int:
        return len(self.labels)

    def sync(self, items: Sequence[Mapping[str, Any]]) -> None:
        new = {key[1]: object_labels(obj) for key, obj in _keyed(items).items()}
        changed = [n for n, labels in new.items() if self.labels.get(n) != labels]
        self.labels = new
        for name in changed:
            self.w.pods.relabel(name)

    def upsert(self, obj: Mapping[str, Any]) -> None:
        _, name = object_key(obj)
        labels = object_labels(obj)
        if self.labels.get(name) != labels:
            self.labels[name] = labels
            self.w.pods.relabel(name)

    def remove(self, obj: Mapping[str, Any]) -> None:
        self.labels.pop(object_key(obj)[1], None)  # its pods were deleted before it


class _Pods:
    KIND = "Pod"

    def __init__(self, w: Watcher) -> None:
        self.w = w
        self.pods: dict[tuple[str, str], Mapping[str, Any]] = {}
        self.retry: set[tuple[str, str]] = set()  # refused for a passing reason (503): applied again

    def count(self) -> int:
        return len(self.pods)

    def retry_now(self) -> None:
        keys, self.retry = self.retry, set()
        existing = self._existing()
        for key in keys:
            pod = self.pods.get(key)
            if pod is not None:
                self._apply(pod, existing)

    def _existing(self) -> dict[str, EndpointSpec]:
        out: dict[str, EndpointSpec] = {}
        for d in self.w.sink.endpoints().get("endpoints", []):
            try:
                spec = EndpointSpec.from_json(d)
            except StateError:
                continue
            out[spec.name] = spec
        return out

    def sync(self, items: Sequence[Mapping[str, Any]]) -> None:
        self.pods = _keyed(items)
        existing = self._existing()
        wanted = {name for pod in self.pods.values() if (name := self._apply(pod, existing)) is not None}
        for name, spec in list(existing.items()):
            if name not in wanted and is_pod_endpoint(spec):
                self._remove_endpoint(name)  # its pod went away while nobody watched

    def upsert(self, obj: Mapping[str, Any]) -> None:
        self.pods[object_key(obj)] = obj
        self._apply(obj, self._existing())

    def remove(self, obj: Mapping[str, Any]) -> None:
        namespace, name = object_key(obj)
        self.pods.pop((namespace, name), None)
        self.retry.discard((namespace, name))
        self.w.accept(self.KIND, namespace, name)
        ep = endpoint_name(namespace or "default", name)
        spec = self._existing().get(ep)
        if spec is not None and spec.interface is None:  # with an interface, the CNI plugin's DEL removes it
            self._remove_endpoint(ep)

    def relabel(self, namespace: str) -> None:
        pods = [p for k, p in self.pods.items() if k[0] == namespace]
        if pods:
            existing = self._existing()
            for pod in pods:
                self._apply(pod, existing)

    def _apply(self, pod: Mapping[str, Any], existing: dict[str, EndpointSpec]) -> str | None:
        """Give the pod the endpoint it should have; returns the endpoint's name (None: none)."""
        namespace, name = object_key(pod)
        try:
            desired = pod_endpoint(pod, self.w.namespaces.labels.get(namespace or "default"), self.w.config.pod_ports)
        except ConvertError as e:
            self.w.reject(self.KIND, namespace, name, str(e))
            return None
        ep = endpoint_name(namespace or "default", name)
        current = existing.get(ep)
        if desired is None:
            if current is not None and is_pod_endpoint(current):
                self._remove_endpoint(ep)
                existing.pop(ep, None)
            self.w.accept(self.KIND, namespace, name)
            return None
        spec = merge_endpoint(desired, current)
        self.retry.discard((namespace, name))
        if spec != current:
            try:
                self.w.sink.add_endpoint(spec)
            except Exception as e:
                self.w.reject(self.KIND, namespace, name, str(e), _problems(e))
                if getattr(e, "status", None) == _UNAVAILABLE:
                    self.retry.add((namespace, name))
                return ep
            existing[ep] = spec
        self.w.accept(self.KIND, namespace, name)
        return ep

    def _remove_endpoint(self, name: str) -> None:
        try:
            self.w.sink.remove_endpoint(name)
        except Exception as e:
            if getattr(e, "status", None) != 404:
                _log.warning("k8s: removing endpoint %s: %s", name, e)


@dataclass(frozen=True)
class _Applied:
    """What the agent holds for one object: the text imported under ``path`` as policy ``key``
    (text "" when it was found in the agent, from before a restart)."""

    path: str
    text: str
    key: PolicyKey


@dataclass(frozen=True)
class _Pending:
    obj: tuple[str, str]
    applied: _Applied


class _Policies:
    """CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy or NetworkPolicy objects → agent policies."""

    def __init__(self, w: Watcher, kind: str) -> None:
        self.w = w
        self.kind = kind
        self.objects: dict[tuple[str, str], Mapping[str, Any]] = {}  # what the API has, valid or not
        self.applied: dict[tuple[str, str], _Applied] = {}
        self._agent: list[dict[str, Any]] = []  # the agent's policies, read once per list or event

    def count(self) -> int:
        return len(self.objects)

    def render(self, key: tuple[str, str], obj: Mapping[str, Any]) -> tuple[PolicyKey, str]:
        raise NotImplementedError

    def before_import(self, item: _Pending) -> None:
        """Called before ``item`` is imported."""

    def applied_by_key(self, key: PolicyKey) -> _Applied | None:
        return next((a for a in self.applied.values() if a.key == key), None)

    def sync(self, items: Sequence[Mapping[str, Any]]) -> None:
        self.objects = _keyed(items)
        self._agent = self.w.agent_policies()
        # What the agent holds from this kind: known from this run, or persisted from an earlier one.
        held: dict[tuple[str, str], _Applied] = {}
        for p in self._agent:
            parsed = parse_policy_path(str(p.get("file", "")))
            if parsed is None or parsed[0] != self.kind:
                continue
            key = (str(p["kind"]), str(p.get("namespace") or ""), str(p["name"]))
            mine = self.applied.get((parsed[1], parsed[2]))
            held[(parsed[1], parsed[2])] = mine if mine is not None and mine.key == key \
                else _Applied(str(p["file"]), "", key)
        self.applied = held  # what was deleted from the agent behind the watcher's back is imported again
        for obj in [k for k in self.applied if k not in self.objects]:
            self.w.accept(self.kind, *obj)
            self.w.delete_policy(self.applied.pop(obj).key)  # deleted while nobody watched
        self._import([item for key, obj in self.objects.items() if (item := self._prepare(key, obj)) is not None])

    def upsert(self, obj: Mapping[str, Any]) -> None:
        key = object_key(obj)
        self.objects[key] = obj
        self._agent = self.w.agent_policies()
        item = self._prepare(key, obj)
        if item is not None:
            self._import([item])

    def remove(self, obj: Mapping[str, Any]) -> None:
        key = object_key(obj)
        self.objects.pop(key, None)
        self.w.accept(self.kind, *key)
        applied = self.applied.pop(key, None)
        if applied is not None:
            self.w.delete_policy(applied.key)

    def _prepare(self, key: tuple[str, str], obj: Mapping[str, Any]) -> _Pending | None:
        try:
            pkey, text = self.render(key, obj)
        except ConvertError as e:
            self.w.reject(self.kind, *key, str(e))
            return None
        old = self.applied.get(key)
        if old is not None and old.text == text and old.key == pkey:
            return None  # unchanged (a relist, a status update): nothing to do
        return _Pending(key, _Applied(policy_path(self.kind, *key), text, pkey))

    def _import(self, items: list[_Pending]) -> None:
        for item in items:
            self.before_import(item)
        if len(items) > 1:
            try:
                self.w.sink.import_policies([(i.applied.path, i.applied.text) for i in items])
            except Exception:
                pass  # one at a time below, to tell which are refused
            else:
                for item in items:
                    self._imported(item)
                return
        for item in items:
            try:
                self.w.sink.import_policies([(item.applied.path, item.applied.text)])
            except Exception as e:
                # The agent keeps what it had for this object (if anything): an invalid update changes nothing.
                self.w.reject(self.kind, *item.obj, str(e), _problems(e))
                continue
            self._imported(item)

    def _imported(self, item: _Pending) -> None:
        old = self.applied.get(item.obj)
        self.applied[item.obj] = item.applied
        self.w.accept(self.kind, *item.obj)
        if old is not None and old.key != item.applied.key:
            self.w.delete_policy(old.key)  # a NetworkPolicy moved to another name


class _CiliumPolicies(_Policies):
    def render(self, key: tuple[str, str], obj: Mapping[str, Any]) -> tuple[PolicyKey, str]:
        namespace = (key[0] or "default") if self.kind == CNP else ""
        return (self.kind, namespace, key[1]), policy_text(obj, self.kind)

    def before_import(self, item: _Pending) -> None:
        if self.kind == CNP:
            self.w.netpols.release(item.applied.key)


class _NetworkPolicies(_Policies):
    """Each NetworkPolicy becomes a CiliumNetworkPolicy of its own name (``networkpolicy.NAME``,
    or the next free variant when a CiliumNetworkPolicy has that name), kept in ``applied``, so a
    CiliumNetworkPolicy called like the NetworkPolicy is a different policy, and deleting the
    NetworkPolicy deletes exactly what it became."""

    def __init__(self, w: Watcher) -> None:
        super().__init__(w, NETWORK_POLICY)

    def render(self, key: tuple[str, str], obj: Mapping[str, Any]) -> tuple[PolicyKey, str]:
        namespace = key[0] or "default"
        taken = self._taken(namespace, key)
        current = self.applied.get(key)
        if current is not None and current.key[2] not in taken:
            name = current.key[2]
        else:
            name = next(n for n in (derived_policy_name(key[1], i) for i in range(len(taken) + 1)) if n not in taken)
        return (CNP, namespace, name), network_policy_text(obj, name)

    def _taken(self, namespace: str, key: tuple[str, str]) -> set[str]:
        """CiliumNetworkPolicy names of ``namespace`` that are not this NetworkPolicy's to use."""
        path = policy_path(self.kind, *key)
        taken = {name for ns, name in self.w.cnps.objects if (ns or "default") == namespace}
        taken |= {a.key[2] for k, a in self.applied.items() if k != key and a.key[1] == namespace}
        taken |= {str(p["name"]) for p in self._agent  # imported from files (`cilia policy import`)
                  if p.get("kind") == CNP and p.get("namespace") == namespace and p.get("file") != path}
        return taken

    def release(self, key: PolicyKey) -> None:
        """A CiliumNetworkPolicy ``key`` is about to be imported: a NetworkPolicy holding that
        name moves to another one first."""
        for obj, applied in list(self.applied.items()):
            if applied.key == key and obj in self.objects:
                self._agent = self.w.agent_policies()
                item = self._prepare(obj, self.objects[obj])
                if item is not None:
                    self._import([item])


class _Services:
    """Services (and, through ``_EndpointSlices``, their slices) → the agent's services: each
    Service's cilia services are replaced whole when it or one of its slices changes. The agent's
    services with a namespace and a name are the watcher's (a relist removes those whose Service
    is gone); services made through the API without a namespace are left alone."""

    KIND = "Service"

    def __init__(self, w: Watcher) -> None:
        self.w = w
        self.objects: dict[tuple[str, str], Mapping[str, Any]] = {}  # (namespace, name) -> Service
        self.slices: dict[tuple[str, str], Mapping[str, Any]] = {}  # (namespace, slice name) -> EndpointSlice
        self.applied: set[tuple[str, str]] = set()

    @property
    def sink(self) -> ServiceSink:
        assert isinstance(self.w.sink, ServiceSink)
        return self.w.sink

    def count(self) -> int:
        return len(self.objects)

    def sync(self, items: Sequence[Mapping[str, Any]]) -> None:
        self.objects = {(ns or "default", name): obj for (ns, name), obj in _keyed(items).items()}
        held = {(str(s.get("namespace")), str(s.get("name"))) for s in self.sink.services().get("services", [])
                if s.get("namespace") and s.get("name")}
        for key in sorted(set(self.objects) | self.applied | held):
            self.apply(key)

    def upsert(self, obj: Mapping[str, Any]) -> None:
        namespace, name = object_key(obj)
        key = (namespace or "default", name)
        self.objects[key] = obj
        self.apply(key)

    def remove(self, obj: Mapping[str, Any]) -> None:
        namespace, name = object_key(obj)
        key = (namespace or "default", name)
        self.objects.pop(key, None)
        self.apply(key)

    def apply(self, key: tuple[str, str]) -> None:
        namespace, name = key
        svc = self.objects.get(key)
        try:
            if svc is None:
                services = []
            else:
                slices = [s for s in self.slices.values() if slice_service(s) == key]
                services = k8s_services(svc, slices, self.w.pods.pods)
            self.sink.replace_named_services(namespace, name, services)
        except Exception as e:
            self.w.reject(self.KIND, namespace, name, str(e), _problems(e))
            return
        self.w.accept(self.KIND, namespace, name)
        if services:
            self.applied.add(key)
        else:
            self.applied.discard(key)


class _EndpointSlices:
    def __init__(self, services: _Services) -> None:
        self.services = services

    def count(self) -> int:
        return len(self.services.slices)

    def sync(self, items: Sequence[Mapping[str, Any]]) -> None:
        before = {slice_service(s) for s in self.services.slices.values()}
        self.services.slices = _keyed(items)
        after = {slice_service(s) for s in self.services.slices.values()}
        for key in sorted(k for k in before | after if k is not None and k in self.services.objects):
            self.services.apply(key)

    def upsert(self, obj: Mapping[str, Any]) -> None:
        key = object_key(obj)
        old = self.services.slices.get(key)
        self.services.slices[key] = obj
        self._changed(old, obj)

    def remove(self, obj: Mapping[str, Any]) -> None:
        old = self.services.slices.pop(object_key(obj), None)
        self._changed(old, obj)

    def _changed(self, *slices: Mapping[str, Any] | None) -> None:
        """Re-apply the services the slice belonged to (before and after: its label may change)."""
        keys = {slice_service(s) for s in slices if s is not None}
        for key in sorted(k for k in keys if k is not None and k in self.services.objects):
            self.services.apply(key)

"""The agent: policy engine + xDS server + supervised Envoy + access-log receiver, with state on disk.

Every mutation (policy import/delete, endpoint add/delete) happens under one lock, in this order:
check the input completely, change the engine (all or nothing), persist the state, bump the
revision, translate every endpoint's policy and publish it to the xDS cache (clusters before
listeners). ``wait(revision)`` then blocks until the proxies acked the listener version that
revision produced. A failure before the persist step leaves engine, state and cache untouched.

On start the persisted state is replayed into a fresh engine and its resources are in the cache
before the xDS server or Envoy start, so a restarted agent serves the same config to the first
request and Envoy never listens without its policy.
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..envoy.accesslog import AccessLogReceiver, AccessLogServer, AccessRecord
from ..envoy.bootstrap import build_bootstrap, to_json
from ..envoy.loopback import free_port
from ..envoy.supervisor import EnvoySupervisor
from ..envoy.translate import AccessLogTarget, PortMapping, ProxyResources, prefixes_by_identity, translate_ingress
from ..policy import (
    DirectionMapState,
    Endpoint,
    FileAllocator,
    L7ConflictError,
    LabelSet,
    Policy,
    PolicyEngine,
    PolicyError,
    Problem,
    Protocol,
    parse_text,
)
from ..policy.model import IPNetwork
from ..policy.parse import check_unique
from ..xds import CLUSTER, LISTENER, AckState, AckTracker, Cache, NackError, TypeChange, XdsServer, version_key
from .state import EndpointSpec, PolicyKey, StateError, load_state, save_state

_log = logging.getLogger(__name__)

EnvoyMode = Literal["managed", "external", "none"]
ACCESS_LOG_CLUSTER = "cilia-accesslog"


class AgentError(Exception):
    """A request the agent refuses; ``status`` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 400, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.problems = tuple(problems)


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    envoy: EnvoyMode = "managed"
    xds_addresses: tuple[str, ...] = ()  # extra addresses besides unix:<state_dir>/xds.sock
    node_id: str = "cilia-node"
    envoy_args: tuple[str, ...] = ("--drain-time-s", "0")
    apply_timeout: float = 10.0  # how long a change waits for the managed Envoy's ACK or NACK
    ring_size: int = 10_000

    @property
    def api_socket(self) -> Path:
        return self.state_dir / "cilia.sock"

    @property
    def xds_socket(self) -> Path:
        return self.state_dir / "xds.sock"

    @property
    def accesslog_socket(self) -> Path:
        return self.state_dir / "accesslog.sock"


@dataclass
class _Realized:
    """Listener versions by revision, to answer ``wait``; older revisions map to the oldest kept."""

    versions: dict[int, str] = field(default_factory=dict)

    def record(self, revision: int, version: str) -> None:
        self.versions[revision] = version
        if len(self.versions) > 1000:
            del self.versions[min(self.versions)]

    def version_for(self, revision: int) -> str | None:
        later = [r for r in self.versions if r >= revision]
        return self.versions[min(later)] if later else None


@dataclass(frozen=True)
class _Translated:
    """An endpoint's last translation and what it was made from (compared by identity: the engine
    hands out the same immutable map-state snapshot until the endpoint's policy changes)."""

    ingress: DirectionMapState
    prefixes: Mapping[int, tuple[IPNetwork, ...]]
    key: tuple[tuple[PortMapping, ...], str]
    resources: ProxyResources


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started = time.time()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.state = load_state(config.state_dir)
        self.engine = PolicyEngine(FileAllocator(config.state_dir))
        self.cache = Cache()
        self.tracker = AckTracker()
        self.receiver = AccessLogReceiver(config.ring_size)
        self.notes: tuple[str, ...] = ()
        self._realized = _Realized()
        self._prefixes: Mapping[int, tuple[IPNetwork, ...]] = {}
        self._translated: dict[str, _Translated] = {}
        self._xds: XdsServer | None = None
        self._als: AccessLogServer | None = None
        self.envoy: EnvoySupervisor | None = None
        self.admin_address: str | None = None
        self._replay()

    # ------------------------------------------------------------------ lifecycle

    def _replay(self) -> None:
        """Rebuild the engine from the persisted state (policies by their original text and path)."""
        policies: list[Policy] = []
        for src in self.state.sources:
            loaded = parse_text(src.text, src.path)
            if not loaded.ok:  # the text was valid when imported; a parser change may reject it now
                raise StateError(f"persisted policy file {src.path} no longer parses: "
                                 + "; ".join(str(p) for p in loaded.problems))
            policies += [p for p in loaded.policies if p.key in src.keys]
        with self.engine.batch():
            for spec in self.state.endpoints.values():
                self.engine.upsert_endpoint(_endpoint(spec))
            if policies:
                self.engine.apply(policies)
        self._publish()

    def start(self) -> None:
        """Serve xDS and access logs, then start Envoy (managed mode) against the loaded config."""
        try:
            for sock in (self.config.xds_socket, self.config.accesslog_socket):
                sock.unlink(missing_ok=True)
            self._xds = XdsServer(self.cache, self.tracker)
            self._xds.add_address(f"unix:{self.config.xds_socket}")
            for address in self.config.xds_addresses:
                self._xds.add_address(address)
            self._xds.start()
            self._als = AccessLogServer(self.receiver)
            self._als.add_address(f"unix:{self.config.accesslog_socket}")
            self._als.start()
            if self.config.envoy == "managed":
                self._start_envoy()
        except BaseException:
            self.stop()
            raise

    def _start_envoy(self) -> None:
        self.admin_address = f"127.0.0.1:{free_port()}"
        bootstrap = self.config.state_dir / "envoy-bootstrap.json"
        bootstrap.write_text(to_json(build_bootstrap(self.config.node_id, f"unix:{self.config.xds_socket}",
                                                     self.admin_address)), encoding="utf-8")
        self.envoy = EnvoySupervisor(bootstrap, self.admin_address, log_path=self.config.state_dir / "envoy.log",
                                     extra_args=self.config.envoy_args)
        self.envoy.start()

    def stop(self) -> None:
        """Stop Envoy (managed mode), then the servers. Safe to repeat."""
        try:
            if self.envoy is not None:
                self.envoy.stop()
        finally:
            for server in (self._xds, self._als):
                if server is not None:
                    server.stop(0)
            self._xds = self._als = None

    # ------------------------------------------------------------------ policies

    def import_policies(self, files: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """Add or replace the policies in ``files`` ((path, text) pairs): all of them or none."""
        parsed: list[tuple[str, str, list[Policy]]] = []
        problems: list[Problem] = []
        for path, text in files:
            loaded = parse_text(text, path)
            problems += loaded.problems
            parsed.append((path, text, loaded.policies))
        if problems:
            raise AgentError(f"{len(problems)} problem(s); nothing was imported", 400, problems)
        policies = [p for _, _, ps in parsed for p in ps]
        if not policies:
            raise AgentError("no CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy in the input")
        try:
            check_unique(policies)
        except PolicyError as e:
            raise AgentError(f"{e}; nothing was imported") from None
        with self._lock:
            keys = {p.key for p in policies}
            before = {p.key: p for p in self.engine.policies() if p.key in keys}
            sources_before = copy.deepcopy(self.state.sources)
            try:
                self.engine.apply(policies)
            except L7ConflictError as e:
                raise AgentError(f"{e}; nothing was imported", 409) from None
            for path, text, ps in parsed:
                if ps:
                    self.state.add_source(path, text, {p.key for p in ps})

            def undo() -> None:
                if keys - before.keys():
                    self.engine.delete(keys - before.keys())
                if before:
                    self.engine.apply(list(before.values()))
                self.state.sources = sources_before

            revision = self._commit_checked(undo)
        return {"revision": revision, "policies": [_policy_json(p) for p in policies]}

    def delete_policies(self, name: str | None, namespace: str | None = None) -> dict[str, Any]:
        """Delete the policies called ``name`` (in ``namespace`` if given), or all with None."""
        with self._lock:
            if name is None:
                keys = [p.key for p in self.engine.policies()]
            else:
                keys = self.engine.find_policies(name, namespace)
                if not keys:
                    where = f" in namespace {namespace}" if namespace else ""
                    raise AgentError(f"no policy named {name}{where}", 404)
            if keys:
                self.engine.delete(keys)
            self.state.drop_keys(set(keys))
            revision = self._commit()
        return {"revision": revision, "deleted": [list(k) for k in sorted(keys)]}

    def policies(self) -> dict[str, Any]:
        with self._lock:
            return {"revision": self.state.revision, "policies": [_policy_json(p) for p in self.engine.policies()]}

    # ------------------------------------------------------------------ endpoints

    def add_endpoint(self, spec: EndpointSpec) -> dict[str, Any]:
        """Add or replace an endpoint; returns its identity and the new revision."""
        if self.config.envoy != "none" and spec.ips:
            for p in spec.ports:
                if p.protocol is Protocol.TCP and p.app_port == p.port:
                    raise AgentError(
                        f"endpoint {spec.name}: port {p.port}: without BPF redirection Envoy listens on "
                        f"{spec.ips[0]}:{p.port} itself; give the app's own port as {p.port}:APP_PORT")
        try:
            endpoint = _endpoint(spec)
        except (ValueError, PolicyError) as e:
            raise AgentError(f"endpoint {spec.name}: {e}") from None
        with self._lock:
            try:
                self.engine.upsert_endpoint(endpoint)
            except L7ConflictError as e:
                raise AgentError(f"endpoint {spec.name}: {e}", 409) from None
            previous = self.state.endpoints.get(spec.name)
            self.state.endpoints[spec.name] = spec

            def undo() -> None:
                if previous is None:
                    self.engine.remove_endpoint(spec.name)
                    del self.state.endpoints[spec.name]
                else:
                    self.engine.upsert_endpoint(_endpoint(previous))
                    self.state.endpoints[spec.name] = previous

            revision = self._commit_checked(undo)
            return {"revision": revision, "endpoint": self._endpoint_json(spec)}

    def remove_endpoint(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name not in self.state.endpoints:
                raise AgentError(f"no endpoint named {name}", 404)
            self.engine.remove_endpoint(name)
            del self.state.endpoints[name]
            return {"revision": self._commit()}

    def endpoints(self) -> dict[str, Any]:
        with self._lock:
            return {"endpoints": [self._endpoint_json(s) for _, s in sorted(self.state.endpoints.items())]}

    def _endpoint_json(self, spec: EndpointSpec) -> dict[str, Any]:
        ident = self.engine.identity_of(spec.name)
        ms = self.engine.endpoint_policy(spec.name).map_state
        return {**spec.to_json(), "identity": ident.id, "identity_labels": ident.labels.to_list(),
                "enforcement": {"ingress": ms.ingress.enforced, "egress": ms.egress.enforced}}

    def identities(self) -> dict[str, Any]:
        with self._lock:
            return {"identities": [{"id": i.id, "kind": i.kind.value, "labels": i.labels.to_list(),
                                    "prefix": str(i.prefix) if i.prefix is not None else None}
                                   for i in sorted(self.engine.identities(), key=lambda i: i.id)]}

    # ------------------------------------------------------------------ revisions

    def _commit(self) -> int:
        """Persist, bump the revision and publish; called with the lock held after the engine changed."""
        self.state.revision += 1
        save_state(self.config.state_dir, self.state)
        self._publish()
        return self.state.revision

    def _commit_checked(self, undo: Callable[[], None]) -> int:
        """Commit, then wait for the managed Envoy: if it rejects the new config, ``undo`` the
        change and commit the previous config again (a new revision, so versions stay monotonic),
        like Cilium's revert on NACK. The error quotes Envoy. Other proxies' NACKs show in status
        and ``policy wait``; a slow Envoy is not an error here."""
        revision = self._commit()
        if self.envoy is None or not self.envoy.status().running:
            return revision
        version = self._realized.version_for(revision)
        assert version is not None
        try:
            self.tracker.wait(self.config.node_id, LISTENER, version, self.config.apply_timeout)
        except TimeoutError:
            return revision
        except NackError as e:
            undo()
            restored = self._commit()
            raise AgentError(f"Envoy rejected revision {revision}: {e.message}; the change was reverted "
                             f"(revision {restored} restores the previous config)", 409) from None
        return revision

    def _publish(self) -> None:
        listeners, clusters, notes = self._translate()
        # One atomic update; the streams still send clusters before the listeners that name them.
        update = self.cache.update_many({CLUSTER: TypeChange(clusters, replace=True),
                                         LISTENER: TypeChange(listeners, replace=True)})
        self._realized.record(self.state.revision, update.versions[LISTENER])
        self.notes = notes

    def _translate(self) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]:
        """Every endpoint's ingress policy as Envoy listeners (sidecar mode: Envoy on the
        endpoint's address at the policy port, forwarding to the app's port)."""
        listeners: dict[str, Any] = {}
        clusters: dict[str, Any] = {}
        notes: dict[str, None] = {}
        if self.config.envoy == "none":
            return listeners, clusters, ()
        prefixes: Mapping[int, tuple[IPNetwork, ...]] = prefixes_by_identity(self.engine.ipcache.items())
        if prefixes == self._prefixes:
            prefixes = self._prefixes  # the same object: lets _translated entries match by identity
        self._prefixes = prefixes
        translated: dict[str, _Translated] = {}
        access_log = AccessLogTarget(ACCESS_LOG_CLUSTER, f"unix:{self.config.accesslog_socket}")
        for name, spec in sorted(self.state.endpoints.items()):
            policy = self.engine.endpoint_policy(name)
            if policy.map_state.egress.enforced:
                notes[f"{name}: egress policy is not enforced: sidecar mode only sees traffic sent to the "
                      "endpoint's ports (egress needs BPF redirection)"] = None
            ports = [PortMapping(p.port, p.port, p.app_port) for p in spec.ports if p.protocol is Protocol.TCP]
            if not ports or not spec.ips:
                continue
            ingress = policy.map_state.ingress
            key = (tuple(ports), spec.ips[0])
            done = self._translated.get(name)
            if done is not None and done.ingress is ingress and done.prefixes is prefixes and done.key == key:
                res = done.resources  # unchanged map state, peers and ports: the same resources
            else:
                res = translate_ingress(name, ingress, ports, spec.ips[0], spec.ips[0], prefixes, access_log)
            translated[name] = _Translated(ingress, prefixes, key, res)
            listeners.update((li.name, li) for li in res.listeners)
            clusters.update((c.name, c) for c in res.clusters)
            notes.update(dict.fromkeys(res.notes))
        self._translated = translated
        return listeners, clusters, tuple(notes)

    def proxies(self) -> list[str]:
        """Node ids of the proxies a revision must reach: the managed Envoy and every node that
        ever asked for listeners."""
        nodes = {node for (node, type_url) in self.tracker.states() if type_url == LISTENER}
        if self.config.envoy == "managed":
            nodes.add(self.config.node_id)
        return sorted(nodes)

    def wait(self, revision: int, timeout: float) -> dict[str, Any]:
        """Block until every proxy acked the listeners of ``revision`` (or a later one).

        Raises AgentError 409 with Envoy's NACK text if a proxy rejected them, 504 on timeout."""
        with self._lock:
            current = self.state.revision
            version = self._realized.version_for(revision)
        if revision > current or version is None:
            raise AgentError(f"revision {revision} does not exist yet (current: {current})", 404)
        deadline = time.monotonic() + timeout
        done = []
        for node in self.proxies():
            try:
                self.tracker.wait(node, LISTENER, version, max(0.0, deadline - time.monotonic()))
            except NackError as e:
                raise AgentError(f"proxy {node} rejected revision {revision}: {e.message}", 409) from None
            except TimeoutError:
                raise AgentError(f"proxy {node} has not realized revision {revision} after {timeout:g}s", 504) \
                    from None
            done.append(node)
        return {"revision": revision, "proxies": done}

    # ------------------------------------------------------------------ status and flows

    def status(self) -> dict[str, Any]:
        with self._lock:
            revision = self.state.revision
            counts = {"policies": len(self.engine.policies()), "endpoints": len(self.state.endpoints),
                      "identities": len(self.engine.identities())}
            notes = list(self.notes)
        proxies = []
        for (node, type_url), st in sorted(self.tracker.states().items()):
            proxies.append({"node": node, "type": type_url.rsplit(".", 1)[-1], "sent": st.sent, "acked": st.acked,
                            "nacked": st.nacked, "nack": st.nack_message if _nack_stands(st) else ""})
        envoy: dict[str, Any] = {"mode": self.config.envoy}
        if self.envoy is not None:
            es = self.envoy.status()
            envoy.update(state=es.state.value, pid=es.pid, restarts=es.restarts, last_exit_code=es.last_exit_code,
                         last_error=es.last_error, admin=self.admin_address)
        healthy = all(not p["nack"] for p in proxies) and (self.envoy is None or self.envoy.status().running)
        return {"healthy": healthy, "revision": revision, **counts, "envoy": envoy,
                "xds": {"addresses": [f"unix:{self.config.xds_socket}", *self.config.xds_addresses],
                        "proxies": proxies},
                "uptime_s": round(time.time() - self.started, 1), "notes": notes,
                "state_dir": str(self.config.state_dir)}

    def flows(self, since: int | None = None, limit: int | None = None) -> dict[str, Any]:
        records = self.receiver.records(since, limit)
        return {"last": self.receiver.last_seq(), "flows": [self._flow_json(r) for r in records]}

    def _flow_json(self, r: AccessRecord) -> dict[str, Any]:
        out: dict[str, Any] = {"seq": r.seq, "time": r.time.isoformat(), "kind": r.kind, "verdict": r.verdict.value}
        with self._lock:
            for side, addr, port in (("source", r.source_address, r.source_port),
                                     ("destination", r.destination_address, r.destination_port)):
                out[side] = {"address": addr, "port": port, **self._identity_of(addr)}
        out.update(method=r.method, path=r.path, host=r.authority, protocol=r.protocol, status=r.status,
                   rule=r.rule, details=r.response_code_details, node=r.node_id, listener=r.log_name)
        return out

    def _identity_of(self, address: str) -> dict[str, Any]:
        try:
            _, ident_id = self.engine.ipcache.lookup(address)
        except (KeyError, ValueError):
            return {"identity": None, "labels": []}
        ident = self.engine.allocator.get(ident_id)
        names = [s.name for s in self.state.endpoints.values() if address in s.ips]
        return {"identity": ident_id, "labels": ident.labels.to_list() if ident else [],
                **({"endpoint": names[0]} if names else {})}


def _nack_stands(st: AckState) -> bool:
    """True while the proxy has acked nothing newer than the version it rejected."""
    if not st.nacked:
        return False
    nacked, acked = version_key(st.nacked), version_key(st.acked)
    return acked is None or nacked is None or acked[0] != nacked[0] or acked[1] < nacked[1]


def _endpoint(spec: EndpointSpec) -> Endpoint:
    named = tuple((p.name, p.port, p.protocol) for p in spec.ports if p.name)
    return Endpoint(spec.name, LabelSet.parse(list(spec.labels)),
                    tuple(ipaddress.ip_address(ip) for ip in spec.ips), named)


def _policy_json(p: Policy) -> dict[str, Any]:
    return {"kind": p.kind.value, "namespace": p.namespace, "name": p.name, "rules": len(p.rules),
            "file": p.source.file, "line": p.source.line}


__all__ = ["Agent", "AgentConfig", "AgentError", "EnvoyMode", "PolicyKey"]

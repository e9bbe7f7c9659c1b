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
import json
import logging
import os
import re
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ..envoy.accesslog import AccessLogReceiver, AccessLogServer, AccessRecord
from ..envoy.admin import AdminClient, AdminError
from ..envoy.bootstrap import build_bootstrap, to_json
from ..envoy.loopback import free_port
from ..envoy.supervisor import EnvoySupervisor
from ..bpf.datapath import DROP_REASONS, DatapathEvent
from ..bpf.paths import DEFAULT_PIN_DIR
from ..bpf.netns import Namespace, NetnsError, add_host_address, ip
from ..bpf.node import EndpointPlan, NodeDatapath, proxy_key
from ..envoy.translate import (
    AccessLogTarget,
    GrpcTarget,
    NodeEndpoint,
    PortMapping,
    ProxyPort,
    ProxyResources,
    prefixes_by_identity,
    translate_ingress,
    translate_node,
)
from ..policy import (
    Direction,
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
from ..l7parsers.base import Check, Record
from ..envoy.l7service import ConnectionInfo, L7Server
from ..envoy.l7views import PolicyViews, ViewSource, check_for
from ..envoy.l7workers import WorkerPool
from ..policy.mapstate import MapState, Verdict
from ..policy.model import IPNetwork
from ..policy.parse import check_unique
from ..ring import SeqRing
from ..xds import CLUSTER, LISTENER, AckState, AckTracker, Cache, NackError, TypeChange, XdsServer, version_key
from .diff import policy_diff
from .flows import Flow, FlowFile, FlowFilter, Who, from_access, from_datapath, from_l7
from .metrics import MeteredAckTracker, Metrics
from ..specs import EndpointSpec, PolicyKey, StateError
from .state import load_state, save_state

_log = logging.getLogger(__name__)

EnvoyMode = Literal["managed", "external", "none"]
DatapathMode = Literal["none", "bpf"]
ACCESS_LOG_CLUSTER = "cilia-accesslog"
L7_CLUSTER = "cilia-l7"
NODE_RECORD = "bpf-node.json"  # what the BPF datapath put on the node, for `cilia cleanup`
MAX_ENDPOINT_ID = 4095  # the program's array of policy maps holds 4096


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
    flow_file: Path | None = None  # also append every flow here as a JSON line (rotated by size)
    flow_file_max_bytes: int = 100 << 20
    flow_file_backups: int = 5
    datapath: DatapathMode = "none"  # bpf: enforce L3/L4 in the kernel, redirect L7 ports to Envoy
    bpf_pin_dir: str = DEFAULT_PIN_DIR
    router_ip: str | None = None  # the gateway of endpoints the agent creates (put on lo if missing)
    proxy_port_range: tuple[int, int] = (10000, 20000)  # Envoy's transparent listeners (Cilium's range)
    l7_workers: int = 0  # L7 parsers in this many worker processes (0: in the agent's own process)

    @property
    def api_socket(self) -> Path:
        return self.state_dir / "cilia.sock"

    @property
    def xds_socket(self) -> Path:
        return self.state_dir / "xds.sock"

    @property
    def accesslog_socket(self) -> Path:
        return self.state_dir / "accesslog.sock"

    @property
    def l7_socket(self) -> Path:
        return self.state_dir / "l7.sock"

    @property
    def l7_sockets(self) -> list[Path]:
        """Where Envoy reaches the L7 service: the agent's own socket, or each worker's."""
        if self.l7_workers:
            return [self.state_dir / f"l7-{i}.sock" for i in range(self.l7_workers)]
        return [self.l7_socket]


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
class Redirect:
    """A map-state entry sending a port to the proxy (``l7_protocol`` "" when it names none)."""

    direction: Direction
    protocol: Protocol
    port_lo: int
    port_hi: int
    l7_protocol: str


@dataclass(frozen=True)
class _Translated:
    """An endpoint's last translation and what it was made from (compared by identity: the engine
    hands out the same immutable map-state snapshot until the endpoint's policy changes)."""

    ingress: DirectionMapState
    prefixes: Mapping[int, tuple[IPNetwork, ...]]
    key: tuple[tuple[PortMapping, ...], str, bool]
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
        self.metrics = Metrics()
        self.tracker: AckTracker = MeteredAckTracker(self.metrics)
        self.errors: deque[dict[str, Any]] = deque(maxlen=50)  # the last errors, newest last, for status
        self.kubernetes: Any = None  # the Kubernetes watcher feeding this agent (cilia.k8s.Watcher), if any
        # What `observe` shows (Envoy's records and the kernel's verdicts, in arrival order) and
        # what `monitor` shows (the kernel's events). The receiver's own ring is not read.
        self.flow_log: SeqRing[Flow] = SeqRing(config.ring_size)
        self.flow_file = (FlowFile(config.flow_file, config.flow_file_max_bytes, config.flow_file_backups)
                          if config.flow_file is not None else None)
        self._flow_lock = threading.Lock()  # numbers a flow and writes it to the file as one step
        self._who = Who.empty()  # names flows' sides; replaced whole at each publish
        self.monitor_log: SeqRing[DatapathEvent] = SeqRing(config.ring_size)
        self.receiver = AccessLogReceiver(1, subscriber=self._on_access_record)
        self.node = NodeDatapath(config.bpf_pin_dir) if config.datapath == "bpf" else None
        self.metrics.envoy_up.set_function(lambda: 1.0 if self.envoy is not None and self.envoy.status().running
                                           else 0.0)
        self.datapath_error = ""
        self.notes: tuple[str, ...] = ()
        self._realized = _Realized()
        self._prefixes: Mapping[int, tuple[IPNetwork, ...]] = {}
        self._translated: dict[str, _Translated] = {}
        self._sidecar_names: set[str] = set()  # endpoints whose sidecar view is set
        self._node_translated: tuple[tuple[Any, ...], ProxyResources] | None = None
        # endpoint -> (map state, its REDIRECT entries): scanned once per map state, read by the
        # proxy-port allocation and the redirect gauge
        self._redirects: dict[str, tuple[MapState, tuple[Redirect, ...]]] = {}
        self._xds: XdsServer | None = None
        self._als: AccessLogServer | None = None
        self._l7: L7Server | None = None
        self._l7_pool: WorkerPool | None = None
        self._views = PolicyViews()  # what the L7 parsers read, replaced whole at each publish
        self._view_source = ViewSource()  # the in-process L7 service's reading of it
        # What the L7 parsers read, replaced whole at each publish: they run on Envoy's streams
        # and must not wait for the agent's lock (held while a change waits for Envoy's ACK).
        self._l7_views: Mapping[str, MapState] = {}
        self._audits: Mapping[str, tuple[bool, bool]] = {}  # endpoint -> audit (ingress, egress), per publish
        self._audit_keys: set[PolicyKey] = set()
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
        self._allocate_proxy_ports()
        self._publish()

    def start(self) -> None:
        """Serve xDS and access logs, then start Envoy (managed mode) against the loaded config."""
        try:
            if self.node is not None:
                self._start_datapath()
            for sock in (self.config.xds_socket, self.config.accesslog_socket, *self.config.l7_sockets):
                sock.unlink(missing_ok=True)
            self._xds = XdsServer(self.cache, self.tracker)
            self._xds.add_address(f"unix:{self.config.xds_socket}")
            for address in self.config.xds_addresses:
                self._xds.add_address(address)
            self._xds.start()
            self._als = AccessLogServer(self.receiver)
            self._als.add_address(f"unix:{self.config.accesslog_socket}")
            self._als.start()
            if self.config.l7_workers:
                self._l7_pool = WorkerPool([f"unix:{p}" for p in self.config.l7_sockets], self._on_worker_record)
                self._l7_pool.publish(self._views)
                self._l7_pool.start()
            else:
                self._view_source.views = self._views
                self._l7 = L7Server(self._view_source, self._on_l7_record)
                self._l7.add_address(f"unix:{self.config.l7_socket}")
                self._l7.start()
            if self.config.envoy == "managed":
                self._start_envoy()
        except BaseException:
            self.stop()
            raise

    def _start_datapath(self) -> None:
        """Load the BPF program (its pinned maps still hold the last run's policy) and write the
        replayed state into it, before Envoy or any client is served."""
        assert self.node is not None
        record_path = self.config.state_dir / NODE_RECORD
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        router = self.config.router_ip
        added = bool(router) and (add_host_address(router) if router else False)
        record = {"pin_dir": self.config.bpf_pin_dir, "netns": os.readlink("/proc/self/ns/net"),
                  "router_ip": router if added or (router and record.get("router_ip") == router) else None}
        record_path.write_text(json.dumps(record), encoding="utf-8")  # before loading: cleanup finds it
        self.node.subscribe(self._on_datapath_event)
        self.node.start()
        with self._lock:
            self._sync_datapath()

    def _start_envoy(self) -> None:
        self.admin_address = f"127.0.0.1:{free_port()}"
        bootstrap = self.config.state_dir / "envoy-bootstrap.json"
        bootstrap.write_text(to_json(build_bootstrap(self.config.node_id, f"unix:{self.config.xds_socket}",
                                                     self.admin_address)), encoding="utf-8")
        self.envoy = EnvoySupervisor(bootstrap, self.admin_address, log_path=self.config.state_dir / "envoy.log",
                                     extra_args=self.config.envoy_args)
        self.envoy.start()

    def stop(self) -> None:
        """Stop Envoy (managed mode), then the servers and the datapath's event reader; the BPF
        programs stay attached and keep enforcing. Safe to repeat."""
        try:
            if self.envoy is not None:
                self.envoy.stop()
        finally:
            for server in (self._xds, self._als, self._l7):
                if server is not None:
                    server.stop(0)
            self._xds = self._als = self._l7 = None
            if self._l7_pool is not None:
                self._l7_pool.stop()
                self._l7_pool = None
            if self.node is not None:
                self.node.stop()
            if self.flow_file is not None:
                self.flow_file.close()

    # ------------------------------------------------------------------ policies

    def import_policies(self, files: Sequence[tuple[str, str]], audit: bool = False) -> dict[str, Any]:
        """Add or replace the policies in ``files`` ((path, text) pairs): all of them or none.
        ``audit``: the endpoints these policies select audit instead of dropping (in the
        directions the policies have rules), until the policies are imported again without it."""
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
                    self.state.add_source(path, text, {p.key for p in ps}, audit)

            def undo() -> None:
                if keys - before.keys():
                    self.engine.delete(keys - before.keys())
                if before:
                    self.engine.apply(list(before.values()))
                self.state.sources = sources_before

            revision = self._commit_checked(undo)
        audited = self.state.audit_keys()
        return {"revision": revision, "policies": [_policy_json(p, audited) for p in policies]}

    def diff_policies(self, files: Sequence[tuple[str, str]], last: int | None = None) -> dict[str, Any]:
        """Which of the newest ``last`` recorded flows (all kept ones if None) the policies in
        ``files`` would decide differently; nothing is applied."""
        candidate: list[Policy] = []
        problems: list[Problem] = []
        for path, text in files:
            loaded = parse_text(text, path)
            problems += loaded.problems
            candidate += loaded.policies
        if problems:
            raise AgentError(f"{len(problems)} problem(s) in the candidate policy", 400, problems)
        if not candidate:
            raise AgentError("no CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy in the input")
        try:
            check_unique(candidate)
        except PolicyError as e:
            raise AgentError(str(e)) from None
        with self._lock:
            current = list(self.engine.policies())
        flows = self.flow_log.since(None, last)
        return policy_diff(current, candidate, flows)

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

    def delete_policy_keys(self, keys: Sequence[PolicyKey]) -> dict[str, Any]:
        """Delete exactly the policies with these (kind, namespace, name) keys (namespace "" for a
        CCNP); the Kubernetes watcher uses it, since names alone are not unique across kinds."""
        with self._lock:
            present = {p.key for p in self.engine.policies()}
            found = [k for k in (tuple(k) for k in keys) if k in present]
            if not found:
                raise AgentError(f"no such policy: {', '.join('/'.join(x for x in k if x) for k in keys)}", 404)
            self.engine.delete(found)
            self.state.drop_keys(set(found))
            revision = self._commit()
        return {"revision": revision, "deleted": [list(k) for k in sorted(found)]}

    def policies(self) -> dict[str, Any]:
        with self._lock:
            audited = self.state.audit_keys()
            return {"revision": self.state.revision,
                    "policies": [_policy_json(p, audited) for p in self.engine.policies()]}

    # ------------------------------------------------------------------ endpoints

    def add_endpoint(self, spec: EndpointSpec) -> dict[str, Any]:
        """Add or replace an endpoint; returns its identity and the new revision.

        With the BPF datapath, ``spec.create`` makes the endpoint's namespace and veth pair
        (kept when an endpoint is replaced, e.g. relabelled) and ``spec.interface`` alone adopts
        an existing host-side interface."""
        if self.node is None and (spec.create or spec.interface):
            raise AgentError(f"endpoint {spec.name}: create/interface need the BPF datapath "
                             "(cilia agent --datapath bpf)")
        if self.node is None and self.config.envoy != "none" and spec.ips:
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
            previous = self.state.endpoints.get(spec.name)
            created: Namespace | None = None
            if spec.create:
                spec, created = self._plumb(spec, previous)
            elif spec.interface is not None and ip("link", "show", "dev", spec.interface, check=False).returncode:
                raise AgentError(f"endpoint {spec.name}: interface {spec.interface}: no such interface on this node")
            try:
                self.engine.upsert_endpoint(endpoint)
            except L7ConflictError as e:
                if created is not None:
                    created.delete()
                raise AgentError(f"endpoint {spec.name}: {e}", 409) from None
            self.state.endpoints[spec.name] = spec
            had_id = spec.name in self.state.endpoint_ids
            if spec.interface is not None and not had_id:
                self.state.endpoint_ids[spec.name] = self._free_endpoint_id()

            def undo() -> None:
                if previous is None:
                    self.engine.remove_endpoint(spec.name)
                    del self.state.endpoints[spec.name]
                else:
                    self.engine.upsert_endpoint(_endpoint(previous))
                    self.state.endpoints[spec.name] = previous
                if not had_id:
                    self.state.endpoint_ids.pop(spec.name, None)
                if created is not None:
                    created.delete()

            revision = self._commit_checked(undo)
            return {"revision": revision, "endpoint": self._endpoint_json(spec)}

    def _plumb(self, spec: EndpointSpec, previous: EndpointSpec | None) -> tuple[EndpointSpec, Namespace | None]:
        """Make ``spec``'s namespace and veth pair (or keep the ones made for its previous version)."""
        if previous is not None and previous.managed:
            if previous.ips != spec.ips:
                raise AgentError(f"endpoint {spec.name}: its namespace was made for {', '.join(previous.ips)}; "
                                 "delete the endpoint to give it another address")
            return replace(spec, create=False, managed=True, netns=previous.netns,
                           interface=previous.interface), None
        if not self.config.router_ip:
            raise AgentError(f"endpoint {spec.name}: create: the agent has no --router-ip to route a new "
                             "namespace through")
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", spec.name)
        netns = spec.netns or f"cilia-{safe}"[:64]
        ifname = spec.interface or f"lxc{zlib.crc32(spec.name.encode()):08x}"
        ns = Namespace(netns, spec.ips[0], ifname)
        try:
            ns.create(self.config.router_ip)
        except (NetnsError, ValueError) as e:
            ns.delete()
            raise AgentError(f"endpoint {spec.name}: cannot create its namespace: {e}") from None
        return replace(spec, create=False, managed=True, netns=netns, interface=ifname), ns

    def _free_endpoint_id(self) -> int:
        used = set(self.state.endpoint_ids.values())
        for n in range(1, MAX_ENDPOINT_ID + 1):
            if n not in used:
                return n
        raise AgentError(f"no free endpoint id: {MAX_ENDPOINT_ID} endpoints have the datapath", 409)

    def remove_endpoint(self, name: str) -> dict[str, Any]:
        with self._lock:
            if name not in self.state.endpoints:
                raise AgentError(f"no endpoint named {name}", 404)
            self.engine.remove_endpoint(name)
            spec = self.state.endpoints.pop(name)
            self.state.endpoint_ids.pop(name, None)
            revision = self._commit()  # detaches it and clears its maps first
            if spec.managed and spec.netns and spec.interface:
                ns = Namespace(spec.netns, spec.ips[0], spec.interface)
                ns.created = True
                ns.delete()
            return {"revision": revision}

    def endpoints(self) -> dict[str, Any]:
        with self._lock:
            return {"endpoints": [self._endpoint_json(s) for _, s in sorted(self.state.endpoints.items())]}

    def _endpoint_json(self, spec: EndpointSpec) -> dict[str, Any]:
        ident = self.engine.identity_of(spec.name)
        ms = self.engine.endpoint_policy(spec.name).map_state
        ingress, egress = self.audit_of(spec.name)
        return {**spec.to_json(), "identity": ident.id, "identity_labels": ident.labels.to_list(),
                "enforcement": {"ingress": ms.ingress.enforced, "egress": ms.egress.enforced},
                "audit_mode": {"ingress": ingress, "egress": egress}}

    def identities(self) -> dict[str, Any]:
        with self._lock:
            return {"identities": [{"id": i.id, "kind": i.kind.value, "labels": i.labels.to_list(),
                                    "prefix": str(i.prefix) if i.prefix is not None else None}
                                   for i in sorted(self.engine.identities(), key=lambda i: i.id)]}

    # ------------------------------------------------------------------ revisions

    def _commit(self) -> int:
        """Persist, bump the revision and publish; called with the lock held after the engine changed."""
        self.state.revision += 1
        self._allocate_proxy_ports()
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
            self._error("envoy", f"NACK of revision {revision}: {e.message}")
            undo()
            restored = self._commit()
            raise AgentError(f"Envoy rejected revision {revision}: {e.message}; the change was reverted "
                             f"(revision {restored} restores the previous config)", 409) from None
        return revision

    def _publish(self) -> None:
        self._audit_keys = self.state.audit_keys()
        self._audits = {name: self.audit_of(name) for name in self.state.endpoints}
        self._l7_views = {name: self.engine.endpoint_policy(name).map_state for name in self.state.endpoints}
        self._views = PolicyViews(self.state.revision, self._l7_views, dict(self._audits))
        self._view_source.views = self._views
        if self._l7_pool is not None:
            self._l7_pool.publish(self._views)
        listeners, clusters, notes = self._translate()
        # One atomic update; the streams still send clusters before the listeners that name them.
        # A sidecar Envoy whose node id is an endpoint's name sees only that endpoint's listeners
        # (and their clusters): it runs in the endpoint's namespace and can bind no other address.
        # Set before the update, so a sidecar never sees another endpoint's listeners.
        if self.node is None:
            for name in (self.state.endpoints.keys() | self._sidecar_names) - {self.config.node_id}:
                done = self._translated.get(name)
                res_l = [li.name for li in done.resources.listeners] if done else []
                res_c = [c.name for c in done.resources.clusters] if done else []
                self.cache.set_node_view(name, LISTENER, res_l)
                self.cache.set_node_view(name, CLUSTER, res_c)
            self._sidecar_names = set(self.state.endpoints)
        update = self.cache.update_many({CLUSTER: TypeChange(clusters, replace=True),
                                         LISTENER: TypeChange(listeners, replace=True)})
        self._realized.record(self.state.revision, update.versions[LISTENER])
        self.notes = notes
        self._update_gauges()
        self._who = Who({n: (tuple(s.ips), self.engine.identity_of(n).id) for n, s in self.state.endpoints.items()},
                        {i.id: i.labels for i in self.engine.identities()}, self.engine.ipcache.items(),
                        {v: k for k, v in self.state.endpoint_ids.items()})
        self._sync_datapath()

    def _update_gauges(self) -> None:
        m = self.metrics
        m.policies.set(len(self.engine.policies()))
        m.max_revision.set(self.state.revision)
        m.endpoints.set(len(self.state.endpoints))
        m.identities.set(len(self.engine.identities()))
        redirects: dict[str, set[tuple[str, str, int]]] = {}
        for name, ms in self._l7_views.items():
            for r in self._redirects_of(name, ms):
                if r.l7_protocol:
                    redirects.setdefault(r.l7_protocol, set()).add((name, r.direction.value, r.port_lo))
        # every publish passes here with the whole endpoint set: forget the deleted ones
        self._redirects = {n: done for n, done in self._redirects.items() if n in self._l7_views}
        m.set_redirects({proto: len(ports) for proto, ports in redirects.items()})

    def _error(self, component: str, message: str) -> None:
        """Remember an error for ``cilia status`` (the last 50)."""
        self.errors.append({"time": datetime.now(UTC).isoformat(), "component": component, "message": message})

    # ------------------------------------------------------------------ audit mode

    def audit_of(self, name: str) -> tuple[bool, bool]:
        """(ingress, egress): whether the endpoint audits instead of dropping in each direction:
        it was added in audit mode, or a policy imported in audit mode has rules for it there."""
        spec = self.state.endpoints.get(name)
        if spec is not None and spec.audit:
            return True, True
        keys = self._audit_keys
        if not keys:
            return False, False
        sp = self.engine.endpoint_policy(name).selector_policy
        return (any(r.policy.key in keys for r in sp.ingress.selecting),
                any(r.policy.key in keys for r in sp.egress.selecting))

    # ------------------------------------------------------------------ BPF datapath

    def _allocate_proxy_ports(self) -> None:
        """A proxy port for every (direction, TCP port) some endpoint redirects to L7; ports no
        longer needed are released. Only with the BPF datapath."""
        if self.node is None:
            return
        needed = {proxy_key(r.direction, r.port_lo) for name in self.state.endpoints
                  for r in self._redirects_of(name, self.engine.endpoint_policy(name).map_state)
                  if r.protocol is Protocol.TCP and r.port_lo == r.port_hi}
        ports = {k: v for k, v in self.state.proxy_ports.items() if k in needed}
        lo, hi = self.config.proxy_port_range
        free = (p for p in range(lo, hi + 1) if p not in set(ports.values()))
        for key in sorted(needed - ports.keys()):
            port = next(free, None)
            if port is None:
                _log.error("no free proxy port in %d-%d for %s: its traffic is dropped", lo, hi, key)
                continue
            ports[key] = port
        self.state.proxy_ports = ports

    def _redirects_of(self, name: str, ms: MapState) -> tuple[Redirect, ...]:
        """The endpoint's REDIRECT entries, scanned again only when its map state changed."""
        done = self._redirects.get(name)
        if done is None or done[0] is not ms:
            done = (ms, tuple(Redirect(d.direction, l4.protocol, l4.port_lo, l4.port_hi,
                                       e.l7.protocol if e.l7 is not None else "")
                              for d in (ms.ingress, ms.egress) for _, l4, e in d.entries()
                              if e.verdict is Verdict.REDIRECT))
            self._redirects[name] = done
        return done[1]

    def _sync_datapath(self) -> None:
        """Write the engine's ipcache and every endpoint's map state into the kernel (only
        what changed). An error is kept for status; the kernel keeps what it had."""
        if self.node is None or not self.node.started:
            return
        plans = []
        for name, spec in sorted(self.state.endpoints.items()):
            ep_id = self.state.endpoint_ids.get(name)
            v4 = [a for a in spec.ips if ipaddress.ip_address(a).version == 4]
            if spec.interface is None or ep_id is None or not v4:
                continue
            plans.append(EndpointPlan(name, ep_id, v4[0], spec.interface, self.engine.identity_of(name).id,
                                      self.engine.endpoint_policy(name).map_state,
                                      *self._audits.get(name, (False, False))))
        try:
            self.node.sync(self.engine.ipcache.items(), plans, self.state.proxy_ports, self._identity_number)
            self.datapath_error = ""
        except Exception as e:  # kernel or netlink refused: say so in status, keep serving
            _log.exception("BPF datapath update failed")
            self.datapath_error = f"{type(e).__name__}: {e}"
            self._error("datapath", self.datapath_error)

    def _identity_number(self, address: str) -> int:
        try:
            return self.engine.ipcache.lookup(address)[1]
        except (KeyError, ValueError):
            return 2  # reserved:world

    def _record(self, flow: Flow) -> None:
        with self._flow_lock:
            seq = self.flow_log.append(flow)
            if self.flow_file is not None:
                try:
                    self.flow_file.write(seq, flow)
                except OSError:
                    _log.exception("cannot write the flow file")

    def _on_access_record(self, record: AccessRecord) -> None:
        self._record(from_access(record, self._who))
        if record.kind == "http":
            self.metrics.l7("http", not record.denied)

    def _on_datapath_event(self, event: DatapathEvent) -> None:
        self.monitor_log.append(event)
        if event.type == "drop":
            self.metrics.drops.labels(event.reason_text or str(event.reason), event.direction).inc()
        elif event.type == "policy-verdict":
            self.metrics.forwards.labels(event.direction).inc()
        if event.type != "trace":  # flows are verdicts; packet traces would only crowd them out
            self._record(from_datapath(event, self._who, self.config.node_id))

    # ------------------------------------------------------------------ L7 parsers (ext_proc)

    def _l7_target(self) -> GrpcTarget:
        first, *more = (f"unix:{p}" for p in self.config.l7_sockets)
        return GrpcTarget(L7_CLUSTER, first, more=tuple(more))

    def l7_check(self, info: ConnectionInfo) -> Check:
        """The local endpoint's current policy for a parsed connection's peer (no agent lock)."""
        return check_for(self._views, info)

    def _on_worker_record(self, when: float, info: ConnectionInfo, record: Record) -> None:
        self._on_l7_record(info, record, when)

    def _on_l7_record(self, info: ConnectionInfo, record: Record, when: float | None = None) -> None:
        self._record(from_l7(when or time.time(), info, record, self._who, self.config.node_id))
        self.metrics.l7(info.protocol, None if "error" in record.summary else record.decision.allowed)
        if "error" in record.summary:
            self._error(f"l7/{info.protocol}", f"{info.listener}: {record.summary['error']}")

    def bpf_policy(self, name: str) -> dict[str, Any]:
        """An endpoint's policy map as the kernel holds it, with counters (``cilia bpf policy get``)."""
        with self._lock:
            spec = self.state.endpoints.get(name)
            if spec is None:
                raise AgentError(f"no endpoint named {name}", 404)
            if self.node is None or not self.node.started:
                raise AgentError("the BPF datapath is not running (cilia agent --datapath bpf)", 409)
            ep_id = self.state.endpoint_ids.get(name)
            if ep_id is None or name not in self.node.attached():
                raise AgentError(f"endpoint {name} has no interface with the datapath: nothing in the kernel", 404)
            rows = self.node.policy_rows(ep_id)
            for row in rows:
                row["labels"] = self._labels_of(int(row["identity"]))  # type: ignore[call-overload]
            return {"endpoint": name, "id": ep_id, "interface": spec.interface, "entries": rows}

    def monitor(self, since: int | None, limit: int | None, wait: float, trace: bool = False) -> dict[str, Any]:
        """Datapath events after ``since`` (waiting up to ``wait`` seconds for one). ``trace``:
        the caller wants trace events, so the datapath emits them for the next 30 seconds."""
        if trace and self.node is not None and self.node.started:
            self.node.datapath.trace_for(30.0)
        items = self.monitor_log.since(since, limit, wait)
        who = self._who  # names both sides, as the flows do
        events = [{"seq": n, **self._event_json(ev, who)} for n, ev in items]
        return {"last": self.monitor_log.last_seq(), "events": events}

    def _event_json(self, ev: DatapathEvent, who: Who) -> dict[str, Any]:
        return {**ev.to_json(), "time": datetime.fromtimestamp(ev.time, UTC).isoformat(),
                "endpoint": who.endpoint_ids.get(ev.endpoint_id, ""),
                "source": who.peer(ev.source, ev.source_port, ev.source_identity).to_json(),
                "destination": who.peer(ev.destination, ev.destination_port, ev.destination_identity).to_json()}

    def _labels_of(self, identity: int) -> list[str]:
        ident = self.engine.allocator.get(identity) if identity else None
        return ident.labels.to_list() if ident else []

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
        if self.node is not None:
            return self._translate_node(prefixes)
        translated: dict[str, _Translated] = {}
        access_log = AccessLogTarget(ACCESS_LOG_CLUSTER, f"unix:{self.config.accesslog_socket}")
        l7_service = self._l7_target()
        for name, spec in sorted(self.state.endpoints.items()):
            policy = self.engine.endpoint_policy(name)
            if policy.map_state.egress.enforced:
                notes[f"{name}: egress policy is not enforced: sidecar mode only sees traffic sent to the "
                      "endpoint's ports (egress needs BPF redirection)"] = None
            ports = [PortMapping(p.port, p.port, p.app_port) for p in spec.ports if p.protocol is Protocol.TCP]
            if not ports or not spec.ips:
                continue
            ingress = policy.map_state.ingress
            key = (tuple(ports), spec.ips[0], self._audits.get(name, (False, False))[0])
            done = self._translated.get(name)
            if done is not None and done.ingress is ingress and done.prefixes is prefixes and done.key == key:
                res = done.resources  # unchanged map state, peers and ports: the same resources
            else:
                res = translate_ingress(name, ingress, ports, spec.ips[0], spec.ips[0], prefixes, access_log,
                                        l7_service, audit=self._audits.get(name, (False, False))[0])
            translated[name] = _Translated(ingress, prefixes, key, res)
            listeners.update((li.name, li) for li in res.listeners)
            clusters.update((c.name, c) for c in res.clusters)
            notes.update(dict.fromkeys(res.notes))
        self._translated = translated
        return listeners, clusters, tuple(notes)

    def _translate_node(self, prefixes: Mapping[int, tuple[IPNetwork, ...]]
                        ) -> tuple[dict[str, Any], dict[str, Any], tuple[str, ...]]:
        """Node mode (BPF datapath): one transparent listener per proxy port on 127.0.0.1, where
        the kernel hands redirected connections over, serving every endpoint."""
        endpoints: list[NodeEndpoint] = []
        notes: dict[str, None] = {}
        for name, spec in sorted(self.state.endpoints.items()):
            ms = self.engine.endpoint_policy(name).map_state
            if spec.ips:
                audit = self._audits.get(name, (False, False))
                endpoints.append(NodeEndpoint(name, tuple(ipaddress.ip_network(a) for a in spec.ips),
                                              ms.ingress, ms.egress, self.engine.identity_of(name).id, *audit))
            if spec.interface is None:
                notes[f"{name}: no interface: its policy is not enforced in the kernel "
                      "(add it with --create-netns or --interface)"] = None
        ports = {d: sorted((ProxyPort(int(k.split("/")[1]), v) for k, v in self.state.proxy_ports.items()
                            if k.startswith(f"{d.value}/")), key=lambda p: (p.policy_port, p.proxy_port))
                 for d in (Direction.INGRESS, Direction.EGRESS)}
        key = (prefixes, tuple(ports[Direction.INGRESS]), tuple(ports[Direction.EGRESS]),
               *((e.name, e.addresses, e.ingress, e.egress, e.identity, e.audit_ingress, e.audit_egress)
                 for e in endpoints))
        done = self._node_translated
        if done is not None and _same_objects(done[0], key):
            res = done[1]
        else:
            access_log = AccessLogTarget(ACCESS_LOG_CLUSTER, f"unix:{self.config.accesslog_socket}")
            res = translate_node(self.config.node_id, endpoints, "127.0.0.1", prefixes,
                                 ingress=ports[Direction.INGRESS], egress=ports[Direction.EGRESS],
                                 access_log=access_log, l7_service=self._l7_target())
            self._node_translated = (key, res)
        notes.update(dict.fromkeys(res.notes))
        return ({li.name: li for li in res.listeners}, {c.name: c for c in res.clusters}, tuple(notes))

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
        datapath: dict[str, Any] = {"mode": self.config.datapath}
        if self.node is not None:
            with self._lock:
                datapath.update(loaded=self.node.started, pin_dir=self.node.pin_dir, attached=self.node.attached(),
                                proxy_ports=dict(self.state.proxy_ports), error=self.datapath_error,
                                drops={DROP_REASONS.get(r, str(r)): n for r, n in self.node.drop_counts().items()}
                                if self.node.started else {})
        if self.envoy is not None and self.admin_address and envoy.get("state") == "running":
            envoy.update(self._envoy_admin())
        controllers = self._controllers(envoy, datapath)
        k8s = self.kubernetes.status() if self.kubernetes is not None else None
        if k8s is not None:
            controllers.append({"name": "kubernetes-watch", "status": "ok" if k8s["connected"] else "failing",
                                "last_error": "" if k8s["connected"] else "; ".join(
                                    f"{n}: {r['last_error'] or 'not connected'}" for n, r in k8s["resources"].items()
                                    if not r["connected"])})
        reasons = [f"proxy {p['node']} rejected {p['type']} {p['nacked']}: {p['nack']}" for p in proxies if p["nack"]]
        reasons += [f"{c['name']}: {c['last_error'] or c['status']}" for c in controllers if c["status"] != "ok"]
        return {"healthy": not reasons, "reasons": reasons, "revision": revision, **counts, "envoy": envoy,
                "datapath": datapath,
                "xds": {"addresses": [f"unix:{self.config.xds_socket}", *self.config.xds_addresses],
                        "proxies": proxies},
                "controllers": controllers, "errors": list(self.errors),
                **({"kubernetes": k8s} if k8s is not None else {}),
                "uptime_s": round(time.time() - self.started, 1), "notes": notes,
                "state_dir": str(self.config.state_dir)}

    def debug_info(self, flows: int = 1000) -> dict[str, Any]:
        """Everything ``cilia bugtool`` packs: status, config, policies with their source text,
        endpoints, identities, recent flows and datapath events, the policy maps in the kernel,
        Envoy's config dump and the tail of its log."""
        out: dict[str, Any] = {"status": self.status(), "policies": self.policies(), "endpoints": self.endpoints(),
                               "identities": self.identities(), "flows": self.flows(limit=flows),
                               "monitor": self.monitor(None, flows, 0.0)}
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(self.config).items()}
        out["config"] = cfg
        with self._lock:
            out["sources"] = [{"path": src.path, "text": src.text, "audit": src.audit,
                               "policies": sorted("/".join(k) for k in src.keys)} for src in self.state.sources]
        bpf: dict[str, Any] = {}
        if self.node is not None and self.node.started:
            for name in sorted(self.node.attached()):
                try:
                    bpf[name] = self.bpf_policy(name)
                except AgentError as e:
                    bpf[name] = {"error": str(e)}
        out["bpf_policy"] = bpf
        if self.envoy is not None and self.admin_address:
            try:
                out["envoy_config_dump"] = AdminClient(self.admin_address, timeout=3.0).config_dump()
            except AdminError as e:
                out["envoy_config_dump"] = {"error": str(e)}
        log = self.config.state_dir / "envoy.log"
        try:
            with open(log, "rb") as f:
                f.seek(max(0, log.stat().st_size - (1 << 20)))
                out["envoy_log"] = f.read().decode("utf-8", "replace")  # the last MiB
        except OSError:
            out["envoy_log"] = ""
        return out

    def _envoy_admin(self) -> dict[str, Any]:
        """Envoy's own view, from its admin endpoint: ready or not, version, uptime."""
        assert self.admin_address is not None
        try:
            client = AdminClient(self.admin_address, timeout=1.0)
            info = client.server_info()
            return {"ready": client.ready(), "version": info.version, "server_state": info.state,
                    "uptime_s": info.uptime_seconds}
        except AdminError as e:
            return {"ready": False, "admin_error": str(e)}

    def _controllers(self, envoy: Mapping[str, Any], datapath: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The agent's moving parts, like Cilium's controllers: each ok or failing, with why."""
        def ctl(name: str, ok: bool, error: str = "", **extra: Any) -> dict[str, Any]:
            return {"name": name, "status": "ok" if ok else "failing", "last_error": "" if ok else error, **extra}

        out = [ctl("xds-server", self._xds is not None, "not serving"),
               ctl("accesslog-server", self._als is not None, "not serving"),
               ctl("l7-server", self._l7 is not None or self._l7_pool is not None, "not serving")]
        if self._l7_pool is not None:
            alive = self._l7_pool.alive()
            out.append(ctl("l7-workers", alive == len(self._l7_pool.addresses),
                           f"{alive}/{len(self._l7_pool.addresses)} workers alive", restarts=self._l7_pool.restarts))
        if self.envoy is not None:
            running = envoy.get("state") == "running" and envoy.get("ready", True) is not False
            out.append(ctl("envoy-supervisor", running, str(envoy.get("last_error") or envoy.get("admin_error")
                                                            or f"Envoy is {envoy.get('state')}"),
                           restarts=envoy.get("restarts", 0)))
        if self.node is not None:
            out.append(ctl("bpf-datapath", bool(datapath.get("loaded")) and not self.datapath_error,
                           self.datapath_error or "not loaded"))
        return out

    def flows(self, since: int | None = None, limit: int | None = None,
              flow_filter: FlowFilter | None = None) -> dict[str, Any]:
        """Flows numbered above ``since`` that pass ``flow_filter``, oldest first; with ``limit``
        the newest that many of them."""
        items = self.flow_log.since(since)
        if flow_filter is not None:
            items = [(n, f) for n, f in items if flow_filter.matches(f)]
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return {"last": self.flow_log.last_seq(), "flows": [f.to_json(n) for n, f in items]}


def _same_objects(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Equal tuples, with map states and mappings compared by identity: the engine hands out the
    same immutable snapshot until something changes, and comparing their contents would cost
    as much as translating them."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if isinstance(x, tuple) and isinstance(y, tuple):
            if not _same_objects(x, y):
                return False
        elif x is not y and (isinstance(x, DirectionMapState | Mapping) or x != y):
            return False
    return True


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


def _policy_json(p: Policy, audited: set[PolicyKey] | frozenset[PolicyKey] = frozenset()) -> dict[str, Any]:
    return {"kind": p.kind.value, "namespace": p.namespace, "name": p.name, "rules": len(p.rules),
            "file": p.source.file, "line": p.source.line, "audit": p.key in audited}


__all__ = ["Agent", "AgentConfig", "AgentError", "EnvoyMode", "PolicyKey"]

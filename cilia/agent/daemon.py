"""The agent: lifecycle and mutations; the engine decides, the realizer's sinks configure.

A mutation (policy import/delete, endpoint add/delete) holds the agent's lock only while it is
applied: check the input completely, change the engine (all or nothing), take the next revision,
persist the state, and hand the new ``Desired`` (rebuilt only for the endpoints the engine's
``Change`` names) to the realizer, whose sinks publish to the xDS cache, the BPF maps and the L7
parsers' views. The wait for the managed Envoy's ACK happens after the lock is released, so a slow
proxy never stalls another API call. If Envoy rejects the revision and nothing was committed after
it, the change is reverted (a new revision restores the previous config), like Cilium's revert.

On start the persisted state is replayed into a fresh engine and realized before the xDS server or
Envoy start, so a restarted agent serves the same config to the first request and Envoy never
listens without its policy.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from ..bpf.paths import DEFAULT_PIN_DIR
from ..bpf.netns import Namespace, add_host_address
from ..bpf.crossnode import CrossNode, TunnelMode
from ..bpf.node import DNS_PROXY_KEY, HOST_IDENTITY, NodeDatapath
from ..dnsproxy.server import DNSProxy  # issue 17: the DNS proxy
from ..dnsproxy.sink import DNSProxySink
from ..envoy.accesslog import AccessLogReceiver, AccessLogServer
from ..envoy.bootstrap import build_bootstrap, write_bootstrap
from ..envoy.l7service import ConnectionInfo, L7Server
from ..envoy.l7views import check_for
from ..envoy.l7workers import WorkerPool
from ..envoy.inproc.channel import InprocL7, L7Mode
from ..envoy.supervisor import EnvoySupervisor
from ..envoy.translate import AccessLogTarget, GrpcTarget
from ..l7parsers.base import Check
from ..policy import (
    Endpoint,
    FileAllocator,
    L7ConflictError,
    LabelSet,
    Policy,
    PolicyEngine,
    PolicyError,
    Problem,
    Protocol,
    compile_policy,
    parse_text,
)
from ..policy.identity import IdentityAllocator, IdentityUnavailable
from ..policy.labels import endpoint_labels
from ..policy.parse import check_unique
from ..policy.toservices import ServiceView
from ..realizer import Desired, EndpointState, PortMap, Realizer
from ..realizer.desired import WaitingEndpoint
from ..realizer.datapath import DatapathSink
from ..realizer.services import ServiceSink
from ..realizer.l7views import L7ViewSink
from ..realizer.proxy import ProxyMode, ProxySink
from ..realizer.proxyports import RedirectIndex, allocate
from ..specs import EndpointSpec, PolicyKey, StateError
from ..xds import LISTENER, AckTracker, Cache, NackError, ServerTls, XdsServer
from ..xds.sockets import private_dir
from . import status as status_view
from .cluster import ClusterNode, KVStoreConfig  # kvstore (issue 13)
from .diff import policy_diff
from ..fqdn.config import FqdnConfig
from .fqdn import FqdnLearner
from .flows import FlowFile, FlowFilter, UnknownPod
from .metrics import MeteredAckTracker, Metrics
from .observe import FlowNames, Observer
from .results import (
    EndpointAdded,
    EndpointInfo,
    Endpoints,
    Identities,
    IdentityInfo,
    Policies,
    PoliciesDeleted,
    PolicyInfo,
    Realized,
    Revision,
    Services,
    ServiceUpdated,
)
from ..services.model import Service
from ..services.validate import MAX_SERVICE_ID, ServiceError, check_services
from .pending import READY, WAITING_FOR_IDENTITY, PendingIdentities
from .sidecar_guard import SidecarGuard
from .plumbing import PlumbingError, free_endpoint_id, plumb, unplumb
from .state import PolicySource, StateWriter

_log = logging.getLogger(__name__)

EnvoyMode = Literal["managed", "external", "none"]
DatapathMode = Literal["none", "bpf"]
AllowLocalhost = Literal["auto", "always", "policy"]  # Cilium's --allow-localhost
ACCESS_LOG_CLUSTER = "cilia-accesslog"
L7_CLUSTER = "cilia-l7"
WORKERS_READY_SECONDS = 30.0  # how long start waits for the L7 workers to serve before going on degraded
NODE_RECORD = "bpf-node.json"  # what the BPF datapath put on the node, for `cilia cleanup`


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
    nodeport_devices: tuple[str, ...] = ()  # node-facing devices where outside traffic reaches NodePorts
    proxy_port_range: tuple[int, int] = (10000, 20000)  # Envoy's transparent listeners (Cilium's range)
    l7_workers: int = 0  # L7 parsers in this many worker processes (0: in the agent's own process)
    l7_mode: L7Mode = "auto"  # L7 parsers inside Envoy (inproc) or on ext_proc; auto: inproc if its module is built
    xds_tls: ServerTls | None = None  # mutual TLS for the TCP xds_addresses (client certificate CN = node id)
    xds_insecure: bool = False  # serve TCP xds_addresses in plaintext: chosen explicitly, never by default
    socket_group: int | None = None  # the agent's sockets are 0660 with this gid, else 0600
    proxy_grace: float = 30.0  # a proxy with no xDS stream this long is gone: no more waits or health for it
    kvstore: KVStoreConfig | None = None  # kvstore (issue 13): identities, endpoints and nodes shared cluster-wide
    fqdn: FqdnConfig = field(default_factory=FqdnConfig)  # toFQDNs (issue 17): the DNS cache's TTLs and collection
    dns_proxy_port: int = 0  # --datapath bpf: the DNS proxy's UDP+TCP port on 127.0.0.1 (0: any free one)
    dns_upstream_timeout: float = 2.0  # an allowed query the server does not answer this long: SERVFAIL
    allocator: IdentityAllocator | None = None  # identities from elsewhere (CRD mode: cilia.k8s.crdmode)
    tunnel: TunnelMode = "disabled"  # cross-node: direct routing, or the sender's identity in a VXLAN VNI
    allow_localhost: AllowLocalhost = "auto"  # always: the node reaches every endpoint; auto: always under Kubernetes

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

    @property
    def proxy_mode(self) -> ProxyMode:
        if self.envoy == "none":
            return "none"
        return "node" if self.datapath == "bpf" else "sidecar"


@dataclass
class Servers:
    """The gRPC services the agent runs for Envoy (None when not serving)."""

    xds: XdsServer | None = None
    als: AccessLogServer | None = None
    l7: L7Server | None = None
    l7_pool: WorkerPool | None = None


@dataclass
class _Before:
    """What a mutation replaced, to put back if the managed Envoy rejects it: policies and
    endpoints by key (None: absent), and the namespaces it made."""

    policies: dict[PolicyKey, Policy | None] = field(default_factory=dict)
    sources: list[PolicySource] = field(default_factory=list)
    endpoints: dict[str, EndpointSpec | None] = field(default_factory=dict)
    endpoint_ids: dict[str, int] = field(default_factory=dict)
    created: list[Namespace] = field(default_factory=list)
    services: dict[int, Service | None] = field(default_factory=dict)
    waiting: dict[str, EndpointSpec | None] = field(default_factory=dict)  # issue 13: endpoints with no identity


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.started = time.time()
        private_dir(config.state_dir, config.socket_group)  # nobody else may swap the sockets in it
        self.lock = threading.RLock()  # engine, state and revisions; never held while waiting for proxies
        self.persist = StateWriter(config.state_dir)  # state.json and its journal
        self.state = self.persist.loaded
        # kvstore (issue 13): cluster-wide identities from etcd instead of this node's file
        kv = config.kvstore
        if kv is not None and kv.router_ip is None and config.router_ip:
            kv = replace(kv, router_ip=config.router_ip)  # other nodes see it as remote-node
        self.cluster = ClusterNode.connect(config.node_id, kv) if kv is not None else None
        self.engine = PolicyEngine(self.cluster.allocator if self.cluster is not None
                                   else config.allocator or FileAllocator(config.state_dir))
        self.cache = Cache()
        self.metrics = Metrics()
        self.tracker: AckTracker = MeteredAckTracker(self.metrics)
        self.errors: deque[dict[str, Any]] = deque(maxlen=50)  # the last errors, newest last, for status
        self.kubernetes: Any = None  # the Kubernetes watcher feeding this agent (cilia.k8s.Watcher), if any
        flow_file = (FlowFile(config.flow_file, config.flow_file_max_bytes, config.flow_file_backups)
                     if config.flow_file is not None else None)
        self.observer = Observer(config.node_id, self.metrics, config.ring_size, flow_file)
        self.observer.on_l7_error = self._error
        self.receiver = AccessLogReceiver(1, subscriber=self.observer.on_access_record)
        self.node = (NodeDatapath(config.bpf_pin_dir, config.nodeport_devices,
                                  allow_localhost=config.allow_localhost == "always")
                     if config.datapath == "bpf" else None)
        if self.node is not None and config.kvstore is not None and config.kvstore.node_ip:
            # issue 13: routes (or the tunnel) to the other nodes the kvstore announces
            self.node.cross = CrossNode(self.node.loader, config.kvstore.node_ip, config.tunnel)
        self.metrics.envoy_up.set_function(lambda: 1.0 if self.envoy is not None and self.envoy.status().running
                                           else 0.0)
        first, *more = (f"unix:{p}" for p in config.l7_sockets)
        self.views = L7ViewSink()
        extproc = GrpcTarget(L7_CLUSTER, first, more=tuple(more))
        # --- the L7 parsers inside Envoy (cilia.envoy.inproc); None: they run on ext_proc
        self.l7_inproc = InprocL7.choose(config.l7_mode, config.state_dir / "l7-inproc.sock",
                                         self.observer.on_worker_record, managed=config.envoy == "managed",
                                         workers=config.l7_workers, on_error=self._error)
        if self.l7_inproc is not None:
            self.views.attach(self.l7_inproc)  # every revision's views go to Envoy's interpreters
        self.proxy = ProxySink(self.cache, config.proxy_mode, config.node_id,
                               AccessLogTarget(ACCESS_LOG_CLUSTER, f"unix:{config.accesslog_socket}"),
                               self.l7_inproc.target(extproc) if self.l7_inproc is not None else extproc)
        sinks: list[Any] = [self.views, self.proxy]
        # issue 17: endpoints' DNS queries (egress dns rules) are redirected to this proxy in BPF. The
        # learner is toFQDNs' Agent.learn_fqdn: an answer is released once the maps select its addresses.
        self.dns_proxy: DNSProxy | None = None
        if self.node is not None:
            self.dns_proxy = DNSProxy(port=config.dns_proxy_port, learn=self.learn_fqdn, known=self.known_fqdn,
                                      record=self.observer.on_dns_records,
                                      upstream_timeout=config.dns_upstream_timeout)
            sinks.append(DNSProxySink(self.dns_proxy))  # before the datapath redirects to it
            sinks.append(DatapathSink(self.node))
            sinks.append(ServiceSink(self.node))
        self.guard: SidecarGuard | None = None  # sidecar mode: only Envoy may reach the applications' own ports
        if self.node is None and config.proxy_mode == "sidecar":
            self.guard = SidecarGuard(lambda n: spec.netns if (spec := self.state.endpoints.get(n)) else None,
                                      owner=str(config.state_dir))
            sinks.append(self.guard)
        sinks.append(FlowNames(self.observer))
        self.realizer = Realizer(sinks)
        self._redirects = RedirectIndex()
        self._redirected: dict[str, frozenset[tuple[str, str, int]]] = {}  # endpoint -> (L7 protocol, direction, port)
        self._redirect_counts: dict[str, int] = {}  # L7 protocol -> redirected (endpoint, direction, port)s
        self._desired: Desired | None = None
        self._audit_keys: frozenset[PolicyKey] = frozenset()
        self.servers = Servers()
        self.envoy: EnvoySupervisor | None = None
        self.admin_address: str | None = None
        self.reverted: dict[int, str] = {}  # revision -> why: the managed Envoy rejected it and it was reverted
        self.fqdn = FqdnLearner(self, config.fqdn)  # toFQDNs (issue 17)
        # issue 13: endpoints accepted while no cluster-wide identity could be had, admitted once it can
        self.pending = PendingIdentities(self._waiting_names, self._admit_waiting)
        self._replay()

    @property
    def revision(self) -> int:
        return self.state.revision

    @property
    def notes(self) -> tuple[str, ...]:
        return self.proxy.notes

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
            self.engine.set_services(self.state.services.values())  # toServices resolves against them
            for spec in self.state.endpoints.values():
                self.engine.upsert_endpoint(_endpoint(spec))
            if policies:
                self.engine.apply(policies)
            learned = self.fqdn.load()  # toFQDNs (issue 17): addresses open flows may still use
            if learned:
                self.engine.update_fqdn(learned)
        # one revision: the persisted one numbers what a restarted agent realizes
        self.engine.revision = self.state.revision
        with self.lock:
            self._realize(None)

    def start(self) -> None:
        """Serve xDS and access logs, then start Envoy (managed mode) against the loaded config."""
        try:
            if self.node is not None:
                self._start_datapath()
            if self.cluster is not None:  # kvstore (issue 13): publish this node's endpoints, receive the others'
                self.cluster.attach(self)
            self.pending.start()  # endpoints a restarted agent finds waiting are tried again
            self.fqdn.start()  # toFQDNs (issue 17): expire learned addresses
            for sock in (self.config.xds_socket, self.config.accesslog_socket, *self.config.l7_sockets):
                sock.unlink(missing_ok=True)
            s = self.servers
            group = self.config.socket_group
            s.xds = XdsServer(self.cache, self.tracker, known_nodes=self._known_node)
            s.xds.add_address(f"unix:{self.config.xds_socket}", group=group)
            for address in self.config.xds_addresses:
                s.xds.add_address(address, group=group, tls=self.config.xds_tls, insecure=self.config.xds_insecure)
            s.xds.start()
            s.als = AccessLogServer(self.receiver)
            s.als.add_address(f"unix:{self.config.accesslog_socket}", group=group)
            s.als.start()
            if self.config.l7_workers:
                s.l7_pool = WorkerPool([f"unix:{p}" for p in self.config.l7_sockets], self.observer.on_worker_record,
                                       group=group)
                self.views.attach(s.l7_pool)
                s.l7_pool.start()
                if not s.l7_pool.wait_ready(WORKERS_READY_SECONDS):  # health stays degraded until they serve
                    _log.warning("L7 workers: %d/%d serving after %gs", s.l7_pool.ready(), self.config.l7_workers,
                                 WORKERS_READY_SECONDS)
            else:
                s.l7 = L7Server(self.views.source, self.observer.on_l7_record)
                s.l7.add_address(f"unix:{self.config.l7_socket}", group=group)
                s.l7.start()
            if self.l7_inproc is not None:
                self.l7_inproc.start()
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
                  "router_ip": router if added or (router and record.get("router_ip") == router) else None,
                  "node_ip": self.node.cross.node_ip if self.node.cross is not None else None,
                  "nodeport_devices": list(self.config.nodeport_devices)}
        record_path.write_text(json.dumps(record), encoding="utf-8")  # before loading: cleanup finds it
        self.node.subscribe(self.observer.on_datapath_event)
        if self.dns_proxy is not None:
            self.dns_proxy.start()  # before the datapath: its port goes into the redirects
        self.node.start()
        # the node's own addresses are host for Envoy too (the kernel's ipcache has them already),
        # so its requests to L7 ports are judged as host there as well
        host = {ipaddress.ip_network(a): HOST_IDENTITY for a in self.node.host_addresses}
        with self.lock:
            self.engine.update_remote(host)  # no new revision: the realized state names no endpoint differently
            self._realize(None)

    def _start_envoy(self) -> None:
        # admin on an owner-only socket: over TCP any local user could dump, drain or stop Envoy
        self.admin_address = f"unix:{self.config.state_dir / 'envoy-admin.sock'}"
        bootstrap = self.config.state_dir / "envoy-bootstrap.json"
        write_bootstrap(bootstrap, build_bootstrap(self.config.node_id, f"unix:{self.config.xds_socket}",
                                                   self.admin_address))
        self.envoy = EnvoySupervisor(bootstrap, self.admin_address, log_path=self.config.state_dir / "envoy.log",
                                     extra_args=self.config.envoy_args,
                                     pid_file=self.config.state_dir / "envoy.pid",
                                     env=self.l7_inproc.envoy_env() if self.l7_inproc is not None else None)
        self.envoy.start()

    def stop(self) -> None:
        """Stop Envoy (managed mode), then the servers and the datapath's event reader; the BPF
        programs stay attached and keep enforcing. Safe to repeat."""
        try:
            if self.envoy is not None:
                self.envoy.stop()
        finally:
            s = self.servers
            for server in (s.xds, s.als, s.l7):
                if server is not None:
                    server.stop(0)
            s.xds = s.als = s.l7 = None
            if s.l7_pool is not None:
                self.views.detach(s.l7_pool)
                s.l7_pool.stop()
                s.l7_pool = None
            if self.l7_inproc is not None:
                self.l7_inproc.stop()
            if self.dns_proxy is not None:
                self.dns_proxy.stop()
            if self.node is not None:
                self.node.stop()
            if self.guard is not None and self.config.envoy == "managed":  # its Envoy is gone too; sidecars
                self.guard.close()  # of their own (external) keep enforcing, so their app ports stay closed
            self.pending.stop()
            if self.cluster is not None:  # kvstore (issue 13)
                self.cluster.stop()
            self.fqdn.stop()
            self.observer.close()
            self.persist.close()

    # ------------------------------------------------------------------ policies

    def import_policies(self, files: Sequence[tuple[str, str]], audit: bool = False) -> Policies:
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
        with self.lock:
            before = self._before(policies={p.key for p in policies})
            try:
                change = self.engine.apply(policies)
            except L7ConflictError as e:
                raise AgentError(f"{e}; nothing was imported", 409) from None
            for path, text, ps in parsed:
                if ps:
                    self.state.add_source(path, text, {p.key for p in ps}, audit)
            revision = self._commit(change.endpoints)
        self._await_managed(revision, before)
        audited = self.state.audit_keys()
        return Policies(revision, tuple(_policy_info(p, audited, self.engine.service_view) for p in policies))

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
        with self.lock:
            current = list(self.engine.policies())
        flows = self.observer.flow_log.since(None, last)
        return policy_diff(current, candidate, flows)

    def delete_policies(self, name: str | None, namespace: str | None = None) -> PoliciesDeleted:
        """Delete the policies called ``name`` (in ``namespace`` if given), or all with None."""
        with self.lock:
            if name is None:
                keys = [p.key for p in self.engine.policies()]
            else:
                keys = self.engine.find_policies(name, namespace)
                if not keys:
                    where = f" in namespace {namespace}" if namespace else ""
                    raise AgentError(f"no policy named {name}{where}", 404)
            changed = self.engine.delete(keys).endpoints if keys else frozenset()
            self.state.drop_keys(set(keys))
            revision = self._commit(changed)
        return PoliciesDeleted(revision, tuple(sorted(keys)))

    def delete_policy_keys(self, keys: Sequence[PolicyKey]) -> PoliciesDeleted:
        """Delete exactly the policies with these (kind, namespace, name) keys (namespace "" for a
        CCNP); the Kubernetes watcher uses it, since names alone are not unique across kinds."""
        with self.lock:
            present = {p.key for p in self.engine.policies()}
            found = [k for k in (tuple(k) for k in keys) if k in present]
            if not found:
                raise AgentError(f"no such policy: {', '.join('/'.join(x for x in k if x) for k in keys)}", 404)
            change = self.engine.delete(found)
            self.state.drop_keys(set(found))
            revision = self._commit(change.endpoints)
        return PoliciesDeleted(revision, tuple(sorted(found)))

    def policies(self) -> Policies:
        with self.lock:
            audited = self.state.audit_keys()
            view = self.engine.service_view
            return Policies(self.state.revision, tuple(_policy_info(p, audited, view) for p in self.engine.policies()))

    # ------------------------------------------------------------------ endpoints

    def add_endpoint(self, spec: EndpointSpec) -> EndpointAdded:
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
        # kvstore (issue 13): the cluster-wide identity is allocated before the lock is taken (the
        # store's I/O never blocks other API calls); unreachable: the endpoint waits for it with its
        # traffic dropped, never a node-local number
        try:
            prepared = self._identity_prepared(spec.name, endpoint)
        except IdentityUnavailable as e:
            return self._add_waiting(spec, e)
        with prepared, self.lock:
            self._check_frontends(spec)
            before = self._before(endpoints={spec.name})
            previous = self.state.endpoints.get(spec.name) or self.state.waiting.get(spec.name)
            try:
                spec, created = plumb(spec, previous, self.config.router_ip)
            except PlumbingError as e:
                raise AgentError(f"endpoint {spec.name}: {e}") from None
            if created is not None:
                before.created.append(created)
            try:
                change = self.engine.upsert_endpoint(endpoint)
            except L7ConflictError as e:
                if created is not None:
                    created.delete()
                raise AgentError(f"endpoint {spec.name}: {e}", 409) from None
            except IdentityUnavailable as e:  # kvstore (issue 13): no node-local number instead
                if created is not None:
                    created.delete()
                raise AgentError(f"endpoint {spec.name}: {e}", 503) from None
            self.state.endpoints[spec.name] = spec
            if self.state.waiting.pop(spec.name, None) is not None:  # it had waited: it has its identity now
                self.pending.errors.pop(spec.name, None)
            self._give_endpoint_id(spec, before)
            revision = self._commit(change.endpoints | {spec.name})
            result = EndpointAdded(revision, self._endpoint_info(spec))
        self._await_managed(revision, before)
        return result

    def _check_frontends(self, spec: EndpointSpec) -> None:
        frontends = {s.frontend.address: s for s in self.state.services.values()}
        for ip in spec.ips:
            if ip in frontends:
                raise AgentError(f"endpoint {spec.name}: ips: {ip} is service {frontends[ip].id}'s frontend "
                                 f"({frontends[ip].frontend})")

    def _give_endpoint_id(self, spec: EndpointSpec, before: _Before) -> None:
        """(lock held) An endpoint with an interface gets its BPF policy map's index; none free: the
        mutation is undone (409)."""
        if spec.interface is None or spec.name in self.state.endpoint_ids:
            return
        try:
            self.state.endpoint_ids[spec.name] = free_endpoint_id(self.state.endpoint_ids.values())
        except PlumbingError as e:
            self._restore(before)
            raise AgentError(str(e), 409) from None

    def _add_waiting(self, spec: EndpointSpec, why: IdentityUnavailable) -> EndpointAdded:
        """Accept ``spec`` without an identity (issue 13): recorded (it survives a restart), its
        namespace and veth made, in the kernel with an empty policy (every packet from or to it
        dropped), not in the engine, so nothing is published and Envoy gets nothing for it. The
        retry loop admits it once its cluster-wide identity can be allocated. A ready endpoint being
        replaced keeps what it has instead (503): nothing it had is taken away by an outage."""
        with self.lock:
            if spec.name in self.state.endpoints:
                raise AgentError(f"endpoint {spec.name}: {why}; the endpoint keeps its current identity", 503)
            self._check_frontends(spec)
            before = self._before(endpoints={spec.name})
            try:
                spec, created = plumb(spec, self.state.waiting.get(spec.name), self.config.router_ip)
            except PlumbingError as e:
                raise AgentError(f"endpoint {spec.name}: {e}") from None
            if created is not None:
                before.created.append(created)
            self.state.waiting[spec.name] = spec
            self._give_endpoint_id(spec, before)
            _log.warning("endpoint %s waits for its cluster-wide identity (all its traffic dropped): %s",
                         spec.name, why)
            self.pending.errors[spec.name] = str(why)
            revision = self._commit(())
            result = EndpointAdded(revision, self._waiting_info(spec))
        self.pending.kick()
        return result

    def _waiting_names(self) -> list[str]:
        with self.lock:
            return list(self.state.waiting)

    def _admit_waiting(self, name: str) -> bool:
        """The retry loop's try for one waiting endpoint: allocate its identity (outside the lock),
        then admit it through the normal commit path, in one revision. True when it is done with
        (admitted, or deleted or replaced meanwhile); False while the identity cannot be had."""
        with self.lock:
            spec = self.state.waiting.get(name)
        if spec is None:
            return True  # deleted meanwhile: nothing is allocated
        endpoint = _endpoint(spec)
        try:
            prepared = self._identity_prepared(name, endpoint)
        except IdentityUnavailable as e:
            self.pending.errors[name] = str(e)
            return False
        with prepared, self.lock:
            if self.state.waiting.get(name) is not spec:
                return True  # deleted or replaced while the identity was allocated: the pin is let go
            before = self._before(endpoints={name})
            try:
                change = self.engine.upsert_endpoint(endpoint)
            except (L7ConflictError, IdentityUnavailable) as e:
                self.pending.errors[name] = str(e)
                self._error("endpoint", f"endpoint {name} still waits: {e}")
                return False
            del self.state.waiting[name]
            self.state.endpoints[name] = spec
            revision = self._commit(change.endpoints | {name})
            self.pending.errors.pop(name, None)
            _log.info("endpoint %s has its cluster-wide identity %d (revision %d)", name,
                      self.engine.identity_of(name).id, revision)
        try:
            self._await_managed(revision, before)
        except AgentError as e:
            self._error("endpoint", f"endpoint {name}: {e}")
        return True

    def _identity_prepared(self, name: str, endpoint: Endpoint) -> AbstractContextManager[object]:
        """A cluster-wide allocator's ``prepare`` (kvstore, CRD mode): the identity allocated now.
        Raises ``IdentityUnavailable`` when its store cannot be reached."""
        prepare = getattr(self.engine.allocator, "prepare", None)
        if prepare is None:
            return nullcontext()
        try:
            return prepare(endpoint_labels(endpoint.labels))  # type: ignore[no-any-return]
        except ValueError as e:
            raise AgentError(f"endpoint {name}: {e}") from None

    def remove_endpoint(self, name: str) -> Revision:
        with self.lock:
            waiting = self.state.waiting.pop(name, None)
            if waiting is not None:  # issue 13: never admitted, so nothing was allocated or published
                self.pending.errors.pop(name, None)
                self.state.endpoint_ids.pop(name, None)
                revision = self._commit(())  # detaches it first
                unplumb(waiting)
                return Revision(revision)
            if name not in self.state.endpoints:
                raise AgentError(f"no endpoint named {name}", 404)
            change = self.engine.remove_endpoint(name)
            spec = self.state.endpoints.pop(name)
            self.state.endpoint_ids.pop(name, None)
            revision = self._commit(change.endpoints)  # detaches it and clears its maps first
            unplumb(spec)
            return Revision(revision)

    def endpoints(self) -> Endpoints:
        with self.lock:
            infos = [self._endpoint_info(s) for s in self.state.endpoints.values()]
            infos += [self._waiting_info(s) for s in self.state.waiting.values()]
            return Endpoints(tuple(sorted(infos, key=lambda i: i.spec.name)))

    def _endpoint_info(self, spec: EndpointSpec) -> EndpointInfo:
        ident = self.engine.identity_of(spec.name)
        ms = self.engine.endpoint_policy(spec.name).map_state
        return EndpointInfo(spec, ident.id, tuple(ident.labels.to_list()), ms.ingress.enforced, ms.egress.enforced,
                            *self.audit_of(spec.name), state=READY)

    @staticmethod
    def _waiting_info(spec: EndpointSpec) -> EndpointInfo:
        """No identity number; the labels it will have; both directions closed."""
        labels = endpoint_labels(_endpoint(spec).labels)
        return EndpointInfo(spec, None, tuple(labels.to_list()), True, True, False, False,
                            state=WAITING_FOR_IDENTITY)

    def waiting_endpoints(self) -> list[str]:
        """Endpoints waiting for a cluster-wide identity (issue 13), for status and health."""
        return sorted(self._waiting_names())

    def identities(self) -> Identities:
        with self.lock:
            return Identities(tuple(IdentityInfo(i.id, i.kind.value, tuple(i.labels.to_list()),
                                                 str(i.prefix) if i.prefix is not None else None)
                                    for i in sorted(self.engine.identities(), key=lambda i: i.id)))

    # ------------------------------------------------------------------ toFQDNs (issue 17)

    def learn_fqdn(self, endpoint_name: str, qname: str, ips: Sequence[str], ttl: int) -> None:
        """The DNS proxy's call for every allowed answer: returns once the BPF maps (and the managed
        Envoy) hold the new addresses, so the answer may be released. Cheap when nothing is new."""
        self.fqdn.learn(endpoint_name, qname, ips, ttl)

    def known_fqdn(self, endpoint_name: str, qname: str, ips: Sequence[str], ttl: int) -> bool:
        """The DNS proxy's check on its own loop: True if the maps hold every address already
        (a repeated answer; its expiry moves), so ``learn_fqdn`` need not run."""
        return self.fqdn.known(endpoint_name, qname, ips, ttl)

    def fqdn_cache(self, name: str | None = None) -> dict[str, Any]:
        return {"entries": self.fqdn.list(name)}

    def fqdn_clean(self, name: str | None = None) -> dict[str, Any]:
        removed, revision = self.fqdn.clean(name)
        return {"removed": removed, "revision": revision if revision is not None else self.revision}

    # ------------------------------------------------------------------ services (issue 16)

    def update_service(self, service: Service) -> ServiceUpdated:
        """Add or replace the service with ``service.id`` (fields already checked one by one, see
        ``cilia.services.validate``); refused, with nothing applied, if its frontend clashes."""
        with self.lock:
            self._check_service(service, {service.id})
            revision, before = self._set_services({service.id: service})
        self._await_managed(revision, before)
        return ServiceUpdated(revision, service)

    def replace_named_services(self, namespace: str, name: str, services: Sequence[Service]) -> Revision | None:
        """Make ``services`` (ids ignored) the ones named ``namespace/name``, in one revision: what
        one Kubernetes Service (one cilia service per port and frontend) becomes. A frontend it
        already had keeps its id; new ones get free ids. None: nothing changed."""
        with self.lock:
            mine = {(s.frontend, s.type): s.id for s in self.state.services.values()
                    if (s.namespace, s.name) == (namespace, name)}
            taken = set(self.state.services) - set(mine.values())
            wanted: dict[int, Service | None] = {i: None for i in mine.values()}
            fresh = (i for i in range(1, MAX_SERVICE_ID + 1) if i not in taken and i not in mine.values())
            for s in services:
                service_id = mine.get((s.frontend, s.type))
                if service_id is None:
                    service_id = next(fresh, None)
                    if service_id is None:
                        raise AgentError(f"service {namespace}/{name}: no free service id", 409)
                wanted[service_id] = replace(s, id=service_id, namespace=namespace, name=name)
            if all(self.state.services.get(i) == s for i, s in wanted.items()):
                return None
            for service in wanted.values():
                if service is not None:
                    self._check_service(service, set(wanted))
            revision, before = self._set_services(wanted)
        self._await_managed(revision, before)
        return Revision(revision)

    def delete_service(self, service_id: int) -> Revision:
        with self.lock:
            if service_id not in self.state.services:
                raise AgentError(f"no service with id {service_id}", 404)
            revision, before = self._set_services({service_id: None})
        self._await_managed(revision, before)
        return Revision(revision)

    def services(self) -> Services:
        with self.lock:
            return Services(self.state.revision, self.state.services.ordered())

    def _check_service(self, service: Service, replacing: set[int]) -> None:
        addresses = {ip: name for table in (self.state.endpoints, self.state.waiting)
                     for name, spec in table.items() for ip in spec.ips}
        table = self.state.services
        elsewhere = table.backends - sum(len(table[i].backends) for i in replacing if i in table)
        try:
            check_services(service, table.values(), addresses, replacing, elsewhere)
        except ServiceError as e:
            raise AgentError(f"service {service.id}: {e}; nothing was applied") from None

    def _set_services(self, changes: dict[int, Service | None]) -> tuple[int, _Before]:
        """Apply service changes (None: delete) with the lock held: the engine re-resolves the
        policies using toServices, then one revision is committed."""
        before = self._before(services=changes)
        for service_id, service in changes.items():
            if service is None:
                self.state.services.pop(service_id, None)
            else:
                self.state.services[service_id] = service
        try:
            change = self.engine.set_services(self.state.services.values())
        except L7ConflictError as e:
            self._restore(before)
            raise AgentError(f"{e}; nothing was applied", 409) from None
        return self._commit(change.endpoints), before

    # ------------------------------------------------------------------ revisions

    def change_engine(self, change: Callable[[PolicyEngine], Iterable[str] | None]) -> int | None:
        """For producers of engine state other than the API (the kvstore's remote endpoints and
        identities, toFQDNs' learned names): run ``change`` on the engine under the agent's lock and
        commit the endpoints it names (None: nothing moved, nothing committed). Returns the new
        revision, if any. What such a change moves is not in the state files (other nodes'
        addresses; learned names have their own journal), but its revision is journaled (a short
        record) so a restarted agent never numbers a revision twice."""
        with self.lock:
            changed = change(self.engine)
            return None if changed is None else self._commit(changed)

    def _commit(self, changed: Iterable[str] | None) -> int:
        """Number, persist and realize the engine's new state; called with the lock held after a
        change. ``changed``: the endpoints whose policy or spec moved (None: all)."""
        if self.engine.revision <= self.state.revision:
            self.engine.revision = self.state.revision + 1  # a change the engine does not see (ports, ids)
        self.state.revision = self.engine.revision
        desired = self._realize(changed, persist=True)
        return desired.revision

    def _realize(self, changed: Iterable[str] | None, persist: bool = False) -> Desired:
        audit_keys = frozenset(self.state.audit_keys())
        names = None if changed is None or audit_keys != self._audit_keys else frozenset(changed)
        self._audit_keys = audit_keys
        desired = self._build_desired(names)
        if self.node is not None:
            redirects = self._redirects.update({n: e.map_state for n, e in desired.endpoints.items()})
            self.state.proxy_ports = allocate(redirects.values(), self.state.proxy_ports, self.config.proxy_port_range)
        ports = dict(self.state.proxy_ports)
        if self.dns_proxy is not None and self.dns_proxy.running:
            ports[DNS_PROXY_KEY] = self.dns_proxy.port  # issue 17: where egress dns rules redirect
        desired = replace(desired, proxy_ports=ports)
        if persist:
            self.persist.write(self.state)
        errors = dict(self.realizer.errors)
        self.realizer.realize(desired)
        for sink, error in self.realizer.errors.items():
            if errors.get(sink) != error:
                self._error(sink, error)
        self._desired = desired
        self._update_gauges(desired)
        return desired

    def _build_desired(self, changed: frozenset[str] | None) -> Desired:
        previous = self._desired.endpoints if self._desired is not None and changed is not None else {}
        # the previous entries, and anew only those the change names (or that came or went)
        gone, added = previous.keys() - self.state.endpoints.keys(), self.state.endpoints.keys() - previous.keys()
        endpoints: dict[str, EndpointState] = dict(previous)
        for name in gone:
            del endpoints[name]
        if not previous:
            names: Iterable[str] = self.state.endpoints
        else:  # new ones last, in the state's order (as a whole rebuild would place them)
            names = [n for n in (changed or ()) if n in previous and n not in gone]
            names += list(added) if len(added) < 2 else [n for n in self.state.endpoints if n in added]
        for name in names:
            spec = self.state.endpoints[name]
            ingress, egress = self.audit_of(name)
            endpoints[name] = EndpointState(
                name, tuple(spec.ips), self.engine.identity_of(name).id,
                self.engine.endpoint_policy(name).map_state,
                tuple(PortMap(p.port, p.app_port) for p in spec.ports if p.protocol is Protocol.TCP),
                spec.interface, self.state.endpoint_ids.get(name), ingress, egress)
        moved = None if changed is None else frozenset(
            n for n in changed | (previous.keys() - endpoints.keys()) | (endpoints.keys() - previous.keys()))
        waiting = {name: WaitingEndpoint(name, tuple(spec.ips), spec.interface, self.state.endpoint_ids.get(name))
                   for name, spec in self.state.waiting.items()}
        return Desired(self.state.revision, endpoints, tuple(self.engine.ipcache.items()),
                       self.engine.identity_labels(), changed=moved,
                       prefixes=self.engine.ipcache.by_identity(), services=self.state.services.ordered(),
                       waiting=waiting, ipcache_changes=self.engine.ipcache.take_changes())

    def _before(self, policies: Iterable[PolicyKey] = (), endpoints: Iterable[str] = (),
                services: Iterable[int] = ()) -> _Before:
        current = {p.key: p for p in self.engine.policies()}
        sources = [replace(s, keys=set(s.keys)) for s in self.state.sources]  # what _restore puts back
        names = list(endpoints)
        return _Before({k: current.get(k) for k in policies}, sources,
                       {n: self.state.endpoints.get(n) for n in names}, dict(self.state.endpoint_ids),
                       services={i: self.state.services.get(i) for i in services},
                       waiting={n: self.state.waiting.get(n) for n in names})

    def _restore(self, before: _Before) -> None:
        """Put back what a mutation replaced (lock held); its namespaces are removed."""
        gone = [k for k, p in before.policies.items() if p is None and k in {q.key for q in self.engine.policies()}]
        if gone:
            self.engine.delete(gone)
        back = [p for p in before.policies.values() if p is not None]
        if back:
            self.engine.apply(back)
        if before.policies:
            self.state.sources = before.sources
        for name, spec in before.endpoints.items():
            if spec is None:
                if name in self.state.endpoints:
                    self.engine.remove_endpoint(name)
                    del self.state.endpoints[name]
            else:
                self.engine.upsert_endpoint(_endpoint(spec))
                self.state.endpoints[name] = spec
        for name, waiting in before.waiting.items():
            if waiting is None:
                self.state.waiting.pop(name, None)
            else:
                self.state.waiting[name] = waiting
        if before.endpoints:
            self.state.endpoint_ids = before.endpoint_ids
        if before.services:
            for service_id, service in before.services.items():
                if service is None:
                    self.state.services.pop(service_id, None)
                else:
                    self.state.services[service_id] = service
            self.engine.set_services(self.state.services.values())
        for ns in before.created:
            ns.delete()

    def wait_for_managed_envoy(self, revision: int) -> None:
        """Block until the managed Envoy took ``revision``'s listeners (at once when no managed
        Envoy runs or the revision moved no listener). Raises NackError, or TimeoutError after
        ``apply_timeout``."""
        if self.envoy is None or not self.envoy.status().running:
            return
        version = self.proxy.version_for(revision)
        if version is not None:
            self.tracker.wait(self.config.node_id, LISTENER, version, self.config.apply_timeout)

    def _await_managed(self, revision: int, before: _Before) -> None:
        """Wait (without the lock) for the managed Envoy to take ``revision``. If it rejects it and
        nothing was committed since, revert the change (a new revision restores the previous
        config) and raise with Envoy's words. Other proxies' NACKs show in status and ``policy
        wait``; a slow Envoy is not an error here."""
        try:
            self.wait_for_managed_envoy(revision)
            return
        except TimeoutError:
            return
        except NackError as e:
            message = e.message
        self._error("envoy", f"NACK of revision {revision}: {message}")
        with self.lock:
            if self.state.revision != revision:
                raise AgentError(f"Envoy rejected revision {revision}: {message}; not reverted: revision "
                                 f"{self.state.revision} was committed after it", 409)
            self._restore(before)
            restored = self._commit(None)
            self.reverted[revision] = f"Envoy rejected it: {message}; revision {restored} restored the previous config"
        raise AgentError(f"Envoy rejected revision {revision}: {message}; the change was reverted "
                         f"(revision {restored} restores the previous config)", 409)

    def _update_gauges(self, desired: Desired) -> None:
        m = self.metrics
        m.policies.set(len(self.engine.policies()))
        m.max_revision.set(desired.revision)
        m.endpoints.set(len(desired.endpoints))
        # per L7 protocol, the (endpoint, direction, port) redirected to it: recounted for the endpoints
        # a change names only
        if desired.changed is None:
            self._redirected.clear()
            self._redirect_counts.clear()
        for name in desired.endpoints if desired.changed is None else desired.changed:
            for protocol, _, _ in self._redirected.pop(name, ()):
                self._redirect_counts[protocol] -= 1
            ep = desired.endpoints.get(name)
            if ep is None:
                continue
            mine = frozenset((r.l7_protocol, r.direction.value, r.port_lo)
                             for r in self._redirects.of(name, ep.map_state) if r.l7_protocol)
            if mine:
                self._redirected[name] = mine
            for protocol, _, _ in mine:
                self._redirect_counts[protocol] = self._redirect_counts.get(protocol, 0) + 1
        m.set_redirects({protocol: n for protocol, n in self._redirect_counts.items() if n})

    def _error(self, component: str, message: str) -> None:
        """Remember an error for ``cilia status`` (the last 50)."""
        self.errors.append({"time": datetime.now(UTC).isoformat(), "component": component, "message": message})

    # ------------------------------------------------------------------ waiting for proxies

    def _known_node(self, node_id: str) -> bool:
        """The nodes xDS serves: the agent's own (--node-id) and, in sidecar mode, an endpoint's sidecar
        (node id = the endpoint's name, seeing only that endpoint). Any other node gets nothing."""
        return node_id == self.config.node_id or node_id in self.proxy.sidecar_names

    def proxies(self) -> list[str]:
        """Node ids of the proxies a revision must reach: the managed Envoy and every node that
        ever asked for listeners."""
        departed = self.departed_proxies()
        nodes = {node for (node, type_url) in self.tracker.states() if type_url == LISTENER and node not in departed}
        if self.config.envoy == "managed":
            nodes.add(self.config.node_id)
        return sorted(nodes)

    def departed_proxies(self) -> set[str]:
        """Proxies whose xDS streams closed more than ``proxy_grace`` seconds ago and never came back
        (not the managed Envoy: it is restarted, and health says so while it is down)."""
        return {node for node, seconds in self.tracker.gone().items()
                if seconds >= self.config.proxy_grace and not (self.config.envoy == "managed"
                                                               and node == self.config.node_id)}

    def wait(self, revision: int, timeout: float) -> Realized:
        """Block until every proxy acked the listeners of ``revision`` (or a later one).

        Raises AgentError 409 with Envoy's NACK text if a proxy rejected them, 504 on timeout."""
        with self.lock:
            current = self.state.revision
        version = self.proxy.version_for(revision)
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
        return Realized(revision, tuple(done))

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

    # ------------------------------------------------------------------ reading

    def status(self) -> dict[str, Any]:
        return status_view.status(self)

    def debug_info(self, flows: int = 1000) -> dict[str, Any]:
        return status_view.debug_info(self, flows)

    def flows(self, since: int | None = None, limit: int | None = None,
              flow_filter: FlowFilter | None = None) -> dict[str, Any]:
        try:
            return self.observer.flows(since, limit, flow_filter)
        except UnknownPod as e:
            raise AgentError(str(e), 404) from None

    def monitor(self, since: int | None, limit: int | None, wait: float, trace: bool = False) -> dict[str, Any]:
        """Datapath events after ``since`` (waiting up to ``wait`` seconds for one). ``trace``:
        the caller wants trace events, so the datapath emits them for the next 30 seconds."""
        if trace and self.node is not None and self.node.started:
            self.node.datapath.trace_for(30.0)
        return self.observer.monitor(since, limit, wait)

    def l7_check(self, info: ConnectionInfo) -> Check:
        """The local endpoint's current policy for a parsed connection's peer (no agent lock)."""
        return check_for(self.views.views, info)

    def bpf_policy(self, name: str) -> dict[str, Any]:
        """An endpoint's policy map as the kernel holds it, with counters (``cilia bpf policy get``)."""
        with self.lock:
            spec = self.state.endpoints.get(name) or self.state.waiting.get(name)
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

    def bpf_lb(self) -> dict[str, Any]:
        """The load balancer's maps as the kernel holds them, with counters (``cilia bpf lb list``)."""
        with self.lock:
            lb = self.node.lb if self.node is not None else None
            if lb is None:
                raise AgentError("the BPF datapath is not running (cilia agent --datapath bpf)", 409)
            return {"services": lb.rows()}

    def _labels_of(self, identity: int) -> list[str]:
        ident = self.engine.allocator.get(identity) if identity else None
        return ident.labels.to_list() if ident else []

    # ------------------------------------------------------------------ CLI habits (issue 18)

    def wait_for(self, revision: int, timeout: float) -> Realized:
        """``wait``, but a revision not committed yet is waited for too (until ``timeout``), and a
        revision that was rejected and reverted fails (409) instead of counting as realized by the
        revision that restored the previous config."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                current = self.state.revision
            if revision <= current:
                break
            if time.monotonic() >= deadline:
                raise AgentError(f"revision {revision} does not exist after {timeout:g}s (current: {current})", 504)
            time.sleep(0.05)
        if revision in self.reverted:
            raise AgentError(f"revision {revision} was reverted: {self.reverted[revision]}", 409)
        return self.wait(revision, max(0.0, deadline - time.monotonic()))

    def trace_flow(self, body: Any) -> dict[str, Any]:
        """``cilia.policy.trace`` of the flow ``body`` describes (see livetrace) against the policies
        and endpoints in force now."""
        from .livetrace import TraceInputError, trace_live

        with self.lock:
            policies = list(self.engine.policies())
            endpoints = dict(self.state.endpoints)
            identities = list(self.engine.identities())
            services = tuple(self.state.services.values())
        try:
            return trace_live(policies, endpoints, identities, body, services, self.fqdn.cache.names())
        except TraceInputError as e:
            raise AgentError(str(e), e.status) from None
        except PolicyError as e:
            raise AgentError(str(e)) from None


def _endpoint(spec: EndpointSpec) -> Endpoint:
    named = tuple((p.name, p.port, p.protocol) for p in spec.ports if p.name)
    return Endpoint(spec.name, LabelSet.parse(list(spec.labels)),
                    tuple(ipaddress.ip_address(ip) for ip in spec.ips), named)


def _policy_info(p: Policy, audited: set[PolicyKey] | frozenset[PolicyKey] = frozenset(),
                 services: ServiceView | None = None) -> PolicyInfo:
    # accepted, not enforced; and what a translation changed to accept it (a NetworkPolicy's masked ipBlock)
    notes = tuple(sorted({str(n) for r in compile_policy(p, services) for n in r.notes}
                         | {f"{p.source.file}:{p.source.line}: {n}" for n in p.notes}))
    # as Cilium labels a policy's rules (k8s:io.cilium.k8s.policy.*: a translated NetworkPolicy's rules
    # say so themselves), with its metadata and rule labels
    rule_labels = {label for r in p.rules for label in r.labels}
    derived = {f"k8s:io.cilium.k8s.policy.{key}={value}" for key, value in (
        ("derived-from", p.kind.value), ("name", p.name), *((("namespace", p.namespace),) if p.namespace else ()))
        if not any(label.startswith(f"k8s:io.cilium.k8s.policy.{key}=") for label in rule_labels)}
    labels = tuple(sorted({*p.labels, *derived, *rule_labels}))
    return PolicyInfo(p.kind.value, p.namespace, p.name, len(p.rules), p.source.file, p.source.line,
                      p.key in audited, notes, labels)


__all__ = ["Agent", "AgentConfig", "AgentError", "EnvoyMode", "PolicyKey", "Servers"]

"""Resolved policy → Envoy listeners and clusters.

Three shapes share the RBAC matchers of cilia.envoy.rbac and the resource builders of
cilia.envoy.resources:

- ``translate_ingress`` (sidecar/loopback): one endpoint's ingress, a listener per port on the
  address clients connect to, forwarding to the app through a STATIC cluster;
- ``translate_egress`` (sidecar outbound): one endpoint's egress, a transparent listener per port
  receiving the endpoint's own redirected connections; the original destination names the peer;
- ``translate_node`` (node mode): a transparent listener per proxy port and direction serving
  every endpoint on the node; the matchers first pick the endpoint by its address (destination
  for ingress, source for egress), then the peer's identity.

This module holds the public API and the per-port policy computation (which peer identities a
port allows, and with which HTTP rules). It re-exports the names callers have always imported
from it (NO_RULE, AccessLogTarget, ACCESS_DENIED_BODY, ...), so they need not know the split.

Transparent listeners restore the original destination with ``envoy.filters.listener.original_dst``
and forward through an ORIGINAL_DST cluster whose sockets carry a SO_MARK, so the datapath can
tell Envoy's own connections from the ones to redirect.

In ``translate_ingress``, one listener per proxied port, on the address clients connect to. Its
filter chain is:

1. ``envoy.filters.network.rbac``: only sources whose identity is allowed at L3/L4 on the port get
   any further; the others are closed on their first byte, before any HTTP parsing;
2. on ports with HTTP rules, the HTTP connection manager with ``envoy.filters.http.rbac`` and the
   router; a denied request gets ``403 Access denied\\r\\n``, as from Cilium; on plain L3/L4 ports,
   tcp_proxy. Either way traffic goes to a STATIC cluster for the backend.

With ``access_log`` set, every request is sent to the agent's gRPC access log service with the
deciding RBAC action's name as the record's ``rule``, and connections the network RBAC refuses
are logged by the listener itself (``tcp_grpc``).

Repeated fields are sorted by content (not by identity numbers, which depend on allocation order),
so equal policy gives byte-equal resources and the xDS cache sees no change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import wrappers_pb2

from cilia.envoy import metadata, rbac, resources
from cilia.envoy.rbac import NO_DESTINATION_RULE, NO_ENDPOINT, NO_RULE
from cilia.envoy.resources import ACCESS_DENIED_BODY, AccessLogTarget, GrpcTarget, InprocTarget
from cilia.policy.mapstate import DirectionMapState, PolicyEntry, Verdict, origins_name
from cilia.policy.model import IPNetwork, Protocol

__all__ = [
    "ACCESS_DENIED_BODY",
    "EGRESS_MARK",
    "INGRESS_MARK",
    "NO_DESTINATION_RULE",
    "NO_ENDPOINT",
    "NO_RULE",
    "AccessLogTarget",
    "GrpcTarget",
    "InprocTarget",
    "L7Target",
    "NodeEndpoint",
    "PortMapping",
    "ProxyPort",
    "ProxyResources",
    "prefixes_by_identity",
    "translate_egress",
    "translate_ingress",
    "translate_node",
]

#: where a port's L7 parser runs: the agent's ext_proc service, or inside Envoy
L7Target = GrpcTarget | InprocTarget


@dataclass(frozen=True, slots=True)
class PortMapping:
    """A policy port, the port Envoy listens on for it, and the backend port it forwards to."""

    policy_port: int
    listen_port: int
    backend_port: int

    @classmethod
    def same(cls, port: int) -> PortMapping:
        return cls(port, port, port)


@dataclass(frozen=True)
class ProxyResources:
    """Listeners and clusters for Envoy; ``notes`` say what could not be enforced as written."""

    listeners: tuple[listener_pb2.Listener, ...]
    clusters: tuple[cluster_pb2.Cluster, ...]
    notes: tuple[str, ...] = field(default=())


# Envoy binds listeners with SO_REUSEPORT by default, so a second proxy on the same address would
# silently take a share of the connections with whatever policy it enforces. Without it, the
# second bind fails, Envoy rejects the config and the agent reverts the change: fail closed.
EXCLUSIVE_PORT = wrappers_pb2.BoolValue(value=False)


def prefixes_by_identity(items: Iterable[tuple[IPNetwork, int]]) -> dict[int, tuple[IPNetwork, ...]]:
    """Invert ipcache entries (prefix → identity) into identity → its prefixes."""
    out: dict[int, list[IPNetwork]] = {}
    for prefix, ident in items:
        out.setdefault(ident, []).append(prefix)
    return {ident: tuple(sorted(ps, key=rbac.prefix_key)) for ident, ps in out.items()}


def relevant_prefixes(state: DirectionMapState, prefixes: Mapping[int, tuple[IPNetwork, ...]]
                      ) -> Mapping[int, tuple[IPNetwork, ...]]:
    """The part of ``prefixes`` that can change a verdict of ``state``'s RBACs: the identities it has
    entries for, and every other identity with a prefix inside one of theirs wider than a host (the
    longest prefix decides, so such a prefix must be there to deny its addresses). An address in
    neither matches nothing of the identities with entries, so it is denied without its prefix being
    listed. With a wildcard (any identity) entry every identity counts: ``prefixes`` itself.

    This keeps an endpoint's listeners independent of endpoints its policy never names, so adding one
    translates only the listeners that name its identity."""
    if state.any_group:
        return prefixes
    named = {ident: prefixes[ident] for ident in state.groups if ident in prefixes}
    wide = [p for ps in named.values() for p in ps if p.prefixlen < p.max_prefixlen]
    if wide:
        for ident, ps in prefixes.items():
            if ident not in named and any(p.version == w.version and p.subnet_of(w)  # type: ignore[arg-type]
                                          for p in ps for w in wide):
                named[ident] = ps
    return named


_UNIVERSES: dict[int, tuple[Mapping[int, Sequence[IPNetwork]], dict[int, tuple[IPNetwork, ...]]]] = {}


def _universe(prefixes: Mapping[int, Sequence[IPNetwork]]) -> dict[int, tuple[IPNetwork, ...]]:
    """The identities with prefixes, one dict per ``prefixes`` object (so that endpoints given the
    same prefixes share the matchers made from them: ``rbac._Memo``)."""
    hit = _UNIVERSES.get(id(prefixes))
    if hit is not None and hit[0] is prefixes:
        return hit[1]
    if len(_UNIVERSES) >= 64:
        _UNIVERSES.clear()
    universe = {ident: tuple(ps) for ident, ps in prefixes.items() if ps}
    _UNIVERSES[id(prefixes)] = (prefixes, universe)
    return universe


def translate_ingress(
    name: str,
    ingress: DirectionMapState,
    ports: Sequence[PortMapping],
    listen_address: str,
    backend_address: str,
    prefixes: Mapping[int, Sequence[IPNetwork]],
    access_log: AccessLogTarget | None = None,
    l7_service: L7Target | None = None,
    audit: bool = False,
    upstream_mark: int | None = None,
) -> ProxyResources:
    """Listeners on ``listen_address`` and a STATIC cluster to ``backend_address`` per port.

    ``upstream_mark``: the SO_MARK of the backend clusters' sockets, by which the application's
    port tells Envoy's connections from direct ones (cilia.agent.sidecar_guard).

    ``audit``: the endpoint is in audit mode: everything is let through, and what the policy
    would refuse is still decided (the RBAC filters' shadow) and logged.

    With ``access_log``, every HTTP request is logged to that gRPC access log service (its
    cluster is among the returned ones, after the backends). With ``l7_service`` (the agent's
    network ext_proc service hosting the L7 parsers), ports with Kafka or ``l7proto`` rules go
    through it before tcp_proxy; without, those rules deny (noted).

    ``prefixes`` maps every known identity to its source prefixes; an address in none of them is
    never allowed. A port on which no identity is allowed still gets a listener (denying all),
    so that clients meet the policy rather than a refused connection.
    """
    listeners: list[listener_pb2.Listener] = []
    clusters: list[cluster_pb2.Cluster] = []
    notes: dict[str, None] = {}  # ordered, without repeats
    universe = _universe(prefixes)
    compiled: dict[int, tuple[PolicyEntry, rbac.HTTPPolicy]] = {}
    for mapping in sorted(set(ports), key=lambda m: m.policy_port):
        base = f"{name}-ingress-{mapping.policy_port}"
        port = _port_policy(ingress, mapping.policy_port, universe, base, "sidecar mode", notes, compiled,
                            l7_service is not None)
        net = rbac.allow_matcher(port.allowed, universe, rbac.SOURCE, NO_RULE)
        everything = rbac.allow_everything() if audit else None
        filters = [resources.network_filter(metadata.NETWORK_RBAC,
                                            rbac.network_rbac(base, net, access_log is not None, everything))]
        if port.parser is not None and l7_service is not None:
            local = [((ipaddress.ip_network(listen_address),), name)]
            filters += _parser_filters(base, "ingress", mapping.policy_port, port.parser, universe, rbac.SOURCE,
                                       rbac.DESTINATION, local, l7_service)
            filters.append(resources.network_filter("envoy.filters.network.tcp_proxy",
                                                    tcp_proxy_pb2.TcpProxy(stat_prefix=base, cluster=base)))
        elif port.any_l7:
            http = rbac.http_matcher(port.http, universe, rbac.SOURCE, NO_RULE)
            filters.append(resources.network_filter("envoy.filters.network.http_connection_manager",
                                                    resources.hcm(base, everything or http, access_log,
                                                                  shadow=http if audit else None)))
        else:
            filters.append(resources.network_filter("envoy.filters.network.tcp_proxy",
                                                    tcp_proxy_pb2.TcpProxy(stat_prefix=base, cluster=base)))
        listeners.append(listener_pb2.Listener(
            name=base,
            address=resources.socket_address(listen_address, mapping.listen_port),
            enable_reuse_port=EXCLUSIVE_PORT,
            filter_chains=[listener_components_pb2.FilterChain(filters=filters)],
            access_log=resources.connection_log(base, access_log),
        ))
        clusters.append(resources.static_cluster(base, backend_address, mapping.backend_port, upstream_mark))
    if access_log is not None:
        clusters.append(resources.grpc_cluster(access_log))
    clusters += _extproc_cluster(l7_service, listeners)
    return ProxyResources(tuple(listeners), tuple(clusters), tuple(notes))


def _parser_filters(base: str, direction: str, port: int, parser: str, universe: Mapping[int, Sequence[IPNetwork]],
                    peer: rbac.Input, local: rbac.Input, endpoints: Sequence[tuple[Sequence[IPNetwork], str]],
                    l7_service: L7Target) -> list[listener_components_pb2.Filter]:
    """The filters that send a port's traffic through an L7 parser: two RBAC filters that name
    the connection's peer identity and local endpoint (into dynamic metadata), then the parser
    (network ext_proc, or the in-process dynamic module)."""
    peers = [(universe[ident], str(ident)) for ident in sorted(universe)]
    only = endpoints[0][1] if len(endpoints) == 1 else metadata.NO_LOCAL  # a sidecar listener serves one
    return [
        resources.network_filter(metadata.NETWORK_RBAC,
                                 rbac.naming_rbac(base, metadata.PEER_PREFIX, peer, peers, "0")),
        resources.network_filter(metadata.NETWORK_RBAC,
                                 rbac.naming_rbac(base, metadata.LOCAL_PREFIX, local, endpoints, only)),
        _parser(base, direction, port, parser, l7_service),
    ]


def _parser(base: str, direction: str, port: int, parser: str, l7_service: L7Target) -> listener_components_pb2.Filter:
    """Network ext_proc to the agent's L7 service, or (``InprocTarget``) the same parsers inside
    Envoy through the ``cilia_l7`` dynamic module."""
    if isinstance(l7_service, InprocTarget):
        if parser not in l7_service.isolated:
            return resources.network_filter("envoy.filters.network.dynamic_modules", resources.dynamic_module_filter(
                l7_service, {"listener": base, "direction": direction, "port": port, "protocol": parser}))
        if l7_service.extproc is None:  # kept out of Envoy's process, and no service to run it: deny
            return resources.network_filter(metadata.NETWORK_RBAC, rbac.network_rbac(
                base, rbac.allow_matcher(frozenset(), {}, rbac.SOURCE, NO_RULE), False, None))
        l7_service = l7_service.extproc
    return resources.network_filter("envoy.filters.network.ext_proc", resources.ext_proc(
        base, l7_service, metadata.stream_metadata(base, direction, port, parser)))


def _extproc_cluster(l7_service: L7Target | None,
                     listeners: Sequence[listener_pb2.Listener]) -> list[cluster_pb2.Cluster]:
    """The ext_proc service's cluster, when a listener sends a port to it."""
    target = l7_service.extproc if isinstance(l7_service, InprocTarget) else l7_service
    if target is None or not any(_uses(li, "envoy.filters.network.ext_proc") for li in listeners):
        return []
    return [resources.grpc_cluster(target)]


# --- transparent proxying (node mode, sidecar outbound) -------------------------------------


INGRESS_MARK = 0x0A00  # SO_MARK of Envoy's upstream sockets from ingress listeners (Cilium's PROXY_INGRESS)
EGRESS_MARK = 0x0B00  # ... and from egress listeners (Cilium's PROXY_EGRESS)


@dataclass(frozen=True, slots=True)
class ProxyPort:
    """A policy port and the port of the transparent listener its redirected traffic reaches."""

    policy_port: int
    proxy_port: int


@dataclass(frozen=True, slots=True)
class NodeEndpoint:
    """An endpoint on this node: its addresses and its resolved policy per direction (None: the
    endpoint has no policy in that direction here, so its redirected connections are refused)."""

    name: str
    addresses: tuple[IPNetwork, ...]
    ingress: DirectionMapState | None = None
    egress: DirectionMapState | None = None
    identity: int = 0  # with every endpoint's identity known, egress upstreams carry it in their mark
    audit_ingress: bool = False  # audit mode: let everything through, log what policy would refuse
    audit_egress: bool = False


def translate_node(
    node: str,
    endpoints: Sequence[NodeEndpoint],
    listen_address: str,
    prefixes: Mapping[int, Sequence[IPNetwork]],
    *,
    ingress: Sequence[ProxyPort] = (),
    egress: Sequence[ProxyPort] = (),
    access_log: AccessLogTarget | None = None,
    ingress_mark: int = INGRESS_MARK,
    egress_mark: int = EGRESS_MARK,
    l7_service: L7Target | None = None,
) -> ProxyResources:
    """Node mode: one transparent listener per proxy port serving every endpoint on the node.

    The datapath redirects connections to ``listen_address``:``proxy_port`` (iptables REDIRECT or
    TPROXY); the ``original_dst`` listener filter restores the destination the client dialed, and
    the upstream is an ORIGINAL_DST cluster, so the connection continues to where it was going.
    On an ``ingress`` port the endpoint is the one owning the destination address and the peer is
    the direct source; on an ``egress`` port the endpoint owns the direct source address and the
    peer is the destination. The RBAC matchers first pick the endpoint by its address, then the
    peer's identity by longest prefix as in sidecar mode.

    Envoy's upstream sockets carry SO_MARK ``ingress_mark``/``egress_mark`` (Cilium's 0xA00 and
    0xB00 by default), so the datapath can recognise Envoy's own connections and not redirect
    them again (e.g. ``iptables -t nat -A OUTPUT -m mark --mark 0xa00/0xf00 -j RETURN`` before
    the REDIRECT rules). When every endpoint has its ``identity``, an egress port gets a filter
    chain and cluster per source identity (chosen by the source address) whose mark also carries
    the identity in its upper 16 bits, as Cilium's does: the destination's ingress policy then
    judges the upstream connection by the endpoint that made the request, not by the node.
    Setting SO_MARK needs CAP_NET_ADMIN, as does the transparent listener.

    On a port where some endpoint has HTTP rules, the endpoints without any get a filter chain
    of their own (chosen by their address) that proxies plain TCP; endpoints whose rules on the
    port are Kafka or ``l7proto`` ones get one that goes through ``l7_service`` (without it,
    those rules deny and are noted).
    """
    notes: dict[str, None] = {}
    universe = {ident: tuple(ps) for ident, ps in prefixes.items() if ps}
    compiled: dict[int, tuple[PolicyEntry, rbac.HTTPPolicy]] = {}
    listeners: list[listener_pb2.Listener] = []
    clusters: list[cluster_pb2.Cluster] = []
    ordered = sorted(endpoints, key=lambda e: e.name)
    identities = [ep.identity for ep in ordered] if ordered and all(ep.identity for ep in ordered) else None
    for direction, ports, mark in (("ingress", ingress, ingress_mark), ("egress", egress, egress_mark)):
        states = [(tuple(ep.addresses), ep.ingress if direction == "ingress" else ep.egress) for ep in ordered]
        for proxy in sorted(set(ports), key=lambda p: (p.policy_port, p.proxy_port)):
            base = f"{node}-{direction}-{proxy.policy_port}"
            audits = [ep.audit_ingress if direction == "ingress" else ep.audit_egress for ep in ordered]
            li, port_clusters = _transparent(base, direction, proxy, listen_address, universe, states, True,
                                             access_log, mark, notes, compiled,
                                             identities if direction == "egress" else None,
                                             [ep.name for ep in ordered], l7_service, audits)
            listeners.append(li)
            clusters.extend(port_clusters)
    if access_log is not None:
        clusters.append(resources.grpc_cluster(access_log))
    clusters += _extproc_cluster(l7_service, listeners)
    return ProxyResources(tuple(listeners), tuple(clusters), tuple(notes))


def _uses(listener: listener_pb2.Listener, filter_name: str) -> bool:
    return any(f.name == filter_name for chain in listener.filter_chains for f in chain.filters)


def translate_egress(
    name: str,
    egress: DirectionMapState,
    ports: Sequence[ProxyPort],
    listen_address: str,
    prefixes: Mapping[int, Sequence[IPNetwork]],
    access_log: AccessLogTarget | None = None,
    socket_mark: int = EGRESS_MARK,
    l7_service: L7Target | None = None,
) -> ProxyResources:
    """Sidecar outbound: a transparent listener per port for one endpoint's own outgoing traffic.

    Everything that reaches the listener is taken to come from the endpoint, so only the
    destination is looked up: its original address gives the peer identity (longest prefix),
    whose egress policy decides; allowed traffic goes on to that address through an ORIGINAL_DST
    cluster whose sockets carry SO_MARK ``socket_mark`` (see translate_node).
    """
    notes: dict[str, None] = {}
    universe = {ident: tuple(ps) for ident, ps in prefixes.items() if ps}
    compiled: dict[int, tuple[PolicyEntry, rbac.HTTPPolicy]] = {}
    listeners: list[listener_pb2.Listener] = []
    clusters: list[cluster_pb2.Cluster] = []
    for proxy in sorted(set(ports), key=lambda p: (p.policy_port, p.proxy_port)):
        base = f"{name}-egress-{proxy.policy_port}"
        li, port_clusters = _transparent(base, "egress", proxy, listen_address, universe, [((), egress)], False,
                                         access_log, socket_mark, notes, compiled, None, [name], l7_service)
        listeners.append(li)
        clusters.extend(port_clusters)
    if access_log is not None:
        clusters.append(resources.grpc_cluster(access_log))
    clusters += _extproc_cluster(l7_service, listeners)
    return ProxyResources(tuple(listeners), tuple(clusters), tuple(notes))


def _transparent(base: str, direction: str, proxy: ProxyPort, listen_address: str,
                 universe: Mapping[int, Sequence[IPNetwork]],
                 states: Sequence[tuple[tuple[IPNetwork, ...], DirectionMapState | None]], by_endpoint: bool,
                 access_log: AccessLogTarget | None, mark: int, notes: dict[str, None],
                 compiled: dict[int, tuple[PolicyEntry, rbac.HTTPPolicy]],
                 identities: Sequence[int] | None = None, names: Sequence[str] = (),
                 l7_service: L7Target | None = None, audits: Sequence[bool] = (),
                 ) -> tuple[listener_pb2.Listener, list[cluster_pb2.Cluster]]:
    """The listener and ORIGINAL_DST cluster(s) of one proxy port; with ``by_endpoint``, the
    matchers first choose among ``states`` by the endpoint's address, else ``states`` is the one
    endpoint all traffic belongs to.

    Filter chains: a default one (HTTP if any endpoint has HTTP rules here, else plain TCP), and,
    by the endpoint's address, one per other kind (plain TCP, an L7 parser) and, with
    ``identities`` (one per state), per source identity, whose cluster's mark carries it
    (``mark | identity << 16``)."""
    peer, local = (rbac.SOURCE, rbac.DESTINATION) if direction == "ingress" else (rbac.DESTINATION, rbac.SOURCE)
    no_rule = NO_RULE if direction == "ingress" else NO_DESTINATION_RULE
    mode = "node mode" if by_endpoint else "sidecar mode"
    empty = _PortPolicy(frozenset(), {}, False)
    policies = [(addresses, empty if state is None else
                 _port_policy(state, proxy.policy_port, universe, base, mode, notes, compiled, l7_service is not None))
                for addresses, state in states]
    net = [(addresses, rbac.allow_matcher(pp.allowed, universe, peer, no_rule)) for addresses, pp in policies]
    http = [(addresses, rbac.http_matcher(pp.http, universe, peer, no_rule)) for addresses, pp in policies if pp.any_l7]
    audited = [bool(a) for a, _ in zip(list(audits) + [False] * len(policies), policies)]
    everything = rbac.allow_everything()
    if by_endpoint:
        net_matcher = rbac.by_endpoint(net, local, NO_ENDPOINT)
        http_matcher = rbac.by_endpoint(http, local, NO_ENDPOINT) if http else None
        # audit mode: those endpoints' matchers are only the shadow; what is enforced lets all pass
        net_enforced = (rbac.by_endpoint([(a, everything if au else m) for (a, m), au in zip(net, audited)], local,
                                         NO_ENDPOINT) if any(audited) else None)
        audited_http = [au for (_, pp), au in zip(policies, audited) if pp.any_l7]
        http_enforced = (rbac.by_endpoint([(a, everything if au else m) for (a, m), au in zip(http, audited_http)],
                                          local, NO_ENDPOINT) if http and any(audited_http) else None)
    else:
        net_matcher = net[0][1]
        http_matcher = http[0][1] if http else None
        net_enforced = everything if audited[0] else None
        http_enforced = everything if audited[0] and http else None
    rbac_filter = resources.network_filter(metadata.NETWORK_RBAC,
                                           rbac.network_rbac(base, net_matcher, access_log is not None, net_enforced))
    endpoints = [(addresses, name) for (addresses, _), name in zip(policies, names)]

    def terminal(kind: str, cluster: str) -> list[listener_components_pb2.Filter]:
        tcp = resources.network_filter("envoy.filters.network.tcp_proxy",
                                       tcp_proxy_pb2.TcpProxy(stat_prefix=base, cluster=cluster))
        if kind == "http":
            assert http_matcher is not None
            hcm = resources.hcm(base, http_enforced or http_matcher, access_log, cluster=cluster,
                                shadow=http_matcher if http_enforced is not None else None)
            return [resources.network_filter("envoy.filters.network.http_connection_manager", hcm)]
        if kind.startswith("l7-"):
            assert l7_service is not None
            return [*_parser_filters(base, direction, proxy.policy_port, kind[3:], universe, peer, local, endpoints,
                                     l7_service), tcp]
        return [tcp]

    default = "http" if http_matcher is not None else (policies[0][1].kind if not by_endpoint else "tcp")
    chains: list[listener_components_pb2.FilterChain] = []
    clusters = {base: resources.original_dst_cluster(base, mark)}
    if by_endpoint:
        groups: dict[tuple[str, int], set[IPNetwork]] = {}
        for i, (addresses, pp) in enumerate(policies):
            key = (pp.kind, identities[i] if identities is not None else 0)
            if addresses and key != (default, 0):
                groups.setdefault(key, set()).update(addresses)
        for (kind, ident), members in sorted(groups.items()):
            cluster = f"{base}-id{ident}" if ident else base
            if cluster not in clusters:
                clusters[cluster] = resources.original_dst_cluster(cluster, mark | (ident & 0xFFFF) << 16)
            cidrs = [address_pb2.CidrRange(address_prefix=str(p.network_address), prefix_len={"value": p.prefixlen})
                     for p in sorted(members, key=rbac.prefix_key)]
            match = (listener_components_pb2.FilterChainMatch(prefix_ranges=cidrs) if direction == "ingress"
                     else listener_components_pb2.FilterChainMatch(direct_source_prefix_ranges=cidrs))
            chains.append(listener_components_pb2.FilterChain(
                name=f"{base}-{kind}" + (f"-id{ident}" if ident else ""), filter_chain_match=match,
                filters=[rbac_filter, *terminal(kind, cluster)]))
    chains.append(listener_components_pb2.FilterChain(name=f"{base}-{default}",
                                                      filters=[rbac_filter, *terminal(default, base)]))
    listener = listener_pb2.Listener(
        name=base,
        address=resources.socket_address(listen_address, proxy.proxy_port),
        enable_reuse_port=EXCLUSIVE_PORT,
        transparent=wrappers_pb2.BoolValue(value=True),
        listener_filters=[listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.original_dst", typed_config=resources.pack(original_dst_pb2.OriginalDst()))],
        filter_chains=chains,
        access_log=resources.connection_log(base, access_log),
        traffic_direction=base_pb2.INBOUND if direction == "ingress" else base_pb2.OUTBOUND,
    )
    return listener, list(clusters.values())


@dataclass(frozen=True, slots=True)
class _PortPolicy:
    """One endpoint's policy on one port: the peer identities allowed at L3/L4, their HTTP policy,
    whether any of them has HTTP rules (then the port's traffic is parsed as HTTP), or else the
    L7 parser the port's traffic goes through (kafka, memcache, cassandra, a plugin)."""

    allowed: frozenset[int]
    http: Mapping[int, rbac.HTTPPolicy]
    any_l7: bool
    parser: str | None = None

    @property
    def kind(self) -> str:
        """The port's filter chain: ``http``, ``l7-<parser>`` or ``tcp``."""
        return "http" if self.any_l7 else (f"l7-{self.parser}" if self.parser else "tcp")


def _port_policy(state: DirectionMapState, port: int, universe: Mapping[int, Sequence[IPNetwork]], base: str,
                 mode: str, notes: dict[str, None],
                 compiled: dict[int, tuple[PolicyEntry, rbac.HTTPPolicy]], parsers: bool = False) -> _PortPolicy:
    """Look every known peer identity up in ``state`` on TCP ``port``. With ``parsers`` (the
    agent's L7 service is there), non-HTTP L7 rules send the port through that parser;
    without, such identities are denied (fail closed) and noted."""
    allowed: set[int] = set()
    http: dict[int, rbac.HTTPPolicy] = {}
    any_l7 = False
    parser: str | None = None
    for ident in sorted(universe):
        hit = state.lookup(ident, Protocol.TCP, port)
        if hit is None or hit[2].verdict is Verdict.DENY:
            continue
        l7 = hit[2].l7 if hit[2].verdict is Verdict.REDIRECT else None
        if l7 is not None and l7.protocol != "http":
            if not parsers:
                notes[f"{base}: {l7.protocol} rules are not enforced in {mode}; identity {ident} denied"] = None
                continue
            allowed.add(ident)  # the parser decides each request with the same policy
            parser = l7.protocol
            continue
        allowed.add(ident)
        any_l7 = any_l7 or l7 is not None
        if l7 is None or l7.allow_all:
            http[ident] = rbac.HTTPPolicy(origins_name(hit[2]), (), "")
            continue
        # Identities selected by the same rules share one entry object: key on it, since hashing
        # its rules (1,000 of them) once per identity (10,000) is what would cost the time.
        done = compiled.get(id(hit[2]))
        if done is None:
            done = compiled[id(hit[2])] = (hit[2], rbac.http_policy(hit[2], l7.rules, base, notes))
        http[ident] = done[1]
    return _PortPolicy(frozenset(allowed), http, any_l7 and parser is None, parser)

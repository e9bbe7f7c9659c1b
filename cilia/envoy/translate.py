"""Resolved policy → Envoy listeners and clusters.

Three shapes share the RBAC machinery below:

- ``translate_ingress`` (sidecar/loopback): one endpoint's ingress, a listener per port on the
  address clients connect to, forwarding to the app through a STATIC cluster;
- ``translate_egress`` (sidecar outbound): one endpoint's egress, a transparent listener per port
  receiving the endpoint's own redirected connections; the original destination names the peer;
- ``translate_node`` (node mode): a transparent listener per proxy port and direction serving
  every endpoint on the node; the matchers first pick the endpoint by its address (destination
  for ingress, source for egress), then the peer's identity.

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

Both RBAC filters use the matcher API: the connection's *direct* source IP (never
X-Forwarded-For, which a client writes itself) goes through an IP range trie holding every known
prefix, so the longest prefix decides the identity as in the ipcache, and the cost does not grow
with the number of identities. ``world``'s 0.0.0.0/0 therefore never speaks for an endpoint that
has its own /32. Under an identity's range sit its HTTP rules: ORed rules, each an AND of header
predicates on ``:method``, ``:path``, ``:authority`` (RE2 ``safe_regex``, which Envoy applies as a
full match, the semantics cilia.policy validates and traces with) and present/exact headers.

Every RBAC action is named after the rule that decided: an allowed request after the HTTP rule
that matched (``<policy> <path> (<file>:<line>)``, the line of the rule under ``http:``), a denied
one after the policy whose HTTP rules it failed (``default deny: ...``) or ``no rule allows this
source``. Envoy puts the name in the ``envoy.filters.http.rbac`` dynamic metadata
(``enforced_effective_policy_id``), and with ``access_log`` set the HTTP connection manager sends
every request to the agent's gRPC access log service, where it becomes the record's ``rule``.
Connections the network RBAC refuses never become requests: the listener's own log
(``tcp_grpc``) sends those, and only those, as TCP records.

Repeated fields are sorted by content (not by identity numbers, which depend on allocation order),
so equal policy gives byte-equal resources and the xDS cache sees no change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    grpc_service_pb2,
    protocol_pb2,
    socket_option_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.type.matcher.v3 import http_inputs_pb2, metadata_pb2, value_pb2
from envoy.type.matcher.v3 import string_pb2 as string_matcher_pb2
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2
from xds.core.v3 import cidr_pb2, extension_pb2
from xds.type.matcher.v3 import ip_pb2, matcher_pb2, regex_pb2, string_pb2

from cilia.policy.mapstate import DirectionMapState, PolicyEntry, RuleOrigin, Verdict
from cilia.policy.model import HTTPRule, IPNetwork, Protocol

ACCESS_DENIED_BODY = "Access denied\r\n"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
NO_RULE = "no rule allows this source"  # the action name for sources no rule allows on the port
_ALLOWED = "allowed"  # the network RBAC's allow action: the HTTP RBAC names the rule


@dataclass(frozen=True, slots=True)
class AccessLogTarget:
    """Where Envoy sends access logs: the gRPC access log service at ``address`` (an IP, or
    ``unix:PATH``) and ``port``, reached through a STATIC HTTP/2 cluster named ``cluster``."""

    cluster: str
    address: str
    port: int = 0


@dataclass(frozen=True, slots=True)
class _HTTPPolicy:
    """One identity's HTTP policy on a port: allowed outright by rule ``allow``, or by the first
    of ``rules`` (serialized predicate, rule name) that matches; otherwise denied as ``deny``."""

    allow: str | None
    rules: tuple[tuple[bytes, str], ...]
    deny: str


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


def prefixes_by_identity(items: Iterable[tuple[IPNetwork, int]]) -> dict[int, tuple[IPNetwork, ...]]:
    """Invert ipcache entries (prefix → identity) into identity → its prefixes."""
    out: dict[int, list[IPNetwork]] = {}
    for prefix, ident in items:
        out.setdefault(ident, []).append(prefix)
    return {ident: tuple(sorted(ps, key=_prefix_key)) for ident, ps in out.items()}


def translate_ingress(
    name: str,
    ingress: DirectionMapState,
    ports: Sequence[PortMapping],
    listen_address: str,
    backend_address: str,
    prefixes: Mapping[int, Sequence[IPNetwork]],
    access_log: AccessLogTarget | None = None,
) -> ProxyResources:
    """Listeners on ``listen_address`` and a STATIC cluster to ``backend_address`` per port.

    With ``access_log``, every HTTP request is logged to that gRPC access log service (its
    cluster is among the returned ones, after the backends).

    ``prefixes`` maps every known identity to its source prefixes; an address in none of them is
    never allowed. A port on which no identity is allowed still gets a listener (denying all),
    so that clients meet the policy rather than a refused connection.
    """
    listeners: list[listener_pb2.Listener] = []
    clusters: list[cluster_pb2.Cluster] = []
    notes: dict[str, None] = {}  # ordered, without repeats
    universe = {ident: tuple(ps) for ident, ps in prefixes.items() if ps}
    compiled: dict[tuple[object, ...], _HTTPPolicy] = {}
    for mapping in sorted(set(ports), key=lambda m: m.policy_port):
        base = f"{name}-ingress-{mapping.policy_port}"
        port = _port_policy(ingress, mapping.policy_port, universe, base, "sidecar mode", notes, compiled)
        net = _allow_matcher(port.allowed, universe, _SOURCE, NO_RULE)
        filters = [_filter("envoy.filters.network.rbac", _network_rbac(base, net, access_log))]
        if port.any_l7:
            filters.append(_filter("envoy.filters.network.http_connection_manager",
                                   _hcm(base, _http_matcher(port.http, universe, _SOURCE, NO_RULE), access_log)))
        else:
            filters.append(_filter("envoy.filters.network.tcp_proxy",
                                   tcp_proxy_pb2.TcpProxy(stat_prefix=base, cluster=base)))
        listeners.append(listener_pb2.Listener(
            name=base,
            address=_socket(listen_address, mapping.listen_port),
            filter_chains=[listener_components_pb2.FilterChain(filters=filters)],
            access_log=_connection_log(base, access_log),
        ))
        clusters.append(_cluster(base, backend_address, mapping.backend_port))
    if access_log is not None:
        clusters.append(_grpc_cluster(access_log))
    return ProxyResources(tuple(listeners), tuple(clusters), tuple(notes))


# --- transparent proxying (node mode, sidecar outbound) -------------------------------------


INGRESS_MARK = 0x0A00  # SO_MARK of Envoy's upstream sockets from ingress listeners (Cilium's PROXY_INGRESS)
EGRESS_MARK = 0x0B00  # ... and from egress listeners (Cilium's PROXY_EGRESS)
NO_DESTINATION_RULE = "no rule allows this destination"  # egress: no rule allows the destination's identity
NO_ENDPOINT = "no proxied endpoint at this address"  # node mode: the connection belongs to no known endpoint
_SOL_SOCKET, _SO_MARK = 1, 36  # Linux values


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
    the REDIRECT rules). Setting SO_MARK needs CAP_NET_ADMIN, as does the transparent listener.

    On a port where some endpoint has HTTP rules, the endpoints without any get a filter chain
    of their own (chosen by their address) that proxies plain TCP.
    """
    notes: dict[str, None] = {}
    universe = {ident: tuple(ps) for ident, ps in prefixes.items() if ps}
    compiled: dict[tuple[object, ...], _HTTPPolicy] = {}
    listeners: list[listener_pb2.Listener] = []
    clusters: list[cluster_pb2.Cluster] = []
    for direction, ports, mark in (("ingress", ingress, ingress_mark), ("egress", egress, egress_mark)):
        states = [(tuple(ep.addresses), ep.ingress if direction == "ingress" else ep.egress)
                  for ep in sorted(endpoints, key=lambda e: e.name)]
        for proxy in sorted(set(ports), key=lambda p: (p.policy_port, p.proxy_port)):
            base = f"{node}-{direction}-{proxy.policy_port}"
            li, cluster = _transparent(base, direction, proxy, listen_address, universe, states, True,
                                       access_log, mark, notes, compiled)
            listeners.append(li)
            clusters.append(cluster)
    if access_log is not None:
        clusters.append(_grpc_cluster(access_log))
    return ProxyResources(tuple(listeners), tuple(clusters), tuple(notes))


def translate_egress(
    name: str,
    egress: DirectionMapState,
    ports: Sequence[ProxyPort],
    listen_address: str,
    prefixes: Mapping[int, Sequence[IPNetwork]],
    access_log: AccessLogTarget | None = None,
    socket_mark: int = EGRESS_MARK,
) -> ProxyResources:
    """Sidecar outbound: a transparent listener per port for one endpoint's own outgoing traffic.

    Everything that reaches the listener is taken to come from the endpoint, so only the
    destination is looked up: its original address gives the peer identity (longest prefix),
    whose egress policy decides; allowed traffic goes on to that address through an ORIGINAL_DST
    cluster whose sockets carry SO_MARK ``socket_mark`` (see translate_node).
    """
    notes: dict[str, None] = {}
    universe = {ident: tuple(ps) for ident, ps in prefixes.items() if ps}
    compiled: dict[tuple[object, ...], _HTTPPolicy] = {}
    listeners: list[listener_pb2.Listener] = []
    clusters: list[cluster_pb2.Cluster] = []
    for proxy in sorted(set(ports), key=lambda p: (p.policy_port, p.proxy_port)):
        base = f"{name}-egress-{proxy.policy_port}"
        li, cluster = _transparent(base, "egress", proxy, listen_address, universe, [((), egress)], False,
                                   access_log, socket_mark, notes, compiled)
        listeners.append(li)
        clusters.append(cluster)
    if access_log is not None:
        clusters.append(_grpc_cluster(access_log))
    return ProxyResources(tuple(listeners), tuple(clusters), tuple(notes))


def _transparent(base: str, direction: str, proxy: ProxyPort, listen_address: str,
                 universe: Mapping[int, Sequence[IPNetwork]],
                 states: Sequence[tuple[tuple[IPNetwork, ...], DirectionMapState | None]], by_endpoint: bool,
                 access_log: AccessLogTarget | None, mark: int, notes: dict[str, None],
                 compiled: dict[tuple[object, ...], _HTTPPolicy]) -> tuple[listener_pb2.Listener, cluster_pb2.Cluster]:
    """The listener and ORIGINAL_DST cluster of one proxy port; with ``by_endpoint``, the
    matchers first choose among ``states`` by the endpoint's address, else ``states`` is the one
    endpoint all traffic belongs to."""
    peer, local = (_SOURCE, _DESTINATION) if direction == "ingress" else (_DESTINATION, _SOURCE)
    no_rule = NO_RULE if direction == "ingress" else NO_DESTINATION_RULE
    mode = "node mode" if by_endpoint else "sidecar mode"
    empty = _PortPolicy(frozenset(), {}, False)
    policies = [(addresses, empty if state is None else
                 _port_policy(state, proxy.policy_port, universe, base, mode, notes, compiled))
                for addresses, state in states]
    net = [(addresses, _allow_matcher(pp.allowed, universe, peer, no_rule)) for addresses, pp in policies]
    http = [(addresses, _http_matcher(pp.http, universe, peer, no_rule)) for addresses, pp in policies if pp.any_l7]
    if by_endpoint:
        net_matcher = _by_endpoint(net, local, NO_ENDPOINT)
        http_matcher = _by_endpoint(http, local, NO_ENDPOINT) if http else None
    else:
        net_matcher = net[0][1]
        http_matcher = http[0][1] if http else None
    rbac = _filter("envoy.filters.network.rbac", _network_rbac(base, net_matcher, access_log))
    tcp = _filter("envoy.filters.network.tcp_proxy", tcp_proxy_pb2.TcpProxy(stat_prefix=base, cluster=base))
    chains: list[listener_components_pb2.FilterChain] = []
    if http_matcher is None:
        chains.append(listener_components_pb2.FilterChain(filters=[rbac, tcp]))
    else:
        plain = sorted({a for addresses, pp in policies if not pp.any_l7 for a in addresses}, key=_prefix_key)
        if by_endpoint and plain:
            cidrs = [address_pb2.CidrRange(address_prefix=str(p.network_address), prefix_len={"value": p.prefixlen})
                     for p in plain]
            match = (listener_components_pb2.FilterChainMatch(prefix_ranges=cidrs) if direction == "ingress"
                     else listener_components_pb2.FilterChainMatch(direct_source_prefix_ranges=cidrs))
            chains.append(listener_components_pb2.FilterChain(name=f"{base}-tcp", filter_chain_match=match,
                                                              filters=[rbac, tcp]))
        hcm = _filter("envoy.filters.network.http_connection_manager", _hcm(base, http_matcher, access_log))
        chains.append(listener_components_pb2.FilterChain(name=f"{base}-http", filters=[rbac, hcm]))
    listener = listener_pb2.Listener(
        name=base,
        address=_socket(listen_address, proxy.proxy_port),
        transparent=wrappers_pb2.BoolValue(value=True),
        listener_filters=[listener_components_pb2.ListenerFilter(
            name="envoy.filters.listener.original_dst", typed_config=_pack(original_dst_pb2.OriginalDst()))],
        filter_chains=chains,
        access_log=_connection_log(base, access_log),
        traffic_direction=base_pb2.INBOUND if direction == "ingress" else base_pb2.OUTBOUND,
    )
    return listener, _original_dst_cluster(base, mark)


# --- RBAC (matcher API) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Input:
    """A matcher input naming one side of the connection."""

    name: str
    config: message.Message


_SOURCE = _Input("envoy.matching.inputs.direct_source_ip", network_inputs_pb2.DirectSourceIPInput())
_DESTINATION = _Input("envoy.matching.inputs.destination_ip", network_inputs_pb2.DestinationIPInput())


@dataclass(frozen=True, slots=True)
class _PortPolicy:
    """One endpoint's policy on one port: the peer identities allowed at L3/L4, their HTTP policy,
    and whether any of them has HTTP rules (then the port's traffic is parsed as HTTP)."""

    allowed: frozenset[int]
    http: Mapping[int, _HTTPPolicy]
    any_l7: bool


def _port_policy(state: DirectionMapState, port: int, universe: Mapping[int, Sequence[IPNetwork]], base: str,
                 mode: str, notes: dict[str, None],
                 compiled: dict[tuple[object, ...], _HTTPPolicy]) -> _PortPolicy:
    """Look every known peer identity up in ``state`` on TCP ``port``."""
    allowed: set[int] = set()
    http: dict[int, _HTTPPolicy] = {}
    any_l7 = False
    for ident in sorted(universe):
        hit = state.lookup(ident, Protocol.TCP, port)
        if hit is None or hit[2].verdict is Verdict.DENY:
            continue
        l7 = hit[2].l7 if hit[2].verdict is Verdict.REDIRECT else None
        if l7 is not None and l7.protocol != "http":
            notes[f"{base}: {l7.protocol} rules are not enforced in {mode}; identity {ident} denied"] = None
            continue
        allowed.add(ident)
        any_l7 = any_l7 or l7 is not None
        if l7 is None or l7.allow_all:
            http[ident] = _HTTPPolicy(_origins_name(hit[2]), (), "")
            continue
        key = (l7.rules, hit[2].origins)
        if key not in compiled:
            compiled[key] = _http_policy(hit[2], l7.rules, base, notes)
        http[ident] = compiled[key]
    return _PortPolicy(frozenset(allowed), http, any_l7)


def _network_rbac(base: str, matcher: matcher_pb2.Matcher, access_log: AccessLogTarget | None) -> net_rbac_pb2.RBAC:
    """With an access log, the same matcher also runs as the shadow one: Envoy reports only shadow
    results in the connection's dynamic metadata (``shadow_engine_result``,
    ``shadow_effective_policy_id``), which is how the listener's log sees refusals and their
    rule name intact (the termination details have the name's spaces replaced by ``_``)."""
    # No shadow_rules_stat_prefix: it would prefix the metadata keys as well.
    return net_rbac_pb2.RBAC(stat_prefix=f"{base}.rbac", matcher=matcher,
                             shadow_matcher=matcher if access_log is not None else None)


def _allow_matcher(allowed: frozenset[int], universe: Mapping[int, Sequence[IPNetwork]], peer: _Input,
                   no_rule: str) -> matcher_pb2.Matcher:
    """The network RBAC's: only peers whose identity is in ``allowed`` get past the first byte."""
    allow = matcher_pb2.Matcher.OnMatch(action=_action(_ALLOWED, rbac_pb2.RBAC.ALLOW))
    return _by_peer([(allowed, allow)] if allowed else [], universe, peer, no_rule)


def _http_matcher(http: Mapping[int, _HTTPPolicy], universe: Mapping[int, Sequence[IPNetwork]],
                  peer: _Input, no_rule: str) -> matcher_pb2.Matcher:
    """Per distinct HTTP policy, the identities sharing it; a request passes if any rule matches,
    and the action that decides is named after the rule (or the policy it failed)."""
    by_policy: dict[_HTTPPolicy, set[int]] = {}
    for ident, policy in http.items():
        by_policy.setdefault(policy, set()).add(ident)
    groups: list[tuple[Iterable[int], matcher_pb2.Matcher.OnMatch]] = []
    for policy, idents in by_policy.items():
        deny = matcher_pb2.Matcher.OnMatch(action=_action(policy.deny, rbac_pb2.RBAC.DENY))
        if policy.allow is not None:
            on_match = matcher_pb2.Matcher.OnMatch(action=_action(policy.allow, rbac_pb2.RBAC.ALLOW))
        elif not policy.rules:
            on_match = deny
        else:
            rules = matcher_pb2.Matcher.MatcherList(matchers=[
                matcher_pb2.Matcher.MatcherList.FieldMatcher(
                    predicate=matcher_pb2.Matcher.MatcherList.Predicate.FromString(pred),
                    on_match=matcher_pb2.Matcher.OnMatch(action=_action(rule, rbac_pb2.RBAC.ALLOW)))
                for pred, rule in policy.rules])
            on_match = matcher_pb2.Matcher.OnMatch(matcher=matcher_pb2.Matcher(
                matcher_list=rules, on_no_match=deny))
        groups.append((idents, on_match))
    return _by_peer(groups, universe, peer, no_rule)


def _by_peer(groups: Sequence[tuple[Iterable[int], matcher_pb2.Matcher.OnMatch]],
             universe: Mapping[int, Sequence[IPNetwork]], peer: _Input, no_rule: str) -> matcher_pb2.Matcher:
    """The peer's IP → identity by longest prefix (an IP range trie), then that identity's ``on_match``.

    Every known prefix is in the trie, those of identities in no group with a DENY named
    ``no_rule``; all ranges are exclusive, so the most specific prefix decides even when its nested
    rules do not match, and a less specific prefix of another identity (``world``'s 0.0.0.0/0)
    never lets a request in.
    """
    deny = matcher_pb2.Matcher.OnMatch(action=_action(no_rule, rbac_pb2.RBAC.DENY))
    grouped = {i for idents, _ in groups for i in idents}
    others = {i for i in universe if i not in grouped}
    ranges: list[ip_pb2.IPMatcher.IPRangeMatcher] = []
    for idents, on_match in [*groups, (others, deny)]:
        prefixes: list[IPNetwork] = sorted({p for i in idents for p in universe.get(i, ())}, key=_prefix_key)
        if not prefixes and idents is others and not ranges:  # nobody known: a range must still deny
            prefixes = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        if prefixes:
            ranges.append(_range(prefixes, on_match))
    return _ip_tree(peer, ranges, deny)


def _by_endpoint(endpoints: Sequence[tuple[Sequence[IPNetwork], matcher_pb2.Matcher]], local: _Input,
                 no_endpoint: str) -> matcher_pb2.Matcher:
    """Node mode: the endpoint's own address (``local``) picks its matcher; endpoints whose
    matchers are byte-equal share one range."""
    shared: dict[bytes, set[IPNetwork]] = {}
    for addresses, nested in endpoints:
        shared.setdefault(nested.SerializeToString(deterministic=True), set()).update(addresses)
    deny = matcher_pb2.Matcher.OnMatch(action=_action(no_endpoint, rbac_pb2.RBAC.DENY))
    ranges = [_range(sorted(addresses, key=_prefix_key),
                     matcher_pb2.Matcher.OnMatch(matcher=matcher_pb2.Matcher.FromString(nested)))
              for nested, addresses in shared.items() if addresses]
    return _ip_tree(local, ranges, deny)


def _range(prefixes: Sequence[IPNetwork], on_match: matcher_pb2.Matcher.OnMatch) -> ip_pb2.IPMatcher.IPRangeMatcher:
    return ip_pb2.IPMatcher.IPRangeMatcher(
        ranges=[cidr_pb2.CidrRange(address_prefix=str(p.network_address), prefix_len={"value": p.prefixlen})
                for p in prefixes],
        on_match=on_match, exclusive=True)


def _ip_tree(ip: _Input, ranges: list[ip_pb2.IPMatcher.IPRangeMatcher],
             no_match: matcher_pb2.Matcher.OnMatch) -> matcher_pb2.Matcher:
    # Ordered by content, not by identity numbers, which depend on allocation order.
    ranges.sort(key=lambda r: r.SerializeToString(deterministic=True))
    tree = matcher_pb2.Matcher.MatcherTree(
        input=_extension(ip.name, ip.config),
        custom_match=_extension("envoy.matching.custom_matchers.ip_range_matcher",
                                ip_pb2.IPMatcher(range_matchers=ranges)))
    return matcher_pb2.Matcher(matcher_tree=tree, on_no_match=no_match)


def _prefix_key(prefix: IPNetwork) -> tuple[int, int, int]:
    return (prefix.version, int(prefix.network_address), prefix.prefixlen)


def _origins_name(entry: PolicyEntry) -> str:
    """The rules that allow a peer outright (an L3/L4 rule, or one with no HTTP rules)."""
    return "; ".join(sorted({str(o) for o in entry.origins})) or "allowed"


def _rule_name(rule: HTTPRule, origin: RuleOrigin) -> str:
    """``<policy> <path> (<file>:<line>)``, the line being the HTTP rule's own."""
    return str(RuleOrigin(origin.policy, origin.path, rule.source, origin.kind))


def _http_policy(entry: PolicyEntry, rules: Sequence[tuple[object, RuleOrigin]], base: str,
                 notes: dict[str, None]) -> _HTTPPolicy:
    """HTTP rules as named predicates, sorted and deduplicated (the first name of a predicate
    several rules share wins); allowed outright if one rule matches any request."""
    deny = "default deny: " + "; ".join(sorted({str(o) for o in entry.origins}))
    named: dict[bytes, str] = {}
    for rule, origin in rules:
        assert isinstance(rule, HTTPRule)
        pred, matches_any, skipped = _predicate(rule)
        for reason in skipped:
            notes[f"{base}: {rule.source}: {reason}"] = None
        name = _rule_name(rule, origin)
        if pred is None and matches_any:
            return _HTTPPolicy(name, (), deny)
        if pred is not None:
            key = pred.SerializeToString(deterministic=True)
            named[key] = min(named.get(key, name), name)
    return _HTTPPolicy(None, tuple(sorted(named.items())), deny)


def _predicate(rule: HTTPRule) -> tuple[matcher_pb2.Matcher.MatcherList.Predicate | None, bool, list[str]]:
    """One HTTP rule as a predicate (every field must match); ``(None, True, _)`` if it matches any
    request, ``(None, False, _)`` if none can be shown to match."""
    Pred = matcher_pb2.Matcher.MatcherList.Predicate
    skipped: list[str] = []
    conds: list[tuple[str, string_pb2.StringMatcher]] = []
    for header, pattern in ((":method", rule.method), (":path", rule.path), (":authority", rule.host)):
        if pattern is not None:
            conds.append((header, _regex(pattern)))
    for name, value in rule.headers:
        conds.append((name.lower(), _header_value(value)))
    for match in rule.header_matches:
        if match.mismatch is not None:
            skipped.append(f"headerMatches {match.name}: mismatch action {match.mismatch} is not enforced")
            continue
        if match.secret is not None:
            # The value lives in a secret cilia cannot read here: no request can be shown to match.
            skipped.append(f"headerMatches {match.name}: secret values are not supported; rule matches nothing")
            return None, False, skipped
        conds.append((match.name.lower(), _header_value(match.value)))
    preds = sorted(
        (Pred(single_predicate=Pred.SinglePredicate(
            input=_extension("envoy.matching.inputs.request_headers",
                             http_inputs_pb2.HttpRequestHeaderMatchInput(header_name=name)),
            value_match=value)) for name, value in conds),
        key=lambda p: p.SerializeToString(deterministic=True))
    if not preds:
        return None, True, skipped
    if len(preds) == 1:
        return preds[0], True, skipped
    return Pred(and_matcher=Pred.PredicateList(predicate=preds)), True, skipped


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(
        google_re2=regex_pb2.RegexMatcher.GoogleRE2(), regex=pattern))


def _header_value(value: str | None) -> string_pb2.StringMatcher:
    """Exact value, or any value at all (the input yields nothing when the header is absent)."""
    return string_pb2.StringMatcher(exact=value) if value is not None else _regex(".*")


def _action(name: str, action: rbac_pb2.RBAC.Action.ValueType) -> extension_pb2.TypedExtensionConfig:
    return _extension("envoy.filters.rbac.action", rbac_pb2.Action(name=name, action=action))


def _extension(name: str, config: message.Message) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=_pack(config))


# --- listener pieces --------------------------------------------------------------------


def _hcm(base: str, rbac: matcher_pb2.Matcher, access_log: AccessLogTarget | None) -> hcm_pb2.HttpConnectionManager:
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=base),
    )
    denied = accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
        comparison=accesslog_pb2.ComparisonFilter(
            op=accesslog_pb2.ComparisonFilter.EQ,
            value=base_pb2.RuntimeUInt32(default_value=403, runtime_key="cilia.access_denied_status"))))
    logs = [] if access_log is None else [accesslog_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc",
        typed_config=_pack(als_pb2.HttpGrpcAccessLogConfig(common_config=_grpc_log(base, access_log))))]
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=base,
        access_log=logs,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(name=base, virtual_hosts=[
            route_components_pb2.VirtualHost(name=base, domains=["*"], routes=[route])]),
        http_filters=[
            hcm_pb2.HttpFilter(name="envoy.filters.http.rbac", typed_config=_pack(http_rbac_pb2.RBAC(matcher=rbac))),
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router())),
        ],
        local_reply_config=hcm_pb2.LocalReplyConfig(mappers=[hcm_pb2.ResponseMapper(
            filter=denied, body=base_pb2.DataSource(inline_string=ACCESS_DENIED_BODY))]),
    )


def _grpc_log(base: str, target: AccessLogTarget) -> als_pb2.CommonGrpcAccessLogConfig:
    return als_pb2.CommonGrpcAccessLogConfig(
        log_name=base,
        transport_api_version=config_source_pb2.V3,
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=target.cluster)))


def _connection_log(base: str, target: AccessLogTarget | None) -> list[accesslog_pb2.AccessLog]:
    """The listener's own access log, written when a connection ends: only connections the
    network RBAC closed (its denials never reach the HTTP connection manager's log)."""
    if target is None:
        return []
    refused = accesslog_pb2.AccessLogFilter(metadata_filter=accesslog_pb2.MetadataFilter(
        matcher=metadata_pb2.MetadataMatcher(
            filter="envoy.filters.network.rbac",
            path=[metadata_pb2.MetadataMatcher.PathSegment(key="shadow_engine_result")],
            value=value_pb2.ValueMatcher(string_match=string_matcher_pb2.StringMatcher(exact="denied"))),
        match_if_key_not_found=wrappers_pb2.BoolValue(value=False)))
    return [accesslog_pb2.AccessLog(
        name="envoy.access_loggers.tcp_grpc",
        filter=refused,
        typed_config=_pack(als_pb2.TcpGrpcAccessLogConfig(common_config=_grpc_log(base, target))))]


def _cluster(name: str, address: str, port: int) -> cluster_pb2.Cluster:
    """A STATIC cluster speaking to the backend in the client's HTTP version (h2 stays h2 for gRPC)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=2),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=_socket(address, port)))])]),
    )
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(_downstream_protocol())
    return cluster


def _original_dst_cluster(name: str, mark: int) -> cluster_pb2.Cluster:
    """Upstream = the connection's original destination; Envoy's sockets carry SO_MARK ``mark``
    (set before connect) so the datapath lets them through instead of redirecting them back."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration_pb2.Duration(seconds=2),
        upstream_bind_config=address_pb2.BindConfig(socket_options=[socket_option_pb2.SocketOption(
            description="cilia proxy mark", level=_SOL_SOCKET, name=_SO_MARK, int_value=mark,
            state=socket_option_pb2.SocketOption.STATE_PREBIND)]),
    )
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(_downstream_protocol())
    return cluster


def _downstream_protocol() -> http_protocol_options_pb2.HttpProtocolOptions:
    return http_protocol_options_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=http_protocol_options_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
        ))


def _grpc_cluster(target: AccessLogTarget) -> cluster_pb2.Cluster:
    """A STATIC HTTP/2 cluster to a gRPC service (on an IP and port, or ``unix:PATH``)."""
    if target.address.startswith("unix:"):
        address = address_pb2.Address(pipe=address_pb2.Pipe(path=target.address.removeprefix("unix:")))
    else:
        address = _socket(target.address, target.port)
    cluster = cluster_pb2.Cluster(
        name=target.cluster,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=2),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=target.cluster, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=address))])]),
    )
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(options)
    return cluster


def _socket(address: str, port: int) -> address_pb2.Address:
    ipaddress.ip_address(address)  # a literal IP: STATIC clusters and listeners take no names
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port))


def _filter(name: str, config: message.Message) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(name=name, typed_config=_pack(config))


def _pack(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg, deterministic=True)
    return packed

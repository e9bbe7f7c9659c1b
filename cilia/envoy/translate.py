"""Resolved ingress policy of one endpoint → Envoy listeners and clusters (sidecar/loopback mode).

One listener per proxied port, on the address clients connect to. Its filter chain is:

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

Repeated fields are sorted by content (not by identity numbers, which depend on allocation order),
so equal policy gives byte-equal resources and the xDS cache sees no change.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as net_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.extensions.matching.common_inputs.network.v3 import network_inputs_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from google.protobuf import any_pb2, duration_pb2, message
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
    """What one endpoint's ingress needs in Envoy; ``notes`` say what could not be enforced as written."""

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
        allowed: set[int] = set()
        http: dict[int, _HTTPPolicy] = {}
        any_l7 = False
        for ident in sorted(universe):
            hit = ingress.lookup(ident, Protocol.TCP, mapping.policy_port)
            if hit is None or hit[2].verdict is Verdict.DENY:
                continue
            l7 = hit[2].l7 if hit[2].verdict is Verdict.REDIRECT else None
            if l7 is not None and l7.protocol != "http":
                notes[f"{base}: {l7.protocol} rules are not enforced in sidecar mode; "
                      f"identity {ident} denied"] = None
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
        filters = [_filter("envoy.filters.network.rbac", _network_rbac(base, allowed, universe))]
        if any_l7:
            filters.append(_filter("envoy.filters.network.http_connection_manager",
                                   _hcm(base, http, universe, access_log)))
        else:
            filters.append(_filter("envoy.filters.network.tcp_proxy",
                                   tcp_proxy_pb2.TcpProxy(stat_prefix=base, cluster=base)))
        listeners.append(listener_pb2.Listener(
            name=base,
            address=_socket(listen_address, mapping.listen_port),
            filter_chains=[listener_components_pb2.FilterChain(filters=filters)],
        ))
        clusters.append(_cluster(base, backend_address, mapping.backend_port))
    if access_log is not None:
        clusters.append(_grpc_cluster(access_log))
    return ProxyResources(tuple(listeners), tuple(clusters), tuple(notes))


# --- RBAC (matcher API) -------------------------------------------------------------------


def _network_rbac(base: str, allowed: set[int], universe: Mapping[int, Sequence[IPNetwork]]) -> net_rbac_pb2.RBAC:
    """Only sources whose identity is in ``allowed`` get past the first byte."""
    allow = matcher_pb2.Matcher.OnMatch(action=_action(_ALLOWED, rbac_pb2.RBAC.ALLOW))
    groups = [(allowed, allow)] if allowed else []
    return net_rbac_pb2.RBAC(stat_prefix=f"{base}.rbac", matcher=_by_source(groups, universe))


def _http_rbac(http: Mapping[int, _HTTPPolicy],
               universe: Mapping[int, Sequence[IPNetwork]]) -> http_rbac_pb2.RBAC:
    """Per distinct HTTP policy, the identities sharing it; a request passes if any rule matches,
    and the action that decides is named after the rule (or the policy it failed)."""
    by_policy: dict[_HTTPPolicy, set[int]] = {}
    for ident, policy in http.items():
        by_policy.setdefault(policy, set()).add(ident)
    groups: list[tuple[set[int], matcher_pb2.Matcher.OnMatch]] = []
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
    return http_rbac_pb2.RBAC(matcher=_by_source(groups, universe))


def _by_source(groups: Sequence[tuple[set[int], matcher_pb2.Matcher.OnMatch]],
               universe: Mapping[int, Sequence[IPNetwork]]) -> matcher_pb2.Matcher:
    """Source IP → identity by longest prefix (an IP range trie), then that identity's ``on_match``.

    Every known prefix is in the trie, those of identities in no group with a DENY; all ranges are
    exclusive, so the most specific prefix decides even when its nested rules do not match, and a
    less specific prefix of another identity (``world``'s 0.0.0.0/0) never lets a request in.
    """
    deny = matcher_pb2.Matcher.OnMatch(action=_action(NO_RULE, rbac_pb2.RBAC.DENY))
    grouped = set().union(*(idents for idents, _ in groups)) if groups else set()
    others = {i for i in universe if i not in grouped}
    ranges: list[ip_pb2.IPMatcher.IPRangeMatcher] = []
    for idents, on_match in [*groups, (others, deny)]:
        prefixes: list[IPNetwork] = sorted({p for i in idents for p in universe.get(i, ())}, key=_prefix_key)
        if not prefixes and idents is others and not ranges:  # nobody known: a range must still deny
            prefixes = [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        if prefixes:
            ranges.append(ip_pb2.IPMatcher.IPRangeMatcher(
                ranges=[cidr_pb2.CidrRange(address_prefix=str(p.network_address), prefix_len={"value": p.prefixlen})
                        for p in prefixes],
                on_match=on_match, exclusive=True))
    # Ordered by content, not by identity numbers, which depend on allocation order.
    ranges.sort(key=lambda r: r.SerializeToString(deterministic=True))
    tree = matcher_pb2.Matcher.MatcherTree(
        input=_extension("envoy.matching.inputs.direct_source_ip", network_inputs_pb2.DirectSourceIPInput()),
        custom_match=_extension("envoy.matching.custom_matchers.ip_range_matcher",
                                ip_pb2.IPMatcher(range_matchers=ranges)))
    return matcher_pb2.Matcher(matcher_tree=tree, on_no_match=deny)


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


def _hcm(base: str, http: Mapping[int, _HTTPPolicy], universe: Mapping[int, Sequence[IPNetwork]],
         access_log: AccessLogTarget | None) -> hcm_pb2.HttpConnectionManager:
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
        typed_config=_pack(als_pb2.HttpGrpcAccessLogConfig(common_config=als_pb2.CommonGrpcAccessLogConfig(
            log_name=base,
            transport_api_version=config_source_pb2.V3,
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=access_log.cluster))))))]
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=base,
        access_log=logs,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(name=base, virtual_hosts=[
            route_components_pb2.VirtualHost(name=base, domains=["*"], routes=[route])]),
        http_filters=[
            hcm_pb2.HttpFilter(name="envoy.filters.http.rbac", typed_config=_pack(_http_rbac(http, universe))),
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router())),
        ],
        local_reply_config=hcm_pb2.LocalReplyConfig(mappers=[hcm_pb2.ResponseMapper(
            filter=denied, body=base_pb2.DataSource(inline_string=ACCESS_DENIED_BODY))]),
    )


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
    options = http_protocol_options_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=http_protocol_options_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
        ))
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(options)
    return cluster


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

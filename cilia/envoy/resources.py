"""Envoy resource builders: clusters, addresses, filters, the HTTP connection manager, access logs.

Small pieces that know Envoy's protos and nothing of policy; cilia.envoy.translate assembles
listeners from them and cilia.envoy.rbac builds the RBAC matchers they carry.

Backend clusters speak the client's HTTP version (h2 stays h2 for gRPC); the access-log cluster
speaks HTTP/2. A denied HTTP request gets ``403 Access denied\\r\\n``, as from Cilium. With an
access log, the HTTP connection manager sends every request to the agent's gRPC access log
service; connections the network RBAC refuses never become requests, so the listener's own log
(``tcp_grpc``) sends those, and only those, as TCP records.

Messages are packed deterministically, so equal input gives byte-equal resources.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from dataclasses import dataclass

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
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.dynamic_modules.v3 import dynamic_modules_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.ext_proc.v3 import ext_proc_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import metadata_pb2, value_pb2
from envoy.type.matcher.v3 import string_pb2 as string_matcher_pb2
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2
from xds.core.v3 import extension_pb2
from xds.type.matcher.v3 import matcher_pb2

from . import dynamic_modules_proto, metadata

ACCESS_DENIED_BODY = "Access denied\r\n"  # the body of a denied HTTP request's 403
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_SOL_SOCKET, _SO_MARK = 1, 36  # Linux values


@dataclass(frozen=True, slots=True)
class GrpcTarget:
    """A gRPC service of the agent Envoy calls (access logs, L7 parsers) at ``address`` (an IP,
    or ``unix:PATH``) and ``port``, reached through a STATIC HTTP/2 cluster named ``cluster``."""

    cluster: str
    address: str
    port: int = 0
    more: tuple[str, ...] = ()  # further ``unix:PATH`` endpoints of the same service (worker processes)


AccessLogTarget = GrpcTarget


@dataclass(frozen=True, slots=True)
class InprocTarget:
    """The L7 parsers inside Envoy (``cilia.envoy.inproc``): the dynamic module's name and the
    agent's channel its interpreter reaches (``unix:PATH``) for policy. Protocols in ``isolated``
    (plugins whose parser says ``isolation = "process"``) stay on ``extproc`` (the agent's ext_proc
    service); without it their ports deny."""

    module: str
    agent: str
    extproc: GrpcTarget | None = None
    isolated: frozenset[str] = frozenset()

#: ext_proc message timeout: every chunk must be answered within it, else the connection is
#: closed (fail closed); generous, since a parser may wait on the agent's lock.
EXT_PROC_TIMEOUT = duration_pb2.Duration(seconds=5)


def ext_proc(base: str, target: GrpcTarget, info: Mapping[str, str]) -> ext_proc_pb2.NetworkExternalProcessor:
    """Network ext_proc to the agent's L7 service: every chunk each way goes through a parser.
    Fail closed (no failure_mode_allow), an explicit message timeout; ``info``
    (``metadata.stream_metadata``: listener, direction, port, protocol) rides in the stream's gRPC
    metadata, and the RBAC namespace's dynamic metadata (peer identity, local endpoint) in every
    message."""
    service = grpc_service_pb2.GrpcService(
        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=target.cluster),
        initial_metadata=[base_pb2.HeaderValue(key=k, value=v) for k, v in sorted(info.items())])
    return ext_proc_pb2.NetworkExternalProcessor(
        grpc_service=service, failure_mode_allow=False, message_timeout=EXT_PROC_TIMEOUT, stat_prefix=base,
        metadata_options=ext_proc_pb2.MetadataOptions(forwarding_namespaces=ext_proc_pb2.MetadataOptions.
                                                      MetadataNamespaces(untyped=[metadata.RBAC_NAMESPACE])))


def dynamic_module_filter(target: InprocTarget, info: Mapping[str, str | int]) -> message.Message:
    """The ``cilia_l7`` dynamic-module network filter; ``info`` (listener, direction, port,
    protocol) and the agent's channel go in ``filter_config`` as JSON (a StringValue arrives raw).
    The module is never unloaded (it holds an interpreter) and loaded globally (libpython's
    symbols must be visible to the C extension modules Python imports)."""
    config = dict(sorted(info.items())) | {"agent": target.agent}
    packed = any_pb2.Any()
    packed.Pack(wrappers_pb2.StringValue(value=json.dumps(config, sort_keys=True)), deterministic=True)
    return dynamic_modules_proto.DynamicModuleNetworkFilter(
        dynamic_module_config=dynamic_modules_pb2.DynamicModuleConfig(name=target.module, do_not_close=True,
                                                                      load_globally=True),
        filter_name="cilia_l7", filter_config=packed)


def hcm(base: str, rbac: matcher_pb2.Matcher, access_log: AccessLogTarget | None,
        cluster: str | None = None, shadow: matcher_pb2.Matcher | None = None) -> hcm_pb2.HttpConnectionManager:
    """HTTP RBAC with matcher ``rbac``, then the router to ``cluster`` (default ``base``); its
    403s carry ACCESS_DENIED_BODY, and with ``access_log`` every request is logged there.
    ``shadow`` (audit mode) runs beside it, unenforced: its verdict reaches the access log."""
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=cluster or base),
    )
    denied = accesslog_pb2.AccessLogFilter(status_code_filter=accesslog_pb2.StatusCodeFilter(
        comparison=accesslog_pb2.ComparisonFilter(
            op=accesslog_pb2.ComparisonFilter.EQ,
            value=base_pb2.RuntimeUInt32(default_value=403, runtime_key="cilia.access_denied_status"))))
    logs = [] if access_log is None else [accesslog_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc",
        typed_config=pack(als_pb2.HttpGrpcAccessLogConfig(common_config=_grpc_log(base, access_log))))]
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=base,
        access_log=logs,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        route_config=route_pb2.RouteConfiguration(name=base, virtual_hosts=[
            route_components_pb2.VirtualHost(name=base, domains=["*"], routes=[route])]),
        http_filters=[
            hcm_pb2.HttpFilter(name=metadata.HTTP_RBAC,
                               typed_config=pack(http_rbac_pb2.RBAC(matcher=rbac, shadow_matcher=shadow))),
            hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=pack(router_pb2.Router())),
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


def connection_log(base: str, target: AccessLogTarget | None) -> list[accesslog_pb2.AccessLog]:
    """The listener's own access log, written when a connection ends: only connections the
    network RBAC closed (its denials never reach the HTTP connection manager's log)."""
    if target is None:
        return []
    refused = accesslog_pb2.AccessLogFilter(metadata_filter=accesslog_pb2.MetadataFilter(
        matcher=metadata_pb2.MetadataMatcher(
            filter=metadata.NETWORK_RBAC,
            path=[metadata_pb2.MetadataMatcher.PathSegment(key=metadata.SHADOW_ENGINE_RESULT)],
            value=value_pb2.ValueMatcher(string_match=string_matcher_pb2.StringMatcher(exact=metadata.SHADOW_DENIED))),
        match_if_key_not_found=wrappers_pb2.BoolValue(value=False)))
    return [accesslog_pb2.AccessLog(
        name="envoy.access_loggers.tcp_grpc",
        filter=refused,
        typed_config=pack(als_pb2.TcpGrpcAccessLogConfig(common_config=_grpc_log(base, target))))]


def static_cluster(name: str, address: str, port: int, mark: int | None = None) -> cluster_pb2.Cluster:
    """A STATIC cluster speaking to the backend in the client's HTTP version (h2 stays h2 for gRPC);
    with ``mark``, its sockets carry that SO_MARK (set before connect)."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=2),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(
                    address=socket_address(address, port)))])]),
    )
    if mark is not None:
        cluster.upstream_bind_config.CopyFrom(_mark_bind_config(mark))
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(_downstream_protocol())
    return cluster


def _mark_bind_config(mark: int) -> address_pb2.BindConfig:
    return address_pb2.BindConfig(socket_options=[socket_option_pb2.SocketOption(
        description="cilia proxy mark", level=_SOL_SOCKET, name=_SO_MARK, int_value=mark,
        state=socket_option_pb2.SocketOption.STATE_PREBIND)])


def original_dst_cluster(name: str, mark: int) -> cluster_pb2.Cluster:
    """Upstream = the connection's original destination; Envoy's sockets carry SO_MARK ``mark``
    (set before connect) so the datapath lets them through instead of redirecting them back."""
    cluster = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.ORIGINAL_DST,
        lb_policy=cluster_pb2.Cluster.CLUSTER_PROVIDED,
        connect_timeout=duration_pb2.Duration(seconds=2),
        upstream_bind_config=_mark_bind_config(mark),
    )
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(_downstream_protocol())
    return cluster


def _downstream_protocol() -> http_protocol_options_pb2.HttpProtocolOptions:
    return http_protocol_options_pb2.HttpProtocolOptions(
        use_downstream_protocol_config=http_protocol_options_pb2.HttpProtocolOptions.UseDownstreamHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions(),
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions(),
        ))


def grpc_cluster(target: GrpcTarget) -> cluster_pb2.Cluster:
    """A STATIC HTTP/2 cluster to a gRPC service (on an IP and port, or ``unix:PATH``)."""
    if target.address.startswith("unix:"):
        address = address_pb2.Address(pipe=address_pb2.Pipe(path=target.address.removeprefix("unix:")))
    else:
        address = socket_address(target.address, target.port)
    addresses = [address, *(address_pb2.Address(pipe=address_pb2.Pipe(path=a.removeprefix("unix:")))
                            for a in target.more)]
    cluster = cluster_pb2.Cluster(
        name=target.cluster,
        type=cluster_pb2.Cluster.STATIC,
        connect_timeout=duration_pb2.Duration(seconds=2),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(cluster_name=target.cluster, endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(endpoint=endpoint_components_pb2.Endpoint(address=a))
                for a in addresses])]),
    )
    options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()))
    cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(options)
    return cluster


def socket_address(address: str, port: int) -> address_pb2.Address:
    ipaddress.ip_address(address)  # a literal IP: STATIC clusters and listeners take no names
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=address, port_value=port))


def network_filter(name: str, config: message.Message) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(name=name, typed_config=pack(config))


def extension(name: str, config: message.Message) -> extension_pb2.TypedExtensionConfig:
    return extension_pb2.TypedExtensionConfig(name=name, typed_config=pack(config))


def pack(msg: message.Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(msg, deterministic=True)
    return packed

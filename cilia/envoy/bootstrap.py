"""Envoy bootstrap: a node id, an xDS server reached over ADS for CDS and LDS, an admin listener.

Everything else (listeners, clusters, routes, endpoints) comes over xDS, so the
bootstrap stays the same for the life of a node. Addresses are ``host:port`` or
``unix:PATH``; the xDS server must speak HTTP/2 (gRPC).

The admin API can dump every policy, drain the listeners and stop Envoy, so an admin on
``unix:PATH`` gets an owner-only socket (mode 0600, as Cilium does) and ``write_bootstrap``
writes the file owner-only too: it names the admin and xDS addresses.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, grpc_service_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import json_format

from cilia.envoy.private_file import write_private

XDS_CLUSTER = "cilia-xds"
ADMIN_SOCKET_MODE = 0o600
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL


def parse_address(address: str) -> address_pb2.Address:
    """``unix:PATH`` → a pipe; ``HOST:PORT`` (``[v6]:PORT`` too) → a TCP socket address."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        if not path:
            raise ValueError(f"expected unix:PATH with a path, got {address!r}")
        if len(os.fsencode(path)) > _MAX_UNIX_PATH:
            raise ValueError(f"UNIX socket path longer than {_MAX_UNIX_PATH} bytes: {path}")
        return address_pb2.Address(pipe=address_pb2.Pipe(path=path))
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT or unix:PATH, got {address!r}")
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host.strip("[]"), port_value=int(port)))


@dataclass(frozen=True)
class XdsClientTls:
    """Mutual TLS to a TCP xDS server: this proxy's certificate (its subject CN is the node id the
    server lets it speak for) and key, and the CA that signed the server's certificate."""

    cert: Path
    key: Path
    ca: Path


def _xds_transport_socket(tls: XdsClientTls, xds_address: str) -> base_pb2.TransportSocket:
    """TLS with our client certificate; the server's certificate must chain to ``tls.ca`` and name
    the address's host (an IP SAN for an IP, else a DNS SAN), as an HTTPS client would check."""
    host = xds_address.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
        san_type, sni = common_pb2.SubjectAltNameMatcher.IP_ADDRESS, ""
    except ValueError:
        san_type, sni = common_pb2.SubjectAltNameMatcher.DNS, host
    context = tls_pb2.UpstreamTlsContext(
        sni=sni,
        common_tls_context=tls_pb2.CommonTlsContext(
            alpn_protocols=["h2"],
            tls_certificates=[common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(filename=str(tls.cert)),
                private_key=base_pb2.DataSource(filename=str(tls.key)))],
            validation_context=common_pb2.CertificateValidationContext(
                trusted_ca=base_pb2.DataSource(filename=str(tls.ca)),
                match_typed_subject_alt_names=[common_pb2.SubjectAltNameMatcher(
                    san_type=san_type, matcher=string_pb2.StringMatcher(exact=host))]),
        ),
    )
    socket = base_pb2.TransportSocket(name="envoy.transport_sockets.tls")
    socket.typed_config.Pack(context)
    return socket


def build_bootstrap(
    node_id: str,
    xds_address: str,
    admin_address: str,
    *,
    delta: bool = False,
    cluster: str = "cilia",
    xds_tls: XdsClientTls | None = None,
) -> bootstrap_pb2.Bootstrap:
    """A bootstrap for ``node_id`` that takes CDS and LDS over ADS (delta ADS if ``delta``; over
    mutual TLS with ``xds_tls``, for a TCP xDS address). An admin on ``unix:PATH`` is created with
    mode 0600."""
    admin = parse_address(admin_address)
    if admin.HasField("pipe"):
        admin.pipe.mode = ADMIN_SOCKET_MODE
    ads = config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )
    http_options = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    xds_cluster = cluster_pb2.Cluster(
        name=XDS_CLUSTER,
        type=cluster_pb2.Cluster.STATIC,
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=XDS_CLUSTER,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(address=parse_address(xds_address))
                        )
                    ]
                )
            ],
        ),
    )
    xds_cluster.typed_extension_protocol_options[_HTTP_OPTIONS].Pack(http_options)
    if xds_tls is not None:
        if xds_address.startswith("unix:"):
            raise ValueError("xDS TLS is for a TCP xDS address; a unix: socket is protected by its file mode")
        xds_cluster.transport_socket.CopyFrom(_xds_transport_socket(xds_tls, xds_address))
    api_type = config_source_pb2.ApiConfigSource.DELTA_GRPC if delta else config_source_pb2.ApiConfigSource.GRPC
    return bootstrap_pb2.Bootstrap(
        node=base_pb2.Node(id=node_id, cluster=cluster),
        static_resources=bootstrap_pb2.Bootstrap.StaticResources(clusters=[xds_cluster]),
        dynamic_resources=bootstrap_pb2.Bootstrap.DynamicResources(
            ads_config=config_source_pb2.ApiConfigSource(
                api_type=api_type,
                transport_api_version=config_source_pb2.V3,
                set_node_on_first_message_only=True,
                grpc_services=[
                    grpc_service_pb2.GrpcService(
                        envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=XDS_CLUSTER)
                    )
                ],
            ),
            cds_config=ads,
            lds_config=ads,
        ),
        admin=bootstrap_pb2.Admin(address=admin),
    )


def to_json(bootstrap: bootstrap_pb2.Bootstrap) -> str:
    """JSON (which Envoy also reads as YAML) for ``envoy -c FILE`` or ``--config-yaml``."""
    text: str = json_format.MessageToJson(bootstrap, indent=2, sort_keys=True)
    return text


def write_bootstrap(path: str | Path, bootstrap: bootstrap_pb2.Bootstrap) -> None:
    """Write ``bootstrap`` as JSON to ``path``, owner-only and atomically."""
    write_private(path, to_json(bootstrap))

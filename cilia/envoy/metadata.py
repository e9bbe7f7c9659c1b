"""Metadata names shared by what writes them into Envoy's configuration and what reads them back.

The listeners cilia builds (``cilia.envoy.translate``, ``cilia.envoy.resources``) put names into
Envoy's dynamic metadata and into the L7 service's gRPC stream metadata; the access-log service
(``cilia.envoy.accesslog``) and the L7 service (``cilia.envoy.l7service``) read them back. Each
name is defined here once so the two sides cannot drift apart. Plain strings: importing this
module loads no protos.
"""

from __future__ import annotations

#: Envoy's RBAC filters; each also names the dynamic-metadata namespace its results land in.
NETWORK_RBAC = "envoy.filters.network.rbac"
HTTP_RBAC = "envoy.filters.http.rbac"
#: the namespace Envoy's network ext_proc forwards to the L7 service (the naming RBAC filters')
RBAC_NAMESPACE = NETWORK_RBAC

#: keys an RBAC filter writes into its namespace (Envoy's names)
SHADOW_ENGINE_RESULT = "shadow_engine_result"  # SHADOW_DENIED when the shadow matcher refused
SHADOW_DENIED = "denied"
SHADOW_EFFECTIVE_POLICY_ID = "shadow_effective_policy_id"  # the shadow matcher's matching action
ENFORCED_EFFECTIVE_POLICY_ID = "enforced_effective_policy_id"

#: key prefixes (RBAC ``shadow_rules_stat_prefix``) of the two filters that name a connection's
#: peer identity and local endpoint for the L7 service
PEER_PREFIX = "cilia_peer_"
LOCAL_PREFIX = "cilia_local_"
NO_LOCAL = "-"  # the local-endpoint name of a connection to no known endpoint (action names cannot be empty)

#: the L7 service's gRPC stream metadata (ext_proc ``initial_metadata``): what the stream is
STREAM_PREFIX = "x-cilia-"
STREAM_LISTENER = f"{STREAM_PREFIX}listener"
STREAM_DIRECTION = f"{STREAM_PREFIX}direction"
STREAM_PORT = f"{STREAM_PREFIX}port"
STREAM_PROTOCOL = f"{STREAM_PREFIX}protocol"
#: the connection's addresses: network ext_proc sends only data and dynamic metadata, but Envoy
#: expands command operators in a gRPC service's initial metadata per stream (verified on 1.40),
#: so each stream says which client connected to which address (ip:port, [ipv6]:port)
STREAM_SOURCE = f"{STREAM_PREFIX}source"
STREAM_DESTINATION = f"{STREAM_PREFIX}destination"


def naming_key(prefix: str) -> str:
    """The dynamic-metadata key under which the naming RBAC filter with ``prefix`` leaves its
    matching action's name."""
    return f"{prefix}{SHADOW_EFFECTIVE_POLICY_ID}"


def stream_metadata(listener: str, direction: str, port: int, protocol: str) -> dict[str, str]:
    """The gRPC metadata of a listener's L7 streams (read back by the L7 service)."""
    return {STREAM_LISTENER: listener, STREAM_DIRECTION: direction, STREAM_PORT: str(port),
            STREAM_PROTOCOL: protocol, STREAM_SOURCE: "%DOWNSTREAM_REMOTE_ADDRESS%",
            STREAM_DESTINATION: "%DOWNSTREAM_LOCAL_ADDRESS%"}

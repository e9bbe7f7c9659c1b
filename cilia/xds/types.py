"""Shared xDS vocabulary: type URLs, the ADS push order and the resource record.

A leaf module: it imports nothing else from cilia, so caches, streams and the
server can all depend on it without depending on each other.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

_PREFIX = "type.googleapis.com/"
LISTENER = _PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER = _PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
SECRET = _PREFIX + "envoy.extensions.transport_sockets.tls.v3.Secret"

# Envoy warms clusters on EDS and listeners on RDS, so pushes go out in this order
# (a cluster before its endpoints, a listener before its routes).
ADS_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)

# Types Envoy subscribes to as a wildcard when it names no resources.
WILDCARD_TYPES = frozenset({LISTENER, CLUSTER})


def ads_rank(type_url: str) -> int:
    """Position of a type in the ADS push order; unknown types go last."""
    try:
        return ADS_ORDER.index(type_url)
    except ValueError:
        return len(ADS_ORDER)


@dataclass(frozen=True, slots=True)
class Resource:
    """One named resource as cached: the message, its serialized bytes and the version it last changed at."""

    name: str
    message: Message
    version: str
    serialized: bytes

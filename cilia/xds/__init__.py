"""cilia.xds: a generic xDS server (knows type URLs, names, messages and versions; no policy).

    Cache --watch--> SotwStream / DeltaStream --Observer--> AckTracker.wait()
                         ^ requests, v responses
                      XdsServer (grpcio: ADS + LDS/RDS/CDS/EDS/SDS, mTLS TCP or owner-only unix:)

Nothing here imports any other part of cilia; ``grpcserver`` (the grpcio server on TCP or
UNIX addresses) is shared with the agent's other Envoy-facing services.
"""

from .acks import AckState, AckTracker, NackError
from .cache import Cache, TypeChange, Update, View, version_key
from .consistency import Inconsistencies, check
from .server import ServerTls, XdsServer
from .sockets import bind_unix, socket_mode
from .stream import DeltaStream, IdentityError, Observer, SotwStream
from .types import ADS_ORDER, CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET, Resource

__all__ = [
    "ADS_ORDER",
    "AckState",
    "AckTracker",
    "CLUSTER",
    "Cache",
    "Inconsistencies",
    "DeltaStream",
    "IdentityError",
    "ENDPOINT",
    "LISTENER",
    "NackError",
    "Observer",
    "ROUTE",
    "Resource",
    "SECRET",
    "ServerTls",
    "SotwStream",
    "TypeChange",
    "Update",
    "View",
    "XdsServer",
    "bind_unix",
    "check",
    "socket_mode",
    "version_key",
]

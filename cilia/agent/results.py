"""What the agent's operations return, as typed values; ``api.render`` makes the JSON the REST
API and the CLI read (the shapes documented in openapi.yaml)."""

from __future__ import annotations

from dataclasses import dataclass

from ..services.model import Service
from ..specs import EndpointSpec, PolicyKey


@dataclass(frozen=True)
class PolicyInfo:
    kind: str
    namespace: str | None
    name: str
    rules: int
    file: str
    line: int
    audit: bool
    notes: tuple[str, ...] = ()  # what the policy asks for that is accepted but not enforced (fails closed)
    labels: tuple[str, ...] = ()  # its metadata labels, Cilium's derived ones and its rules' (for -l)


@dataclass(frozen=True)
class Policies:
    """The policies in force (or just imported) at ``revision``."""

    revision: int
    policies: tuple[PolicyInfo, ...]


@dataclass(frozen=True)
class PoliciesDeleted:
    revision: int
    deleted: tuple[PolicyKey, ...]


@dataclass(frozen=True)
class EndpointInfo:
    spec: EndpointSpec
    identity: int | None  # None while it waits for a cluster-wide identity (issue 13)
    identity_labels: tuple[str, ...]
    enforced_ingress: bool
    enforced_egress: bool
    audit_ingress: bool
    audit_egress: bool
    state: str = "ready"  # or "waiting-for-identity" (Cilium's endpoint states): all its traffic dropped


@dataclass(frozen=True)
class EndpointAdded:
    revision: int
    endpoint: EndpointInfo


@dataclass(frozen=True)
class Revision:
    """A change that only moved the revision (an endpoint removed)."""

    revision: int


@dataclass(frozen=True)
class Endpoints:
    endpoints: tuple[EndpointInfo, ...]


@dataclass(frozen=True)
class IdentityInfo:
    id: int
    kind: str
    labels: tuple[str, ...]
    prefix: str | None


@dataclass(frozen=True)
class Identities:
    identities: tuple[IdentityInfo, ...]


@dataclass(frozen=True)
class Realized:
    """Every proxy in ``proxies`` has acked ``revision`` (or a later one)."""

    revision: int
    proxies: tuple[str, ...]


@dataclass(frozen=True)
class Services:
    """The services in force at ``revision`` (by id)."""

    revision: int
    services: tuple[Service, ...]


@dataclass(frozen=True)
class ServiceUpdated:
    revision: int
    service: Service


Result = (Policies | PoliciesDeleted | EndpointAdded | Revision | Endpoints | Identities | Realized | Services
          | ServiceUpdated)

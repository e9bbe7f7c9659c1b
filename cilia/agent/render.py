"""The JSON form of the agent's results: what the REST API sends and ``cilia -o json`` prints."""

from __future__ import annotations

from functools import singledispatch
from typing import Any

from .results import (
    EndpointAdded,
    EndpointInfo,
    Endpoints,
    Identities,
    Policies,
    PoliciesDeleted,
    PolicyInfo,
    Realized,
    Revision,
    Services,
    ServiceUpdated,
)
from ..services.model import Service
from ..services.validate import service_to_json


@singledispatch
def render(result: Any) -> Any:
    """A result as JSON values; views that are already JSON-shaped (status, flows) pass through."""
    return result


@render.register
def _policy(p: PolicyInfo) -> dict[str, Any]:
    return {"kind": p.kind, "namespace": p.namespace, "name": p.name, "rules": p.rules, "file": p.file,
            "line": p.line, "audit": p.audit, "notes": list(p.notes), "labels": list(p.labels)}


@render.register
def _policies(r: Policies) -> dict[str, Any]:
    return {"revision": r.revision, "policies": [_policy(p) for p in r.policies]}


@render.register
def _deleted(r: PoliciesDeleted) -> dict[str, Any]:
    return {"revision": r.revision, "deleted": [list(k) for k in r.deleted]}


@render.register
def _endpoint(e: EndpointInfo) -> dict[str, Any]:
    return {**e.spec.to_json(), "identity": e.identity, "state": e.state, "identity_labels": list(e.identity_labels),
            "enforcement": {"ingress": e.enforced_ingress, "egress": e.enforced_egress},
            "audit_mode": {"ingress": e.audit_ingress, "egress": e.audit_egress}}


@render.register
def _endpoint_added(r: EndpointAdded) -> dict[str, Any]:
    return {"revision": r.revision, "endpoint": _endpoint(r.endpoint)}


@render.register
def _revision(r: Revision) -> dict[str, Any]:
    return {"revision": r.revision}


@render.register
def _endpoints(r: Endpoints) -> dict[str, Any]:
    return {"endpoints": [_endpoint(e) for e in r.endpoints]}


@render.register
def _identities(r: Identities) -> dict[str, Any]:
    return {"identities": [{"id": i.id, "kind": i.kind, "labels": list(i.labels), "prefix": i.prefix}
                           for i in r.identities]}


@render.register
def _realized(r: Realized) -> dict[str, Any]:
    return {"revision": r.revision, "proxies": list(r.proxies)}


@render.register
def _service(s: Service) -> dict[str, Any]:
    return service_to_json(s)


@render.register
def _services(r: Services) -> dict[str, Any]:
    return {"revision": r.revision, "services": [service_to_json(s) for s in r.services]}


@render.register
def _service_updated(r: ServiceUpdated) -> dict[str, Any]:
    return {"revision": r.revision, "service": service_to_json(r.service)}

"""Kubernetes Services and discovery.k8s.io/v1 EndpointSlices → cilia services (pure).

One Service becomes one cilia service per port and frontend: its ClusterIP (``clusterIPs``, IPv4
only), and with type NodePort or LoadBalancer also ``0.0.0.0:nodePort`` (type NodePort: every
node address). Headless (clusterIP None) and ExternalName services have no frontend here. The
backends are the addresses of the EndpointSlices labelled ``kubernetes.io/service-name`` with
the Service's name, in its namespace:

- port: the slice's port of the same name (the endpoint-slice controller resolved the target
  port, named or not), else the Service port's numeric ``targetPort`` (or its ``port``), else a
  named ``targetPort`` looked up in the backend pod's container ports (``targetRef``);
- state, from the endpoint's conditions: ready → ``active``; terminating → ``terminating``
  (its connections finish, it gets no new ones); otherwise ``not-ready``. A condition that is
  absent counts as ready / not terminating, as Kubernetes says consumers should read it.

``sessionAffinity: ClientIP`` gives ``affinity_seconds`` (``timeoutSeconds``, default 10800).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from ..services.model import Backend, BackendState, Frontend, Service
from ..services.validate import (
    MAX_AFFINITY_SECONDS,
    MAX_BACKENDS,
    ServiceError,
    check_services,
    service_from_json,
    service_to_json,
)
from .convert import ConvertError, _list, _map, object_key, object_labels

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
DEFAULT_AFFINITY_SECONDS = 10800  # Kubernetes' default sessionAffinityConfig.clientIP.timeoutSeconds
_PROTOCOLS = ("TCP", "UDP")

Pods = Mapping[tuple[str, str], Mapping[str, Any]]


def slice_service(slice_: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, service name) an EndpointSlice belongs to, or None (not a Service's)."""
    name = object_labels(slice_).get(SERVICE_NAME_LABEL)
    if not name:
        return None
    return object_key(slice_)[0] or "default", name


def _ipv4(text: Any) -> str | None:
    try:
        address = ipaddress.ip_address(str(text))
    except ValueError:
        return None
    return str(address) if address.version == 4 else None


def _state(conditions: Mapping[str, Any]) -> BackendState:
    if conditions.get("terminating") is True:
        return "terminating"
    if conditions.get("ready") is False:
        return "not-ready"
    return "active"


def _named_port(pods: Pods, ref: Mapping[str, Any], name: str, protocol: str) -> int | None:
    if ref.get("kind") != "Pod":
        return None
    pod = pods.get((str(ref.get("namespace") or ""), str(ref.get("name") or "")))
    for container in _list(_map(_map(pod).get("spec")).get("containers")):
        for port in _list(_map(container).get("ports")):
            port = _map(port)
            if port.get("name") == name and str(port.get("protocol") or "TCP").upper() == protocol \
                    and isinstance(port.get("containerPort"), int):
                return int(port["containerPort"])
    return None


def _backends(port: Mapping[str, Any], protocol: str, slices: Iterable[Mapping[str, Any]],
              pods: Pods) -> tuple[Backend, ...]:
    name = port.get("name") or ""
    target = port.get("targetPort", port.get("port"))
    out: dict[tuple[str, int], Backend] = {}
    for slice_ in slices:
        if slice_.get("addressType", "IPv4") != "IPv4":
            continue
        number = next((p.get("port") for p in map(_map, _list(slice_.get("ports")))
                       if (p.get("name") or "") == name and str(p.get("protocol") or "TCP").upper() == protocol), None)
        for endpoint in map(_map, _list(slice_.get("endpoints"))):
            backend_port = number if isinstance(number, int) else (target if isinstance(target, int) else None)
            if backend_port is None and isinstance(target, str):
                backend_port = _named_port(pods, _map(endpoint.get("targetRef")), target, protocol)
            if backend_port is None or not 1 <= backend_port <= 65535:
                continue  # the named port is unknown (yet): no backend rather than a wrong one
            state = _state(_map(endpoint.get("conditions")))
            for address in _list(endpoint.get("addresses")):
                ip = _ipv4(address)
                if ip is not None:
                    out.setdefault((ip, backend_port), Backend(ip, backend_port, 1, state))
    return tuple(sorted(out.values(), key=lambda b: (ipaddress.ip_address(b.address), b.port)))


def k8s_services(svc: Mapping[str, Any], slices: Sequence[Mapping[str, Any]], pods: Pods) -> list[Service]:
    """The cilia services (id 0: the agent numbers them) one Kubernetes Service stands for.
    Raises ConvertError naming the field when the agent could not hold them."""
    namespace, name = object_key(svc)
    namespace = namespace or "default"
    spec = _map(svc.get("spec"))
    kind = spec.get("type") or "ClusterIP"
    if kind == "ExternalName":
        return []
    cluster_ips = [ip for ip in (_ipv4(x) for x in (_list(spec.get("clusterIPs")) or [spec.get("clusterIP")])) if ip]
    affinity = 0
    if spec.get("sessionAffinity") == "ClientIP":
        timeout = _map(_map(spec.get("sessionAffinityConfig")).get("clientIP")).get("timeoutSeconds")
        affinity = timeout if isinstance(timeout, int) else DEFAULT_AFFINITY_SECONDS
        if not 1 <= affinity <= MAX_AFFINITY_SECONDS:
            raise ConvertError(f"spec.sessionAffinityConfig.clientIP.timeoutSeconds: {affinity} is outside "
                               f"1-{MAX_AFFINITY_SECONDS}")
    labels = tuple(sorted(object_labels(svc).items()))
    out: list[Service] = []
    for i, port in enumerate(map(_map, _list(spec.get("ports")))):
        protocol = str(port.get("protocol") or "TCP").upper()
        if protocol not in _PROTOCOLS:
            continue  # SCTP: the load balancer does TCP and UDP
        backends = _backends(port, protocol, slices, pods)
        if len(backends) > MAX_BACKENDS:
            raise ConvertError(f"spec.ports[{i}]: {len(backends)} backends; a service holds at most {MAX_BACKENDS}")
        frontends: list[tuple[str, Any, str]] = [(ip, port.get("port"), "ClusterIP") for ip in cluster_ips]
        if kind in ("NodePort", "LoadBalancer") and port.get("nodePort"):
            frontends.append(("0.0.0.0", port.get("nodePort"), "NodePort"))
        for address, number, service_type in frontends:
            raw = service_to_json(Service(1, Frontend(address, 1, protocol),  # type: ignore[arg-type]
                                          backends, "maglev", affinity, service_type,  # type: ignore[arg-type]
                                          name, namespace, labels))
            raw["frontend"]["port"] = number
            try:
                service = service_from_json(raw)  # every field checked as the API checks it
                check_services(service, out, {})
            except ServiceError as e:
                where = f"spec.ports[{i}]" + (".nodePort" if service_type == "NodePort" else "")
                raise ConvertError(f"{where}: {e}") from None
            out.append(replace(service, id=0))
    return out

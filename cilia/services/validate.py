"""Checking services before anything is applied: pure, every error names the field.

A service comes in three ways (the REST API's JSON, the CLI's flags, the Kubernetes watcher), so
the JSON form is the one all of them go through: ``service_from_json`` reads it and checks each
field on its own, ``check_services`` checks a service against the rest (frontends that clash with
an endpoint's address or another service's frontend). IPv4 only, as the datapath.

Limits of the BPF load balancer's maps (``cilia.bpf.loader``; tests/services checks they agree):
service ids below its ``LB_SERVICES_MAX``, per service at most a quarter of a Maglev row
(``LB_TABLE_SIZE // 4``: every backend gets a few slots), and ``LB_BACKENDS_MAX`` in all.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping
from typing import Any, get_args

from .model import Algorithm, Backend, BackendState, Frontend, Protocol, Service, ServiceType

MAX_SERVICE_ID = 16383
MAX_BACKENDS = 255  # per service
MAX_BACKENDS_TOTAL = 65536  # in all services
MAX_WEIGHT = 65535
MAX_AFFINITY_SECONDS = 86400  # Kubernetes' own limit for sessionAffinityConfig.clientIP.timeoutSeconds

ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
STATES: tuple[str, ...] = get_args(BackendState)
TYPES: tuple[str, ...] = get_args(ServiceType)

_ADDRESS_PORT = re.compile(r"^(?P<address>[0-9.]+):(?P<port>\d+)(?:/(?P<proto>[A-Za-z]+))?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


class ServiceError(ValueError):
    """Bad service input; ``field`` is where (``frontend.port``, ``backends[2].weight``, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


# ------------------------------------------------------------------ fields


def _ipv4(value: object, field: str, unspecified_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise ServiceError(field, f"expected an IPv4 address, got {value!r}")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ServiceError(field, f"{value!r} is not an IP address") from None
    if address.version != 4:
        raise ServiceError(field, f"{value} is IPv6; services are IPv4 only")
    if address.is_unspecified and not unspecified_ok:
        raise ServiceError(field, f"{value} is not an address a connection can go to")
    if address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
        raise ServiceError(field, f"{value} is a multicast/broadcast address")
    return str(address)


def _integer(value: object, field: str, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ServiceError(field, f"expected {what} (an integer {low}-{high}), got {value!r}")
    if not low <= value <= high:
        raise ServiceError(field, f"{value} is outside {low}-{high}")
    return value


def _choice(value: object, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ServiceError(field, f"{value!r} is not one of {', '.join(choices)}")
    return str(value)


def _object(value: object, field: str, keys: Iterable[str]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ServiceError(field, f"expected an object, got {value!r}")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ServiceError(f"{field}.{unknown[0]}" if field else unknown[0],
                           f"unknown field (known: {', '.join(sorted(keys))})")
    return value


def _at(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


_FRONTEND_KEYS = ("address", "port", "protocol")
_BACKEND_KEYS = ("address", "port", "weight", "state")
_SERVICE_KEYS = ("id", "frontend", "backends", "algorithm", "affinity_seconds", "type", "name", "namespace",
                 "labels")


def frontend_from_json(value: object, field: str = "frontend") -> Frontend:
    d = _object(value, field, _FRONTEND_KEYS)
    for key in ("address", "port"):
        if key not in d:
            raise ServiceError(_at(field, key), "required")
    protocol = _choice(str(d.get("protocol", "TCP")).upper(), _at(field, "protocol"), PROTOCOLS)
    return Frontend(_ipv4(d["address"], _at(field, "address"), unspecified_ok=True),
                    _integer(d["port"], _at(field, "port"), 1, 65535, "a port"),
                    protocol)  # type: ignore[arg-type]


def backend_from_json(value: object, field: str) -> Backend:
    d = _object(value, field, _BACKEND_KEYS)
    for key in ("address", "port"):
        if key not in d:
            raise ServiceError(_at(field, key), "required")
    return Backend(_ipv4(d["address"], _at(field, "address")),
                   _integer(d["port"], _at(field, "port"), 1, 65535, "a port"),
                   _integer(d.get("weight", 1), _at(field, "weight"), 1, MAX_WEIGHT, "a positive weight"),
                   _choice(d.get("state", "active"), _at(field, "state"), STATES))  # type: ignore[arg-type]


def _labels(value: object, field: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ServiceError(field, f"expected an object of label key: value, got {value!r}")
    for key, label in value.items():
        if not isinstance(key, str) or not _LABEL_KEY.match(key) or len(key) > 316:
            raise ServiceError(f"{field}.{key}", "not a label key")
        if not isinstance(label, str) or len(label) > 63:
            raise ServiceError(f"{field}.{key}", f"expected a label value (a string of at most 63), got {label!r}")
    return tuple(sorted(value.items()))


def service_from_json(value: object) -> Service:
    """A service from its JSON form (openapi.yaml's Service), each field checked on its own."""
    d = _object(value, "", _SERVICE_KEYS)
    if "id" not in d:
        raise ServiceError("id", "required")
    service_id = _integer(d["id"], "id", 1, MAX_SERVICE_ID, "a service id")
    if "frontend" not in d:
        raise ServiceError("frontend", "required")
    frontend = frontend_from_json(d["frontend"])
    raw = d.get("backends", [])
    if not isinstance(raw, list):
        raise ServiceError("backends", f"expected a list, got {raw!r}")
    if len(raw) > MAX_BACKENDS:
        raise ServiceError("backends", f"{len(raw)} backends; a service holds at most {MAX_BACKENDS}")
    backends = tuple(backend_from_json(b, f"backends[{i}]") for i, b in enumerate(raw))
    seen: dict[tuple[str, int], int] = {}
    for i, b in enumerate(backends):
        first = seen.setdefault((b.address, b.port), i)
        if first != i:
            raise ServiceError(f"backends[{i}]", f"{b} is already backends[{first}]")
    algorithm = _choice(d.get("algorithm", "maglev"), "algorithm", ALGORITHMS)
    affinity = _integer(d.get("affinity_seconds", 0), "affinity_seconds", 0, MAX_AFFINITY_SECONDS,
                        "seconds of session affinity")
    service_type = _choice(d.get("type", "ClusterIP"), "type", TYPES)
    if frontend.address == "0.0.0.0" and service_type != "NodePort":
        raise ServiceError("frontend.address", "0.0.0.0 (every node address) is for type NodePort only")
    strings = {}
    for key in ("name", "namespace"):
        text = d.get(key, "")
        if not isinstance(text, str) or len(text) > 253:
            raise ServiceError(key, f"expected a name (a string of at most 253), got {text!r}")
        strings[key] = text
    if strings["namespace"] and not strings["name"]:
        raise ServiceError("namespace", "a namespace without a name")
    return Service(service_id, frontend, backends, algorithm, affinity,  # type: ignore[arg-type]
                   service_type, strings["name"], strings["namespace"],  # type: ignore[arg-type]
                   _labels(d.get("labels", {}), "labels"))


def service_to_json(s: Service) -> dict[str, Any]:
    return {"id": s.id,
            "frontend": {"address": s.frontend.address, "port": s.frontend.port, "protocol": s.frontend.protocol},
            "backends": [{"address": b.address, "port": b.port, "weight": b.weight, "state": b.state}
                         for b in s.backends],
            "algorithm": s.algorithm, "affinity_seconds": s.affinity_seconds, "type": s.type,
            "name": s.name, "namespace": s.namespace, "labels": dict(s.labels)}


# ------------------------------------------------------------------ the CLI's text forms


def parse_frontend(text: str) -> dict[str, Any]:
    """``IP:PORT[/PROTO]`` as the JSON form (checked later with the rest of the service)."""
    m = _ADDRESS_PORT.match(text.strip())
    if m is None:
        raise ServiceError("frontend", f"{text!r}: expected IP:PORT[/PROTO], e.g. 10.96.0.10:80/TCP")
    out: dict[str, Any] = {"address": m["address"], "port": int(m["port"])}
    if m["proto"]:
        out["protocol"] = m["proto"].upper()
    return out


def parse_backends(text: str, weights: str | None = None) -> list[dict[str, Any]]:
    """``IP:PORT[,IP:PORT...]`` and, if given, ``W[,W...]`` (one per backend) as the JSON form."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        m = _ADDRESS_PORT.match(item)
        if m is None or m["proto"]:
            raise ServiceError(f"backends[{i}]", f"{item!r}: expected IP:PORT, e.g. 10.0.0.10:8080")
        out.append({"address": m["address"], "port": int(m["port"])})
    if weights is not None:
        given = [w.strip() for w in weights.split(",")]
        if len(given) != len(out):
            raise ServiceError("weights", f"{len(given)} weights for {len(out)} backends")
        for i, w in enumerate(given):
            if not w.isdigit():
                raise ServiceError(f"backends[{i}].weight", f"{w!r} is not a positive integer")
            out[i]["weight"] = int(w)
    return out


# ------------------------------------------------------------------ against the others


def check_services(service: Service, others: Iterable[Service], endpoint_ips: Mapping[str, str],
                   replacing: Collection[int] = (), backends_elsewhere: int = 0) -> None:
    """``service`` may join ``others`` (those with its id or in ``replacing`` are replaced): its
    frontend is no endpoint's address (``endpoint_ips``: address -> endpoint name) and no other
    service's frontend, and the ``backends_elsewhere`` (in the services it does not replace) and
    its own fit the backend map."""
    if backends_elsewhere + len(service.backends) > MAX_BACKENDS_TOTAL:
        raise ServiceError("backends", f"{len(service.backends)} more backends than the {MAX_BACKENDS_TOTAL} all "
                                       f"services may have ({backends_elsewhere} are taken)")
    owner = endpoint_ips.get(service.frontend.address)
    if owner is not None:
        raise ServiceError("frontend.address", f"{service.frontend.address} is endpoint {owner}'s address")
    port = service.frontend.port
    for other in others:
        if other.frontend.port != port or other.id == service.id or other.id in replacing:
            continue  # the port first: 10,000 services are checked at every change
        if _clash(service.frontend, other.frontend):
            raise ServiceError("frontend", f"{service.frontend} is already service {other.id}'s frontend "
                                           f"({other.frontend})")


def _clash(a: Frontend, b: Frontend) -> bool:
    """The same (address, port, protocol) in the load balancer's map; 0.0.0.0 (NodePort on every
    node address) takes that port on all of them."""
    if a.port != b.port or a.protocol != b.protocol:
        return False
    return a.address == b.address or "0.0.0.0" in (a.address, b.address)

"""The address a delegated IPAM plugin handed out, read from its CNI result of any version.

CNI 0.3.0 to 1.0.0 results list ``ips`` (``address`` in CIDR notation, optional ``gateway``),
``routes`` (``dst``, optional ``gw``) and ``dns``; 0.1.0 and 0.2.0 results carry one ``ip4`` and
one ``ip6`` object (``ip``, ``gateway``, ``routes``) instead. An IPAM plugin answers in the
configuration's cniVersion when it can and in an older one when it cannot, so both are read.

The endpoint gets the first IPv4 address (the BPF datapath is IPv4). Its gateway is that
address's ``gateway``, else the ``gw`` of an IPv4 default route, else none.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any


class ResultError(ValueError):
    pass


@dataclass(frozen=True)
class Lease:
    address: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address | None
    dns: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None


def parse_result(result: object) -> Lease:
    """The endpoint's lease from an IPAM plugin's result; ResultError names the bad field."""
    if not isinstance(result, dict):
        raise ResultError("result: expected a JSON object")
    if "ips" in result:
        entries = [_entry(ip, f"ips[{i}]", "address") for i, ip in enumerate(_list(result, "ips", "result"))]
        routes = _list(result, "routes", "result")
    else:  # CNI 0.1.0 / 0.2.0
        entries, routes = [], []
        for family in ("ip4", "ip6"):
            if result.get(family) is not None:
                entries.append(_entry(result[family], family, "ip"))
                routes += _list(result[family], "routes", family)
    v4 = [e for e in entries if e.address.version == 4]
    if not v4:
        found = ", ".join(str(e.address) for e in entries) or "none"
        raise ResultError(f"result: no IPv4 address (the endpoint needs one; addresses: {found})")
    gateway = v4[0].gateway if v4[0].gateway is not None else _default_gateway(routes)
    if gateway is not None and gateway.version != 4:
        raise ResultError(f"result: gateway {gateway} of {v4[0].address} is not IPv4")
    dns = result.get("dns")
    dns = {} if dns is None else dns
    if not isinstance(dns, dict):
        raise ResultError("result: dns: expected an object")
    return Lease(ipaddress.IPv4Address(str(v4[0].address.ip)),
                 ipaddress.IPv4Address(str(gateway)) if gateway is not None else None, dns)


def _list(obj: dict[str, Any], key: str, where: str) -> list[Any]:
    value = obj.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ResultError(f"{where}.{key}: expected a list")
    return value


def _entry(obj: object, where: str, key: str) -> _Entry:
    if not isinstance(obj, dict):
        raise ResultError(f"{where}: expected an object")
    try:
        address = ipaddress.ip_interface(str(obj[key]))
    except KeyError:
        raise ResultError(f"{where}.{key}: required") from None
    except ValueError:
        raise ResultError(f"{where}.{key} {obj[key]!r}: expected an address in CIDR notation") from None
    gateway = _address(obj.get("gateway"), f"{where}.gateway")
    return _Entry(address, gateway)


def _address(value: object, where: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if value is None or value == "":
        return None
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise ResultError(f"{where} {value!r}: expected an IP address") from None


def _default_gateway(routes: list[Any]) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    for i, route in enumerate(routes):
        if not isinstance(route, dict):
            raise ResultError(f"routes[{i}]: expected an object")
        if route.get("dst") == "0.0.0.0/0":
            gw = _address(route.get("gw"), f"routes[{i}].gw")
            if gw is not None:
                return gw
    return None

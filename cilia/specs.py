"""Endpoint and port specs as the user gives them, shared by the agent, its CLI, CNI and k8s.

A leaf module (it imports only ``cilia.policy``) so that ``cilia-cni``, the CLI and the Kubernetes
converter can build and check specs without loading the agent.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from .policy import Protocol

PolicyKey = tuple[str, str, str]  # (kind, namespace, name) as cilia.policy.Policy.key

_PORT = re.compile(r"^(?:(?P<name>[a-z0-9]([-a-z0-9]*[a-z0-9])?)=)?(?P<port>\d+)(?:/(?P<proto>[A-Za-z]+))?"
                   r"(?::(?P<backend>\d+))?$")


class StateError(ValueError):
    """Bad endpoint or state input; the message names the field."""


_PORT_PROTOCOLS = {p.name: p for p in (Protocol.TCP, Protocol.UDP, Protocol.SCTP)}


def _protocol(name: str, where: str) -> Protocol:
    try:
        return _PORT_PROTOCOLS[name.upper()]
    except KeyError:
        raise StateError(f"port {where!r}: unknown protocol {name!r} (TCP, UDP, SCTP)") from None


@dataclass(frozen=True, slots=True)
class PortSpec:
    """A port an endpoint serves: the policy's port, and where the app really listens.

    Without BPF redirection (sidecar mode) Envoy listens on the endpoint's address at ``port``
    and forwards to the app at ``backend``; the two must differ there."""

    port: int
    protocol: Protocol = Protocol.TCP
    backend: int | None = None
    name: str | None = None

    @property
    def app_port(self) -> int:
        return self.backend if self.backend is not None else self.port

    @classmethod
    def parse(cls, text: str) -> PortSpec:
        """``[NAME=]PORT[/PROTO][:BACKEND]``, e.g. ``80``, ``http=80/TCP:8080``."""
        m = _PORT.match(text.strip())
        if m is None:
            raise StateError(f"port {text!r}: expected [NAME=]PORT[/PROTO][:BACKEND], e.g. 80 or http=80:8080")
        proto = _protocol(m["proto"] or "TCP", text)
        port = int(m["port"])
        backend = int(m["backend"]) if m["backend"] else None
        for what, value in (("port", port), ("backend port", backend)):
            if value is not None and not 1 <= value <= 65535:
                raise StateError(f"port {text!r}: {what} {value} is outside 1-65535")
        return cls(port, proto, backend, m["name"])

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "protocol": self.protocol.name, "backend": self.backend, "name": self.name}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PortSpec:
        return cls(int(d["port"]), _protocol(str(d.get("protocol", "TCP")), str(d["port"])), d.get("backend"),
                   d.get("name"))

    def __str__(self) -> str:
        text = f"{self.name}={self.port}" if self.name else str(self.port)
        if self.protocol is not Protocol.TCP:
            text += f"/{self.protocol.name}"
        return text + (f":{self.backend}" if self.backend is not None else "")


MAX_NAME = 320  # a pod name (253) "." its namespace (63), as the Kubernetes watcher and CNI name them
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,318}[A-Za-z0-9])?")  # 1-MAX_NAME characters
_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")  # \Z: "$" would let a trailing newline through
_NETNS = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """An endpoint as the user registered it.

    With the BPF datapath, ``interface`` is the host end of the endpoint's veth (where the
    programs attach) and ``netns`` its network namespace. ``create`` asks the agent to make the
    namespace and veth pair itself; it then owns them (``managed``) and deletes them with the
    endpoint. Without ``create`` they are adopted as they are and left in place on delete."""

    name: str
    labels: tuple[str, ...]
    ips: tuple[str, ...]
    ports: tuple[PortSpec, ...] = ()
    interface: str | None = None
    netns: str | None = None
    create: bool = False
    managed: bool = False
    audit: bool = False  # audit mode: what its policy would drop is let through and reported as AUDIT

    def __post_init__(self) -> None:
        if not self.name:
            raise StateError("endpoint name: must not be empty")
        if not _NAME.fullmatch(self.name) or ".." in self.name:
            raise StateError(f"endpoint name {self.name[:80]!r}: use 1-{MAX_NAME} letters, digits, '-', '_' and "
                             "'.', starting and ending with a letter or digit, without '..' (it names files, "
                             "listeners and xDS nodes)")
        for ip in self.ips:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                raise StateError(f"endpoint {self.name}: ip {ip!r} is not an IP address") from None
        seen: set[tuple[int, Protocol]] = set()
        for p in self.ports:
            if (p.port, p.protocol) in seen:
                raise StateError(f"endpoint {self.name}: port {p.port}/{p.protocol.name} given twice")
            seen.add((p.port, p.protocol))
        if self.interface is not None and not _IFNAME.match(self.interface):
            raise StateError(f"endpoint {self.name}: interface {self.interface!r} is not an interface name "
                             "(1-15 letters, digits, '_', '.', '-')")
        if self.netns is not None and (not _NETNS.match(self.netns) or self.netns in (".", "..")):
            raise StateError(f"endpoint {self.name}: netns {self.netns!r} is not a namespace name")
        if self.create and len(self.ips) != 1:
            raise StateError(f"endpoint {self.name}: create: needs exactly one ip for the new namespace")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "labels": list(self.labels), "ips": list(self.ips),
                               "ports": [p.to_json() for p in self.ports]}
        for key in ("interface", "netns"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.create:
            out["create"] = True
        if self.managed:
            out["managed"] = True
        if self.audit:
            out["audit"] = True
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> EndpointSpec:
        if not isinstance(d, dict):
            raise StateError("endpoint: expected an object")
        try:
            return cls(str(d["name"]), tuple(str(x) for x in d.get("labels", ())),
                       tuple(str(x) for x in d.get("ips", ())),
                       tuple(PortSpec.from_json(p) if isinstance(p, dict) else PortSpec.parse(str(p))
                             for p in d.get("ports", ())),
                       _opt_str(d, "interface"), _opt_str(d, "netns"), bool(d.get("create", False)),
                       bool(d.get("managed", False)), bool(d.get("audit", False)))
        except KeyError as e:
            raise StateError(f"endpoint: missing field {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, StateError):
                raise
            raise StateError(f"endpoint: {e}") from None


def _opt_str(d: dict[str, Any], key: str) -> str | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise StateError(f"endpoint: {key}: expected a string")
    return value

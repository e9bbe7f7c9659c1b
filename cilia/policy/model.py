"""The policy model: CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy as typed,
immutable values, faithful to the YAML (namespace scoping and other derived
semantics are applied later, by ``compile``).

Every element keeps the ``SourceRef`` of the YAML it came from, so any verdict can
name the file and line that decided it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, IntEnum

from .errors import SourceRef
from .selectors import LabelSelector

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Protocol(IntEnum):
    """IP protocol numbers; ANY (0) is the wildcard."""

    ANY = 0
    ICMP = 1
    TCP = 6
    UDP = 17
    ICMPV6 = 58
    SCTP = 132

    @property
    def label(self) -> str:
        return "ICMPv6" if self is Protocol.ICMPV6 else self.name


PORT_PROTOCOLS = (Protocol.TCP, Protocol.UDP, Protocol.SCTP)


class Direction(str, Enum):
    INGRESS = "ingress"
    EGRESS = "egress"

    def __str__(self) -> str:
        return self.value


class PolicyKind(str, Enum):
    CNP = "CiliumNetworkPolicy"
    CCNP = "CiliumClusterwideNetworkPolicy"

    def __str__(self) -> str:
        return self.value


# --- L4 --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PortProtocol:
    """One ``ports[]`` item. ``port`` is a number (0 = all ports) or a named port."""

    port: int | None
    name: str | None
    end_port: int | None
    protocol: Protocol
    source: SourceRef

    def __str__(self) -> str:
        what = self.name if self.name is not None else str(self.port)
        if self.end_port is not None and self.port is not None:
            what = f"{self.port}-{self.end_port}"
        return f"{what}/{self.protocol.label}"


@dataclass(frozen=True, slots=True)
class ICMPField:
    family: str  # "IPv4" | "IPv6"
    type: int
    source: SourceRef

    @property
    def protocol(self) -> Protocol:
        return Protocol.ICMPV6 if self.family == "IPv6" else Protocol.ICMP


@dataclass(frozen=True, slots=True)
class TLSContext:
    secret_namespace: str | None
    secret_name: str | None
    trusted_ca: str | None
    certificate: str | None
    private_key: str | None
    source: SourceRef


# --- L7 --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    """``headerMatches[]`` item; ``value`` None means "present"."""

    name: str
    value: str | None
    secret: tuple[str, str] | None  # (namespace, name)
    mismatch: str | None  # LOG | ADD | DELETE | REPLACE
    source: SourceRef


@dataclass(frozen=True, slots=True)
class HTTPRule:
    """``http[]`` item: regexes are RE2, matched against the whole value."""

    method: str | None
    path: str | None
    host: str | None
    headers: tuple[tuple[str, str | None], ...]  # (name, exact value or None = present)
    header_matches: tuple[HeaderMatch, ...]
    source: SourceRef


@dataclass(frozen=True, slots=True)
class KafkaRule:
    """``kafka[]`` item; ``api_keys`` is the expansion of role / apiKey (empty = any)."""

    role: str | None
    api_key: str | None
    api_keys: frozenset[int]
    api_version: int | None
    client_id: str | None
    topic: str | None
    source: SourceRef


@dataclass(frozen=True, slots=True)
class DNSRule:
    match_name: str | None
    match_pattern: str | None
    source: SourceRef


@dataclass(frozen=True, slots=True)
class GenericL7Rule:
    """One ``l7[]`` item of an ``l7proto`` parser: a flat key/value map."""

    fields: tuple[tuple[str, str], ...]
    source: SourceRef

    def as_dict(self) -> dict[str, str]:
        return dict(self.fields)


L7Rule = HTTPRule | KafkaRule | DNSRule | GenericL7Rule


@dataclass(frozen=True, slots=True)
class L7Rules:
    """The ``rules:`` of a port rule: one protocol and its rules (ORed).

    ``protocol`` is ``http``, ``kafka``, ``dns`` or an ``l7proto`` parser name.
    No rules at all means every request of that protocol is allowed.
    """

    protocol: str
    rules: tuple[L7Rule, ...]
    source: SourceRef


@dataclass(frozen=True, slots=True)
class PortRule:
    """``toPorts[]`` item."""

    ports: tuple[PortProtocol, ...]
    rules: L7Rules | None
    terminating_tls: TLSContext | None
    originating_tls: TLSContext | None
    server_names: tuple[str, ...]
    listener: Mapping[str, object] | None
    source: SourceRef


# --- L3 peers ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CIDRRule:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...]
    source: SourceRef


@dataclass(frozen=True, slots=True)
class FQDNSelector:
    match_name: str | None
    match_pattern: str | None
    source: SourceRef


@dataclass(frozen=True, slots=True)
class ServiceSelector:
    """``toServices[]``: by name or by label selector, in a namespace."""

    name: str | None
    selector: LabelSelector | None
    namespace: str | None
    source: SourceRef


@dataclass(frozen=True, slots=True)
class PeerRule:
    """One item of ``ingress``/``ingressDeny``/``egress``/``egressDeny``.

    ``None`` means the field was absent. Peer fields are mutually exclusive
    (validated). ``unenforced_peers`` names peer kinds that need subsystems cilia
    does not have yet (toFQDNs, toServices, groups, nodes).
    """

    direction: Direction
    deny: bool
    endpoints: tuple[LabelSelector, ...] | None
    requires: tuple[LabelSelector, ...]
    cidrs: tuple[CIDRRule, ...] | None
    entities: tuple[str, ...] | None
    fqdns: tuple[FQDNSelector, ...] | None
    services: tuple[ServiceSelector, ...] | None
    unenforced_peers: tuple[str, ...]
    to_ports: tuple[PortRule, ...] | None
    icmps: tuple[ICMPField, ...] | None
    authentication: str | None
    path: str
    source: SourceRef

    @property
    def section(self) -> str:
        base = "ingress" if self.direction is Direction.INGRESS else "egress"
        return base + ("Deny" if self.deny else "")

    def has_l3(self) -> bool:
        return any(
            x is not None
            for x in (self.endpoints, self.cidrs, self.entities, self.fqdns, self.services)
        ) or bool(self.unenforced_peers)

    def has_l4(self) -> bool:
        return self.to_ports is not None or self.icmps is not None


@dataclass(frozen=True, slots=True)
class DefaultDeny:
    """``enableDefaultDeny``: None means "the default" (true)."""

    ingress: bool | None = None
    egress: bool | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule (``spec`` or an item of ``specs``)."""

    endpoint_selector: LabelSelector | None
    node_selector: LabelSelector | None
    ingress: tuple[PeerRule, ...]
    ingress_deny: tuple[PeerRule, ...]
    egress: tuple[PeerRule, ...]
    egress_deny: tuple[PeerRule, ...]
    default_deny: DefaultDeny
    description: str | None
    labels: tuple[str, ...]
    path: str  # "" for spec, "specs[N]" for specs
    source: SourceRef

    def sections(self, direction: Direction) -> tuple[tuple[PeerRule, ...], tuple[PeerRule, ...]]:
        """(allow rules, deny rules) of one direction."""
        if direction is Direction.INGRESS:
            return self.ingress, self.ingress_deny
        return self.egress, self.egress_deny

    def applies_to(self, direction: Direction) -> bool:
        """Cilium: a rule with (non-empty) allow or deny rules in a direction
        puts its endpoints into default deny there, unless enableDefaultDeny
        says otherwise."""
        allow, deny = self.sections(direction)
        return bool(allow or deny)

    def enables_default_deny(self, direction: Direction) -> bool:
        flag = self.default_deny.ingress if direction is Direction.INGRESS else self.default_deny.egress
        return self.applies_to(direction) and flag is not False


TRANSLATION_NOTES = "cilia.io/translation-notes"  # metadata annotation: what a translation changed


@dataclass(frozen=True, slots=True)
class Policy:
    """One CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy document."""

    kind: PolicyKind
    name: str
    namespace: str | None  # effective namespace for CNP ("default" if unset); None for CCNP
    rules: tuple[Rule, ...]
    source: SourceRef
    labels: tuple[str, ...] = ()  # metadata.labels as k8s:key=value, sorted (what kubectl -l selects on)
    # what a translation changed to accept the document it came from (a NetworkPolicy's masked
    # ipBlock), carried in its text as the annotation TRANSLATION_NOTES (one note a line)
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        """Identity of the policy in a repository: (kind, namespace, name)."""
        return (self.kind.value, self.namespace or "", self.name)

    @property
    def display_name(self) -> str:
        return f"{self.namespace}/{self.name}" if self.namespace else self.name

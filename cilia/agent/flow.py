"""One flow: what the agent saw decided, named on both sides (Hubble's ``flow.Flow`` in our
fields; ``cilia.agent.hubble`` writes it in Hubble's JSON form, ``cilia.agent.flows`` makes it)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Verdict(str, Enum):
    FORWARDED = "FORWARDED"
    DROPPED = "DROPPED"
    REDIRECTED = "REDIRECTED"
    AUDIT = "AUDIT"
    ERROR = "ERROR"
    TRACED = "TRACED"


@dataclass(frozen=True, slots=True)
class Peer:
    address: str = ""
    port: int = 0
    identity: int | None = None
    labels: tuple[str, ...] = ()
    endpoint: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"address": self.address, "port": self.port, "identity": self.identity,
                               "labels": list(self.labels)}
        if self.endpoint:
            out["endpoint"] = self.endpoint
        return out


@dataclass(frozen=True, slots=True)
class Flow:
    time: float
    verdict: Verdict
    kind: str  # l3/l4 | tcp | http | kafka | cassandra | memcache | <plugin>
    source: Peer
    destination: Peer
    l4_protocol: str = "TCP"
    direction: str = ""  # whose policy decided: the destination's ingress or the source's egress
    drop_reason: str = ""
    l7: Mapping[str, Any] = field(default_factory=dict)
    rule: str = ""
    endpoint: str = ""  # the endpoint whose policy decided
    node: str = ""
    listener: str = ""
    proxy_port: int = 0
    latency: float = 0.0  # HTTP: seconds from the request to the response sent
    upstream_reply: float = 0.0  # HTTP: seconds until the upstream's reply arrived (0: none came)
    match_type: int = 0  # L3/L4: Hubble's policy_match_type of the deciding entry (hubble.policy_match_type)
    # through a service: the frontend the source addressed ("10.96.0.10:80"; destination is the
    # backend) and the service's (namespace, name) if it has a name
    service_frontend: str = ""
    service: tuple[str, str] = ("", "")

    @property
    def type(self) -> str:
        return "L3_L4" if self.kind in ("l3/l4", "tcp") else "L7"

    @property
    def event_type(self) -> str:
        """Hubble's event type name (``--type``): l7, drop or policy-verdict."""
        if self.type == "L7":
            return "l7"
        return "drop" if self.verdict is Verdict.DROPPED else "policy-verdict"

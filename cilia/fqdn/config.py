"""The agent's toFQDNs settings (``cilia agent --tofqdns-*``)."""

from __future__ import annotations

from dataclasses import dataclass

from .cache import DEFAULT_GRACE, DEFAULT_MIN_TTL

DEFAULT_CT_IDLE = 60.0

__all__ = ["DEFAULT_CT_IDLE", "DEFAULT_GRACE", "DEFAULT_MIN_TTL", "FqdnConfig"]


@dataclass(frozen=True)
class FqdnConfig:
    min_ttl: int = DEFAULT_MIN_TTL  # --tofqdns-min-ttl
    grace: float = DEFAULT_GRACE  # seconds an expired address stays before it may go
    ct_idle: float = DEFAULT_CT_IDLE  # a conntrack flow that saw a packet this recently keeps its address
    interval: float = 1.0  # seconds between collections

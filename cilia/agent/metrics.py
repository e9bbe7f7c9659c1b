"""The agent's Prometheus metrics, named as Cilium's with a ``cilia_`` prefix.

One registry per agent (not prometheus_client's global one), so agents in one process (tests)
keep their own counts. Served by the API at ``GET /metrics`` in the text exposition format.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, generate_latest

L7_RULES = ("received", "forwarded", "denied", "parse_errors")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Cilium's cilium_policy_l7_total{rule, proxy_type}: every L7 request a proxy saw, by outcome
        self.policy_l7 = Counter("cilia_policy_l7", "L7 requests by outcome (rule) and proxy type",
                                 ["rule", "proxy_type"], registry=self.registry)

    def l7(self, proxy_type: str, allowed: bool | None) -> None:
        """One request the proxy decided (``None``: it could not be parsed)."""
        if allowed is None:
            self.policy_l7.labels("parse_errors", proxy_type).inc()
            return
        self.policy_l7.labels("received", proxy_type).inc()
        self.policy_l7.labels("forwarded" if allowed else "denied", proxy_type).inc()

    def exposition(self) -> bytes:
        return bytes(generate_latest(self.registry))

"""The realizer sink that gives the DNS proxy each revision's policy, swapped in whole."""

from __future__ import annotations

from ..realizer.desired import Desired
from .policy import DNSPolicy
from .server import DNSProxy


class DNSProxySink:
    name = "dns-proxy"

    def __init__(self, proxy: DNSProxy) -> None:
        self.proxy = proxy

    def realize(self, desired: Desired) -> None:
        self.proxy.policy = DNSPolicy.of(desired)

"""The load balancer sink: ``desired.services`` written into the BPF service maps.

Runs once the datapath is loaded (``NodeDatapath.lb``); ``LoadBalancer.sync`` writes only what
differs. Bad services raise before anything is written (kept for status like any sink error):
the kernel keeps the services it had.
"""

from __future__ import annotations

from ..bpf.lb import LbSyncResult
from ..bpf.node import NodeDatapath
from .desired import Desired


class ServiceSink:
    name = "bpf-lb"

    def __init__(self, node: NodeDatapath) -> None:
        self.node = node
        self.last: LbSyncResult | None = None

    def realize(self, desired: Desired) -> None:
        lb = self.node.lb
        if lb is None:
            return  # the agent's start writes the last Desired once the program is loaded
        self.last = lb.sync(desired.services)
